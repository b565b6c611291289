"""Counterfactual pairs: same prompt and token layout, one attribute of the asked object changed."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from owl_lab.synth.counterfactual import EDITS, collate_pairs, counterfactual_pairs, edit_scene, make_pair
from owl_lab.synth.shapes import Obj, Scene
from owl_lab.synth.tokenizer import build_tokenizer


@pytest.mark.parametrize("edit", EDITS)
def test_pairs_differ_in_exactly_one_attribute_of_the_asked_object(edit):
    for pair in counterfactual_pairs(edit, 40, seed=3):
        assert pair.clean.text == pair.corrupt.text
        assert pair.clean.answer != pair.corrupt.answer
        assert pair.clean.answer.split()[0] != pair.corrupt.answer.split()[0]  # first token differs
        clean, corrupt = pair.clean.scenes[0], pair.corrupt.scenes[0]
        assert len(clean.objects) == len(corrupt.objects)
        changed = [(a, b) for a, b in zip(clean.objects, corrupt.objects, strict=True) if a != b]
        assert changed == [(pair.before, pair.after)]
        fields = {
            f
            for f in ("shape", "color", "size", "pattern", "row", "col", "dx", "dy")
            if getattr(pair.before, f) != getattr(pair.after, f)
        }
        assert (fields <= {"row", "col"} and fields) if edit == "position" else fields == {edit}
        assert not np.array_equal(np.asarray(pair.clean.images[0]), np.asarray(pair.corrupt.images[0]))


def test_pairs_are_seeded_and_reproducible():
    a = counterfactual_pairs("color", 5, seed=1)
    b = counterfactual_pairs("color", 5, seed=1)
    assert [p.clean.text for p in a] == [p.clean.text for p in b]
    assert all(
        np.array_equal(np.asarray(x.corrupt.images[0]), np.asarray(y.corrupt.images[0]))
        for x, y in zip(a, b, strict=True)
    )
    assert [p.clean.answer for p in counterfactual_pairs("color", 5, seed=2)] != [p.clean.answer for p in a]


def test_questions_still_single_out_the_object():
    for pair in counterfactual_pairs("color", 30, seed=0):
        shape = pair.after.shape
        assert sum(o.shape == shape for o in pair.corrupt.scenes[0].objects) == 1


@pytest.mark.parametrize("family", ["owl2", "owl3"])
def test_collated_pairs_have_identical_token_layout(family):
    from owl_lab.train import family_classes

    Config, _, Processor = family_classes(family)
    tok = build_tokenizer(family)
    config = Config(vocab_size=len(tok))
    processor = Processor.from_config(config, tok) if hasattr(Processor, "from_config") else Processor(tok)
    pairs = [p for e in EDITS for p in counterfactual_pairs(e, 3, seed=0)]
    clean, corrupt, clean_ids, corrupt_ids = collate_pairs(processor, pairs)
    for key in clean:
        if key != "pixel_values":
            assert torch.equal(clean[key], corrupt[key]), key
    assert not torch.equal(clean["pixel_values"], corrupt["pixel_values"])
    assert (clean_ids != corrupt_ids).all()
    unk = tok.convert_tokens_to_ids("<unk>")
    assert (clean_ids != unk).all() and (corrupt_ids != unk).all()


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="unknown edit"):
        make_pair(random.Random(0), "size")
    a, b = Obj("circle", "red", "small", "plain", 0, 0), Obj("square", "blue", "small", "plain", 0, 1)
    with pytest.raises(ValueError, match="occupied"):
        edit_scene(Scene((a, b)), a, col=1)
    with pytest.raises(ValueError, match="not an object"):
        edit_scene(Scene((a,)), b, color="red")
