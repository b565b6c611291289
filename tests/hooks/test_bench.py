"""``owl-lab bench``: the pieces (fast) and the whole command in --quick mode (slow: child processes)."""

from __future__ import annotations

import csv

import pytest
import torch

from owl_lab import cli
from owl_lab.commands import bench


@pytest.mark.parametrize("family", ["owl2", "owl3"])
def test_bench_models_run_in_every_mode(family):
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
    logits = bench.runner(model, batch, "plain")()
    captured, rec = bench.runner(model, batch, "capture")()
    eager_logits, attentions = bench.runner(model, batch, "eager")()
    assert torch.equal(logits, captured)
    torch.testing.assert_close(eager_logits, logits, rtol=0, atol=1e-4)
    assert len(attentions) == model.config.num_hidden_layers
    assert not rec.attention_mass.empty


@pytest.mark.slow
def test_bench_quick_writes_csv(tmp_path, capsys):
    path = tmp_path / "bench.csv"
    assert cli.main(["bench", "--quick", "--csv", str(path)]) == 0
    rows = list(csv.DictReader(path.open()))
    assert {(r["family"], r["mode"]) for r in rows} == {
        (f, m) for f in ("owl2", "owl3", "llava") for m in ("plain", "capture", "eager")
    }
    assert all(r["status"] == "ok" for r in rows)
    for r in rows:
        assert float(r["seconds"]) > 0 and float(r["peak_mb"]) >= 0
        if r["mode"] == "plain":
            assert float(r["time_ratio"]) == 1.0
            assert float(r["ratio_median"]) == float(r["ratio_min"]) == float(r["ratio_max"]) == 1.0
        assert float(r["ratio_min"]) <= float(r["ratio_median"]) <= float(r["ratio_max"])
    assert "capture" in capsys.readouterr().out


def test_causal_knockout_runner_matches_a_plain_forward_where_nothing_is_visual():
    from owl_lab.commands import bench_causal

    spec = {
        "family": "owl2",
        "quick": True,
        "hidden": 0,
        "layers": 0,
        "heads": 0,
        "length": 64,
        "text": 0,
        "images": 1,
    }
    model, batch = bench.build(spec)
    plain = bench_causal.runner(model, batch, "plain")()
    last = bench_causal.runner(model, batch, "knockout")()
    every = bench_causal.runner(model, batch, "knockout", "all")()
    assert torch.equal(last[:, :-1], plain[:, :-1]) and not torch.equal(last[:, -1], plain[:, -1])
    assert not torch.equal(every, last)


@pytest.mark.slow
def test_bench_causal_rows_join_the_csv(tmp_path, capsys):
    path = tmp_path / "bench.csv"
    argv = [
        "bench",
        "--quick",
        "--causal",
        "--knockout-all",
        "--families",
        "owl2",
        "--no-eager",
        "--csv",
        str(path),
    ]
    assert cli.main(argv) == 0
    rows = list(csv.DictReader(path.open()))
    modes = [r["mode"] for r in rows]
    assert {"plain", "capture", "knockout", "knockout:all", "patching_sweep"} <= set(modes)
    assert all(float(r["seconds"]) > 0 for r in rows)
    knocked = [r for r in rows if r["mode"].startswith("knockout")]
    assert len(knocked) == 4 and all(float(r["peak_mb"]) >= 0 for r in knocked)
    assert "patching sweep" in capsys.readouterr().out
