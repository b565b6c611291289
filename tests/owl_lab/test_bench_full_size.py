"""owl-lab bench --full-size: the configs are the released ones (key manifests), and the streamed
random-weight model runs with capture on, logits unchanged (2 decoder layers of a scaled Owl3)."""

from __future__ import annotations

import csv

import pytest
import torch

from owl_lab.commands import bench_full_size as full


@pytest.mark.parametrize(
    "family, manifest",
    [("owl2", "owl2/keys-mplug-owl2-llama2-7b.tsv"), ("owl3", "owl3/keys-mplug-owl3-7b-240728.tsv")],
)
def test_full_size_configs_have_the_released_shapes(family, manifest, reference_dir):
    config = full.full_size_config(family)
    with torch.device("meta"):
        if family == "owl2":
            from owl_lab.models.owl2 import Owl2ForCausalLM as cls
        else:
            from owl_lab.models.owl3 import Owl3ForCausalLM as cls
        model = cls(config)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    with open(reference_dir / manifest) as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t") if r["kind"] == "param"]
    wrong = [r["key"] for r in rows if r["key"] in ours and ours[r["key"]] != eval(r["shape"])]
    assert not wrong
    assert sum(r["key"] in ours for r in rows) >= 0.95 * len(rows)


def test_streamed_blocks_are_materialised_only_while_they_run():
    from torch import nn

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(8, 8)
            self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])

        def forward(self, x):
            x = self.inp(x)
            for layer in self.layers:
                x = layer(x)
            return x

    with torch.device("meta"):
        toy = Toy()
    mat = full.Materialiser(toy, torch.bfloat16, resident=False)
    assert toy.inp.weight.device.type == "cpu" and toy.layers[0].weight.device.type == "meta"
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    first, second = toy(x), toy(x)
    assert torch.equal(first, second)  # the same random values on every pass
    assert all(layer.weight.device.type == "meta" for layer in toy.layers)
    assert len(mat.handles) == 6


def test_owl_lab_bench_full_size_runs_the_full_size_smoke(monkeypatch):
    """``owl-lab bench --full-size owl3`` hands the family to the full-size smoke (not the table)."""
    from owl_lab import cli
    from owl_lab.commands import bench_full_size

    seen = []
    monkeypatch.setattr(bench_full_size, "run", lambda args: seen.append(args) or 0)
    assert cli.main(["bench", "--full-size", "owl3", "--threads", "1"]) == 0
    assert [(a.family, a.layers, a.resident, a.threads) for a in seen] == [("owl3", None, False, 1)]
