"""capture() on the logsumexp paths (the SDPA kernel's normaliser, see hooks/attention_lse.py) gives the
same table as the full-softmax path, on real Owl2 / Owl3 / stock LLaVA models, with reductions and
knockouts, and leaves the logits bitwise equal. Owl3's cross attention (equal image groups) takes the
tiled path, every self-attention the dominant-group path."""

from __future__ import annotations

import pytest
import torch

import hooks
import hooks.attention as ha
import hooks.attention_lse as hl
from hooks import capture
from owl_lab.commands.bench_common import build

SPEC = {"quick": True, "hidden": 64, "layers": 2, "heads": 4, "threads": 1}
ROWS = {
    "owl2": {"family": "owl2", "L": 96, "length": 96, "images": 1, "text": 0},
    "owl3": {"family": "owl3", "L": 64, "length": 64, "images": 3, "text": 64},  # 3 equal image groups
    "llava": {"family": "llava", "L": 96, "length": 96, "images": 1, "text": 0},
}
KEYS = ["batch", "step", "layer", "head", "query", "kind", "level", "group"]


@pytest.fixture(scope="module", params=sorted(ROWS))
def model_batch(request):
    model, batch = build({**SPEC, **ROWS[request.param]})
    return request.param, model, batch


def table(model, batch, **kw):
    with torch.no_grad(), capture(model, **kw) as rec:
        logits = model(**batch).logits
    return logits, rec.attention_mass.sort_values(KEYS).reset_index(drop=True)


def counting(monkeypatch) -> dict[str, list]:
    """Count the calls of both logsumexp paths (dominant group: lse_chunk, from grouped_mass and from
    lse_fast; no dominant group: lse_tiles)."""
    calls = {"dominant": [], "tiles": []}
    for module, name, path in (
        (ha, "lse_chunk", "dominant"),
        (hl, "lse_chunk", "dominant"),
        (ha, "lse_tiles", "tiles"),
    ):
        real = getattr(module, name)
        monkeypatch.setattr(
            module, name, lambda *a, _real=real, _path=path, **k: (calls[_path].append(1), _real(*a, **k))[1]
        )
    return calls


def full_softmax_only(monkeypatch) -> None:
    monkeypatch.setattr(ha, "_LSE_MAX_EXPLICIT", -1.0)  # never the dominant-group path
    monkeypatch.setattr(ha, "_LSE_TILES", False)  # nor the tiled one: every event on the full softmax


@pytest.mark.parametrize(
    "kw", [{}, {"heads": "mean", "queries": "last"}, {"heads": [0, 2], "queries": slice(10, 40)}]
)
def test_logsumexp_path_equals_full_softmax_path(model_batch, kw, monkeypatch):
    family, model, batch = model_batch
    with torch.no_grad():
        plain = model(**batch).logits
    calls = counting(monkeypatch)
    logits, fast = table(model, batch, **kw)
    assert calls["dominant"], "the dominant-group logsumexp path was not taken"
    assert bool(calls["tiles"]) == (family == "owl3"), "the tiled path is for Owl3's cross attention"
    assert torch.equal(logits, plain)
    full_softmax_only(monkeypatch)
    calls["dominant"].clear(), calls["tiles"].clear()
    _, full = table(model, batch, **kw)
    assert not calls["dominant"] and not calls["tiles"]
    assert fast[KEYS].equals(full[KEYS])
    assert (fast.mass - full.mass).abs().max() < 1e-6


@pytest.mark.parametrize(
    "ko",
    [
        {"queries": "last", "keys": "text"},
        {"queries": "all", "keys": "image:0"},  # Owl3: a whole image group knocked out of the cross softmax
        {"queries": "all", "keys": "image:1", "heads": [1]},  # per-head mask (owl2/llava: no image 1)
    ],
)
def test_logsumexp_path_under_a_knockout_records_exact_zeros(model_batch, ko, monkeypatch):
    family, model, batch = model_batch
    calls = counting(monkeypatch)
    with torch.no_grad(), hooks.knockout(model, layers=None, **ko):
        _, fast = table(model, batch)
    assert calls["dominant"]
    full_softmax_only(monkeypatch)
    with torch.no_grad(), hooks.knockout(model, layers=None, **ko):
        _, full = table(model, batch)
    assert fast[KEYS].equals(full[KEYS])
    assert (fast.mass - full.mass).abs().max() < 1e-6
    zero = full.mass == 0
    assert zero.any() and (fast.mass[zero] == 0).all()
