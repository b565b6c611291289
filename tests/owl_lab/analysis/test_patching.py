"""Activation patching: exact endpoints (patch everything = clean, patch nothing = corrupt)."""

from __future__ import annotations

import pytest
import torch

from owl_lab.analysis.patching import patching_sweep, summarize
from owl_lab.synth.counterfactual import collate_pairs, counterfactual_pairs


@pytest.fixture(scope="module")
def pair_batches(tiny_owl):
    variant, model, processor, _ = tiny_owl
    return variant, model, collate_pairs(processor, counterfactual_pairs("color", 3, seed=0))


def test_patching_the_whole_stream_recovers_everything(pair_batches, hooks_left):
    variant, model, (clean, corrupt, ci, ki) = pair_batches
    df = patching_sweep(model, clean, corrupt, ci, ki, sites=["resid"], groups=["all"], progress=False)
    assert set(df.columns) >= {"layer", "site", "group", "batch", "recovered"}
    assert len(df) == model.config.num_hidden_layers * 3
    last = df[df.layer == df.layer.max()]
    assert torch.allclose(torch.tensor(last.ld.values), torch.tensor(last.ld_clean.values), atol=1e-4)
    if variant == "owl2":  # the image lives in the sequence: the stream entering block 0 carries all of it
        assert (df.recovered - 1).abs().max() < 1e-4
    assert hooks_left(model) == 0


def test_summary_and_bad_input(pair_batches):
    _, model, (clean, corrupt, ci, ki) = pair_batches
    df = patching_sweep(model, clean, corrupt, ci, ki, layers=[0], progress=False)
    s = summarize(df)
    assert len(s) == 3 * 3 and set(s.columns) >= {"mean", "se", "n"}
    assert (s.n == 3).all()
    with pytest.raises(ValueError, match="unknown site"):
        patching_sweep(model, clean, corrupt, ci, ki, sites=["bogus"], progress=False)
