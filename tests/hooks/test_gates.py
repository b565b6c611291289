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


def with_output(ev: GateEvent, dtype=torch.float32) -> GateEvent:
    """The event as the model emits it after ``o_proj``: output = o_proj(fused) in the model's dtype."""
    applied = ev.applied.transpose(1, 2)[..., None] if ev.applied.dim() == 3 else ev.applied[..., None, None]
    c, x, g = ev.self_context, ev.cross_context, ev.gate
    fused = torch.where(applied, c * (1 - g) + x * g, c)  # [B, L, H, D]
    ev.output = (fused.flatten(2) @ ev.o_proj_weight.T).to(dtype)
    return ev


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_from_the_output_equals_the_two_direct_products(per_head, seed):
    """One product (the smaller part) and output − it: the same split as the two direct products."""
    ev = event(per_head, seed)
    rows = torch.logspace(-1, 1, 7)[None, :, None, None]  # vision part larger in some rows, smaller in others
    ev.cross_context = ev.cross_context * rows
    valid = torch.ones(2, 7, dtype=torch.bool)
    direct = summarize_gate(ev, step=0, valid=valid, keep_vectors=True)
    one = summarize_gate(with_output(ev), step=0, valid=valid, keep_vectors=True)
    norms_only = summarize_gate(ev, step=0, valid=valid)
    vision_larger = direct.vision_norm > direct.text_norm
    assert vision_larger[direct.applied].any() and (~vision_larger[direct.applied]).any()
    atol = 8 * torch.finfo(torch.float32).eps * float(ev.output.abs().max())  # a few eps of the output
    for part in ("text_out", "vision_out"):
        torch.testing.assert_close(getattr(one, part), getattr(direct, part), rtol=0, atol=atol)
    for r in (one, norms_only):
        torch.testing.assert_close(r.text_norm, direct.text_norm, rtol=1e-6, atol=atol)
        torch.testing.assert_close(r.vision_norm, direct.vision_norm, rtol=1e-6, atol=atol)
    # rows (heads) without fusion: the vision part is exactly 0 and the text part the output itself
    rows = ~one.applied
    assert (one.vision_out[rows] == 0).all() and torch.equal(one.text_out[rows], ev.output[rows])


def test_a_low_precision_output_falls_back_to_the_direct_products():
    ev = event(False)
    direct = summarize_gate(ev, step=0, valid=torch.ones(2, 7, dtype=torch.bool), keep_vectors=True)
    bf16 = summarize_gate(
        with_output(ev, torch.bfloat16), step=0, valid=torch.ones(2, 7, dtype=torch.bool), keep_vectors=True
    )
    assert torch.equal(bf16.text_out, direct.text_out) and torch.equal(bf16.vision_out, direct.vision_out)
    ev.output = torch.full_like(with_output(ev).output, float("nan"))  # proof the fp32 output is used
    used = summarize_gate(ev, step=0, valid=torch.ones(2, 7, dtype=torch.bool), keep_vectors=True)
    assert used.text_out.isnan().any()
