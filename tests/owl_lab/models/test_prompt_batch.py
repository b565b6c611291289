"""The batching both the Owl2 and LLaVA processors use: image/placeholder checks, padding, labels."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from owl_lab.models.prompt_batch import IGNORE_INDEX, batch_feature, encode_prompts, flatten_images


class _WordTokenizer:
    """word → id (1 + position in a fixed list), eos 2."""

    eos_token_id = 2
    words = ["<s>", "</s>", "USER:", "ASSISTANT:", "a", "red", "circle", "what"]

    def __call__(self, text, add_special_tokens=True):
        class Out:
            input_ids = [self.words.index(w) + 1 for w in text.split()]

        return Out()


def test_flatten_images_per_prompt_and_flat():
    im = Image.new("RGB", (4, 4))
    assert flatten_images([[im], [im, im]], [1, 2], "<i>") == [im, im, im]
    assert flatten_images([im, im], [2, 0], "<i>") == [im, im]
    assert flatten_images(im, [1], "<i>") == [im]
    with pytest.raises(ValueError, match="Prompt 1 has 2 <i>"):
        flatten_images([[im], [im]], [1, 2], "<i>")
    with pytest.raises(ValueError, match="3 <i> placeholder"):
        flatten_images([im], [1, 2], "<i>")


def test_labels_only_on_answer_and_eos_rows_right_padded():
    tok = _WordTokenizer()
    data = encode_prompts(["what", "a red circle"], ["red", "circle"], lambda p: tok(p).input_ids, tok, 0)
    ids, mask, labels = (torch.tensor(data[k]) for k in ("input_ids", "attention_mask", "labels"))
    assert ids.shape == mask.shape == labels.shape == (2, 7)
    assert mask.sum(1).tolist() == [5, 7]  # USER: what ASSISTANT: red </s>  /  ... a red circle ...
    assert (ids[0, 5:] == 0).all() and (labels[0, 5:] == IGNORE_INDEX).all()
    scored = labels[1][labels[1] != IGNORE_INDEX].tolist()
    assert scored == [tok.words.index("circle") + 1, tok.eos_token_id]
    assert "labels" not in encode_prompts(["what"], None, lambda p: tok(p).input_ids, tok, 0)
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        encode_prompts(["a", "a"], ["red"], lambda p: tok(p).input_ids, tok, 0)


def test_batch_feature_tensors_or_lists():
    data = {"input_ids": [[1, 2]], "pixel_values": torch.zeros(1, 3, 2, 2)}
    out = batch_feature(dict(data), "pt")
    assert out["input_ids"].dtype == torch.long and out["pixel_values"].dtype == torch.float32
    assert batch_feature(dict(data), None)["input_ids"] == [[1, 2]]
    with pytest.raises(ValueError, match="Only return_tensors='pt'"):
        batch_feature(dict(data), "np")


def test_follow_up_turns_are_labelled_after_each_answer():
    tok = _WordTokenizer()
    data = encode_prompts(
        ["what", "a"],
        ["red", "circle"],
        lambda p: tok(p).input_ids,
        tok,
        0,
        turns=[[("a circle", "red")], []],
    )
    ids, labels = torch.tensor(data["input_ids"]), torch.tensor(data["labels"])
    w = {x: tok.words.index(x) + 1 for x in tok.words}
    # USER: what ASSISTANT: red </s> USER: a circle ASSISTANT: red </s>
    assert ids[0].tolist() == [
        w["USER:"],
        w["what"],
        w["ASSISTANT:"],
        w["red"],
        2,
        w["USER:"],
        w["a"],
        w["circle"],
        w["ASSISTANT:"],
        w["red"],
        2,
    ]
    assert labels[0].tolist() == [IGNORE_INDEX] * 3 + [w["red"], 2] + [IGNORE_INDEX] * 4 + [w["red"], 2]
    assert (labels[1] != IGNORE_INDEX).sum() == 2  # the prompt without turns: answer + eos only
    with pytest.raises(ValueError, match="need answers"):
        encode_prompts(["what"], None, lambda p: tok(p).input_ids, tok, 0, turns=[[("a", "red")]])
    with pytest.raises(ValueError, match="follow-up turn holds"):
        encode_prompts(
            ["what"], ["red"], lambda p: tok(p).input_ids, tok, 0, turns=[[("<|image|> a", "red")]]
        )
    with pytest.raises(ValueError, match="turn lists"):
        encode_prompts(["what"], ["red"], lambda p: tok(p).input_ids, tok, 0, turns=[[], []])
