"""The text/vision split of ``summarize_gate`` against an independent float64 computation, for the strided
(transposed) tensors the model hands over, rows without fusion and a per-head knockout's ``applied``."""

from __future__ import annotations

import pytest
import torch

from hooks.gates import summarize_gate
from owl_lab.models.observe import GateEvent


def event(per_head: bool, seed: int = 0) -> GateEvent:
    g = torch.Generator().manual_seed(seed)
    B, H, L, D = 2, 3, 7, 4

    def model_layout():  # the model's [B, H, L, D], seen as [B, L, H, D]
        return torch.randn(B, H, L, D, generator=g).transpose(1, 2)

    gate = torch.sigmoid(model_layout())
    if per_head:
        applied = torch.rand(B, H, L, generator=g) < 0.6  # [B, H, L]
    else:
        applied = torch.rand(B, L, generator=g) < 0.6  # [B, L]
    return GateEvent(
        layer=1,
        gate=gate,
        applied=applied,
        self_context=model_layout(),
        cross_context=model_layout(),
        o_proj_weight=torch.randn(5, H * D, generator=g),
        query_index=torch.arange(L),
    )


@pytest.mark.parametrize("per_head", [False, True])
def test_split_equals_float64_reference(per_head):
    ev = event(per_head)
    rec = summarize_gate(ev, step=0, valid=torch.ones(2, 7, dtype=torch.bool), keep_vectors=True)
    g, c, x = (t.double() for t in (ev.gate, ev.self_context, ev.cross_context))  # [B, L, H, D]
    applied = ev.applied.transpose(1, 2)[..., None] if per_head else ev.applied[..., None, None]
    text_in = torch.where(applied, c * (1 - g), c)  # rows (heads) without fusion keep the self context
    vision_in = torch.where(applied, x * g, torch.zeros_like(x))
    W = ev.o_proj_weight.double()
    text, vision = text_in.flatten(2) @ W.T, vision_in.flatten(2) @ W.T  # [B, L, hidden]
    torch.testing.assert_close(rec.text_out.double(), text, rtol=0, atol=1e-5)
    torch.testing.assert_close(rec.vision_out.double(), vision, rtol=0, atol=1e-5)
    torch.testing.assert_close(rec.text_norm.double(), text.norm(dim=-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rec.vision_norm.double(), vision.norm(dim=-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rec.mean.double(), g.mean(-1), rtol=0, atol=1e-7)
    # the inputs are left untouched (the split writes into its own buffer)
    assert torch.equal(ev.self_context, event(per_head).self_context)
