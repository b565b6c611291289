"""Knockout sweeps: table shape, exact zero where nothing can flow, and bad input."""

from __future__ import annotations

import pytest

from owl_lab.analysis.knockout import FLOWS, knockout_sweep, summarize
from owl_lab.synth import eval_set


def test_sweep_table_and_summary(tiny_owl, hooks_left):
    variant, model, processor, _ = tiny_owl
    examples = eval_set("color", 4, seed=1)
    df = knockout_sweep(model, processor, examples, window=1, progress=False)
    n = model.config.num_hidden_layers
    assert len(df) == len(FLOWS) * n * 4
    assert set(df.flow) == set(FLOWS)
    assert ((df.p > 0) & (df.p <= 1)).all() and (df.relative_change >= -1).all()
    if variant.startswith(
        "owl3"
    ):  # image keys exist only in hyper layers: elsewhere the image flows are exact no-ops
        hyper = set(model.config.hyper_layer_indices)
        plain = df[df.flow.str.startswith("visual") & ~df.start.isin(hyper)]
        assert (plain.relative_change == 0).all()
    s = summarize(df, correct_only=False)
    assert set(s.columns) >= {"flow", "start", "end", "change_pct", "se", "n"} and (s.n == 4).all()
    assert hooks_left(model) == 0


def test_per_image_flows_and_bad_input(tiny_owl):
    _, model, processor, _ = tiny_owl
    examples = eval_set("color", 2, seed=1)
    df = knockout_sweep(
        model, processor, examples, window=2, flows=["visual→last"], per_image=True, progress=False
    )
    assert set(df.flow) == {"visual→last", "image:0→last"}
    one = df.pivot_table(index=["start", "example"], columns="flow", values="p_knocked")
    assert (one["visual→last"] - one["image:0→last"]).abs().max() < 1e-6  # one image: the same flow
    with pytest.raises(ValueError, match="window"):
        knockout_sweep(model, processor, examples, window=0, progress=False)
    with pytest.raises(ValueError, match="unknown flows"):
        knockout_sweep(model, processor, examples, flows=["text→visual"], progress=False)


def test_visual_to_text_flow_is_pruning_every_visual_token(tiny_owl, hooks_left):
    """Blocking visual→text in layers K+1.. equals FastV-pruning 100 % of the visual tokens after K."""
    from hooks.sites import family_spec
    from owl_lab.analysis.pruning import prune_sweep

    _, model, processor, _ = tiny_owl
    examples = eval_set("color", 3, seed=2)
    n = model.config.num_hidden_layers
    k = 0 if family_spec(model).images_in_sequence else min(model.config.hyper_layer_indices)
    if k + 1 >= n:
        pytest.skip("no layer after the first image layer")
    ko = knockout_sweep(model, processor, examples, window=n - 1 - k, flows=["visual→text"], progress=False)
    ko = ko[ko.start == k + 1].sort_values("example")
    pruned = prune_sweep(model, processor, examples, layer=k, fractions=(1.0,), progress=False)
    pruned = pruned[pruned.rule == "attention"].sort_values("example")
    assert len(ko) == len(pruned) == 3
    assert (ko.p_knocked.to_numpy() - pruned.p.to_numpy()).__abs__().max() < 1e-5
    # and it blocks more than the last position alone: the question tokens lose the image too
    last_only = knockout_sweep(model, processor, examples, window=1, flows=["visual→last"], progress=False)
    text = knockout_sweep(model, processor, examples, window=1, flows=["visual→text"], progress=False)
    assert not text.p_knocked.equals(last_only.p_knocked)
    assert hooks_left(model) == 0
