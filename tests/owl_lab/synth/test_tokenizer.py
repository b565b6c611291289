"""Word-level tokenizers: closed vocabulary, family BOS/EOS conventions, AutoTokenizer round trip."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from owl_lab.synth import ALL_TASKS, Mixture, distractor_eval
from owl_lab.synth.tokenizer import build_tokenizer, vocabulary

OWL2_PROMPT = "USER: <|image|>What color is the circle? ASSISTANT: red</s>"
OWL3_PROMPT = (
    "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n<|image|>What color is the circle?<|im_end|>"
    "\n<|im_start|>assistant\nred<|im_end|>"
)


@pytest.mark.parametrize("family", ["owl2", "owl3"])
def test_every_generated_word_is_in_the_vocabulary(family):
    tok = build_tokenizer(family)
    unk = tok.unk_token_id
    mix = Mixture({t: 1 for t in ALL_TASKS}, seed=11)
    texts = [t for i in range(400) for t in (mix.example(i).text, mix.example(i).answer)]
    texts += [e.text for g in distractor_eval(0, 32, n_questions=3) for e in g]
    for text in texts:
        ids = tok(text, add_special_tokens=False).input_ids
        assert unk not in ids, (text, tok.convert_ids_to_tokens(ids))


def test_owl2_conventions():
    tok = build_tokenizer("owl2")
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    ids = tok(OWL2_PROMPT).input_ids
    assert tok.convert_ids_to_tokens(ids) == [
        "<s>",
        "user",
        ":",
        "<|image|>",
        "what",
        "color",
        "is",
        "the",
        "circle",
        "?",
        "assistant",
        ":",
        "red",
        "</s>",
    ]


def test_owl3_conventions():
    tok = build_tokenizer("owl3")
    assert tok.bos_token_id is None
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert set(tok.all_special_tokens) == {"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"}
    toks = tok.convert_ids_to_tokens(tok(OWL3_PROMPT).input_ids)
    assert toks[:6] == ["<|im_start|>", "system", "<|im_end|>", "<|im_start|>", "user", "<|image|>"]
    assert toks[-3:] == ["assistant", "red", "<|im_end|>"]


def test_ids_are_deterministic_and_shared_words_align():
    v2, v3 = vocabulary("owl2"), vocabulary("owl3")
    assert vocabulary("owl2") == v2
    assert list(v2)[:4] == ["<unk>", "<s>", "</s>", "<|image|>"]
    words = [w for w in v2 if not w.startswith("<")]
    assert [v3[w] - v2[w] for w in words] == [1] * len(words)  # one more special in owl3, same order
    with pytest.raises(ValueError, match="unknown family"):
        vocabulary("owl4")


@pytest.mark.parametrize("family", ["owl2", "owl3"])
def test_autotokenizer_round_trip(family, tmp_path):
    tok = build_tokenizer(family)
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = OWL2_PROMPT if family == "owl2" else OWL3_PROMPT
    assert again(text).input_ids == tok(text).input_ids
    assert (again.eos_token_id, again.pad_token_id, again.bos_token_id) == (
        tok.eos_token_id,
        tok.pad_token_id,
        tok.bos_token_id,
    )
    assert again.decode(tok("What is 3 plus 4?", add_special_tokens=False).input_ids) == "what is 3 plus 4?"
