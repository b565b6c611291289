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

import copy

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from owl_lab.families import FamilySpec, get_family
from owl_lab.synth.vocab import IMAGE_PLACEHOLDER, WORDS


def vocabulary(family: str | FamilySpec) -> dict[str, int]:
    """token → id for ``family`` (deterministic order); its special tokens are the registry's."""
    tokens = list(get_family(family).tokenizer.specials) + [IMAGE_PLACEHOLDER] + list(WORDS)
    return {t: i for i, t in enumerate(tokens)}


def build_tokenizer(family: str | FamilySpec) -> PreTrainedTokenizerFast:
    """The family's word-level fast tokenizer (save it with ``save_pretrained``; AutoTokenizer loads it)."""
    spec = get_family(family).tokenizer
    vocab = vocabulary(family)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    # Whitespace = \w+|[^\w\s]+ ; Punctuation then splits runs such as "?." into single marks
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies " ?"
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec.specials])
    tok.add_tokens([AddedToken(IMAGE_PLACEHOLDER, special=False, normalized=False)])
    if spec.prepend_bos:
        bos = spec.roles["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **copy.deepcopy(spec.roles))
    fast.padding_side = "right"
    return fast
