"""The causal bench rows: knockout runs on bench's configs, the patching sweep is timed (fast pieces only)."""

from __future__ import annotations

import torch

from owl_lab.commands import bench, bench_causal


def test_knockout_mode_runs_and_changes_the_last_token():
    for family in ("owl2", "owl3"):
        spec = {
            "family": family,
            "quick": True,
            "hidden": 0,
            "layers": 0,
            "heads": 0,
            "length": 64,
            "text": 64,
            "images": 2,
        }
        model, batch = bench.build(spec)
        plain = bench_causal.runner(model, batch, "plain")()
        knocked = bench_causal.runner(model, batch, "knockout")()
        assert plain.shape == knocked.shape
        assert torch.equal(plain[:, :-1], knocked[:, :-1])  # only the last query lost its image keys
        assert not torch.equal(plain[:, -1], knocked[:, -1])


def test_patching_sweep_of_one_pair_is_under_ten_seconds():
    assert bench_causal.patching_seconds("owl2-tiny") < 10
