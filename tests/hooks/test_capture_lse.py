"""capture() on the logsumexp path (the SDPA kernel's normaliser, see hooks/attention.py) gives the same
table as the full-softmax path, on real Owl2 / Owl3 / stock LLaVA models, with reductions and knockouts,
and leaves the logits bitwise equal."""

from __future__ import annotations

import pytest
import torch

import hooks
import hooks.attention as ha
from hooks import capture
from owl_lab.commands.bench_common import build

SPEC = {"quick": True, "hidden": 64, "layers": 2, "heads": 4, "threads": 1}
ROWS = {
    "owl2": {"family": "owl2", "L": 96, "length": 96, "images": 1, "text": 0},
    "owl3": {"family": "owl3", "L": 64, "length": 64, "images": 2, "text": 64},
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


def counting(monkeypatch):
    calls = []
    real = ha._lse_chunk
    monkeypatch.setattr(ha, "_lse_chunk", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    return calls


@pytest.mark.parametrize(
    "kw", [{}, {"heads": "mean", "queries": "last"}, {"heads": [0, 2], "queries": slice(10, 40)}]
)
def test_logsumexp_path_equals_full_softmax_path(model_batch, kw, monkeypatch):
    family, model, batch = model_batch
    with torch.no_grad():
        plain = model(**batch).logits
    calls = counting(monkeypatch)
    logits, fast = table(model, batch, **kw)
    assert calls, "the logsumexp path was not taken"
    assert torch.equal(logits, plain)
    monkeypatch.setattr(ha, "_LSE_MAX_EXPLICIT", -1.0)  # never: every event on the full softmax
    calls.clear()
    _, full = table(model, batch, **kw)
    assert not calls
    assert fast[KEYS].equals(full[KEYS])
    assert (fast.mass - full.mass).abs().max() < 1e-6


def test_logsumexp_path_under_a_knockout_records_exact_zeros(model_batch, monkeypatch):
    family, model, batch = model_batch
    calls = counting(monkeypatch)
    with torch.no_grad(), hooks.knockout(model, queries="last", keys="text", layers=None):
        _, fast = table(model, batch)
    assert calls
    monkeypatch.setattr(ha, "_LSE_MAX_EXPLICIT", -1.0)
    with torch.no_grad(), hooks.knockout(model, queries="last", keys="text", layers=None):
        _, full = table(model, batch)
    assert fast[KEYS].equals(full[KEYS])
    assert (fast.mass - full.mass).abs().max() < 1e-6
    zero = full.mass == 0
    assert zero.any() and (fast.mass[zero] == 0).all()
