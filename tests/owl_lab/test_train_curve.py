"""owl_lab.train_curve: the held-out curve written during training (owl-lab train --curve)."""

from __future__ import annotations

import pytest

from owl_lab.recipes import load_recipe
from owl_lab.train import train
from owl_lab.train_curve import HeldOutCurve, read_curve


def _binding_smoke() -> dict:
    recipe = load_recipe("smoke-owl3")
    stage = {**recipe["stages"][0], "tasks": {"color": 1, "parity": 1, "binding": 1}}
    world = {**recipe["world"], "binding_max_images": 3, "binding_images_per_batch": 6, "distractor_pool": 8}
    return {**recipe, "world": world, "stages": [stage]}


def test_curve_rows_follow_the_callback_and_skip_steps_before_start(tmp_path):
    recipe = _binding_smoke()
    curve = HeldOutCurve(
        recipe, tmp_path / "run" / "curve.jsonl", start=4, n_per_task=2, circular_n=(1, 2), questions=2
    )
    train(
        recipe,
        None,
        progress=False,
        evaluate_after=False,
        steps_override=6,
        threads=1,
        callback=curve,
        callback_every=2,
    )
    rows = read_curve(tmp_path / "run" / "curve.jsonl")
    assert [r["step"] for r in rows] == [4, 6]  # step 2 is before start
    for r in rows:
        assert 0 <= r["qa"] <= 100 and 0 <= r["text"] <= 100 and r["n_images"] == [1, 2]
        assert len(r["circular"]) == len(r["instance"]) == 2 and r["questions"] == 2
        assert all(0 <= v <= 100 for v in r["circular"] + r["instance"])
    assert rows[0]["train_s"] < rows[1]["train_s"]
    again = HeldOutCurve(recipe, tmp_path / "run" / "curve.jsonl")  # a new run starts the file afresh
    assert read_curve(again.path) == []


def test_curve_skips_the_benchmark_without_the_binding_task_and_rejects_empty_samples(tmp_path):
    recipe = load_recipe("smoke-owl3")
    curve = HeldOutCurve(recipe, tmp_path / "c.jsonl", n_per_task=2)
    assert curve.circular_n == ()
    with pytest.raises(ValueError, match="n_per_task"):
        HeldOutCurve(recipe, tmp_path / "c.jsonl", n_per_task=0)
