"""A word-level toy tokenizer for tiny Owl3 checkpoints and tests (``tokenizers`` + PreTrainedTokenizerFast).

Reproduces the tokenization of the owl3-tiny-a goldens: special tokens ``<|endoftext|>``,
``<|im_start|>``, ``<|im_end|>`` and ``<|image|>`` are atomic; other text is lower-cased and split into
``\\n``, alphanumeric runs and single punctuation characters; other whitespace is dropped; unknown
words map to ``<unk>``. Note: here ``<|image|>`` is ONE token, while the real Qwen2 tokenizer splits
the plain text ``<|image|>`` into several pieces (the model only uses the placeholder start).
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image|>")


def build_word_tokenizer(vocab: dict[str, int], unk_token: str = "<unk>") -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``vocab`` (word → id); the four chat/image tokens must be in it."""
    missing = [t for t in (*SPECIAL_TOKENS, unk_token) if t not in vocab]
    if missing:
        raise ValueError(f"vocab lacks the tokens {missing}.")
    tok = Tokenizer(models.WordLevel(vocab=dict(vocab), unk_token=unk_token))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),  # drop spaces/tabs, keep "\n"
            pre_tokenizers.Split(Regex(r"\n|[a-z0-9]+|[^a-z0-9\s]"), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=unk_token,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|image|>"],
    )
