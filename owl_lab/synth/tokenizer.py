"""Word-level tokenizers over the lab worlds' closed vocabulary, one per model family.

Both families share the word list of :mod:`owl_lab.synth.vocab` (lower-cased, split on whitespace
and punctuation); they differ, like the real models, in their special tokens:

* ``owl2`` (LLaMA-like): ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2 (the LLaMA-2 ids); a
  TemplateProcessing post-processor prepends ``<s>``; eos ``</s>``; pad = ``<unk>`` as in the
  official mPLUG-Owl2 (pad id 0).
* ``owl3`` (Qwen2-like): ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``; no BOS; eos
  ``<|im_end|>``; pad ``<|endoftext|>``. ``<unk>`` exists only because a word-level model needs one.

``<|image|>`` is one (non-special) token in both. The Owl2 processor splits prompts on it before
tokenizing (it becomes the -200 marker), the Owl3 processor keeps it as text, where it spans one
token instead of Qwen2's several BPE pieces. Newlines of the chat templates are whitespace and
produce no token.

Ids are deterministic: specials first, then ``<|image|>``, then the words in vocab order.
"""
from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from owl_lab.synth.vocab import IMAGE_PLACEHOLDER, WORDS

SPECIALS = {
    "owl2": ("<unk>", "<s>", "</s>"),
    "owl3": ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"),
}
ROLES = {
    "owl2": dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"),
    # <|im_start|> has no role, so it is listed as an extra special: all_special_ids must hold every chat
    # marker (attribution keeps special tokens in its baseline; decoding skips them)
    "owl3": dict(eos_token="<|im_end|>", unk_token="<unk>", pad_token="<|endoftext|>",
                 extra_special_tokens=["<|im_start|>"]),
}


def vocabulary(family: str) -> dict[str, int]:
    """token → id for ``family`` (deterministic order)."""
    if family not in SPECIALS:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(SPECIALS)}")
    tokens = list(SPECIALS[family]) + [IMAGE_PLACEHOLDER] + list(WORDS)
    return {t: i for i, t in enumerate(tokens)}


def build_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """The family's word-level fast tokenizer (save it with ``save_pretrained``; AutoTokenizer loads it)."""
    vocab = vocabulary(family)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    # Whitespace = \w+|[^\w\s]+ ; Punctuation then splits runs such as "?." into single marks
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies " ?"
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS[family]])
    tok.add_tokens([AddedToken(IMAGE_PLACEHOLDER, special=False, normalized=False)])
    if family == "owl2":
        bos = vocab["<s>"]
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
        )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **ROLES[family])
    fast.padding_side = "right"
    return fast
