"""Owl3 (240728) adaptive gate: per-token/head gate values and the exact text-vs-vision split.

A gated hyper layer fuses, before ``o_proj``, ``fused = self ⊙ (1 − g) + cross ⊙ g`` on rows that see
an image (``applied``), and keeps ``fused = self`` elsewhere. ``o_proj`` is linear without bias, so
the attention output splits exactly into a text part ``o_proj(self ⊙ (1 − g))`` and a vision part
``o_proj(cross ⊙ g)`` (on non-applied rows: ``o_proj(self)`` and 0), in residual-stream units.

The event carries the layer's fp32 output ``o_proj(fused)``, so only one part per row needs a product:
the one whose input is smaller (in norm) is computed, the other is the output minus it. Its absolute
error is that of the output's rounding, a few eps of ``|output| ≤ |text| + |vision|``, i.e. a few eps
relative to the larger part. Without the output, or when the model runs in a low-precision dtype (its
output is then bf16-rounded), both parts are computed directly in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from owl_lab.models.observe import GateEvent


@dataclass
class GateRecord:
    """What one gated layer produced in one forward call (B = batch, L = rows, H = heads, D = head dim).

    Attributes:
        step, layer: decode step and decoder layer; call: which prefill (forward/generate call) it belongs to.
        query_index: [L] absolute sequence index of each row.
        valid: [B, L] bool, real (non-pad) rows.
        applied: [B, L] bool, rows where the fusion was applied (for at least one head).
        head_applied: [B, L, H] bool per head, only under a per-head knockout (else None).
        mean: [B, L, H] gate g averaged over the D channels.
        text_norm, vision_norm: [B, L] L2 norms of ``o_proj(self ⊙ (1 − g))`` and ``o_proj(cross ⊙ g)``.
        gate: [B, L, H, D] full gate vectors (only with ``gate_vectors=True``).
        text_out, vision_out: [B, L, hidden] the two parts of the attention output (``gate_vectors=True``).
    """

    step: int
    layer: int
    query_index: torch.Tensor
    valid: torch.Tensor
    applied: torch.Tensor
    mean: torch.Tensor
    text_norm: torch.Tensor
    vision_norm: torch.Tensor
    gate: torch.Tensor | None = None
    text_out: torch.Tensor | None = None
    vision_out: torch.Tensor | None = None
    call: int = 0
    head_applied: torch.Tensor | None = None


def _o_proj_linear(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight.detach().to(x.dtype))


def _usable_output(event: GateEvent, shape: tuple[int, int, int]) -> torch.Tensor | None:
    """The event's attention output [B, L, hidden] when "output − one part" is as exact as a direct
    product: an fp32 output of the expected shape (bf16 / fp16 outputs carry their own rounding of
    ~1e-3 relative; an fp64 output is split by the two direct fp32 products as before)."""
    out = getattr(event, "output", None)
    if out is None or out.dtype != torch.float32 or tuple(out.shape) != shape:
        return None
    return out.detach()


@torch.no_grad()
def summarize_gate(
    event: GateEvent, step: int, valid: torch.Tensor, keep_vectors: bool = False, call: int = 0
) -> GateRecord:
    """Reduce a :class:`GateEvent` to per-head channel means and the text/vision output split.

    Args:
        event: the gate event (gate, contexts [B, L, H, D], applied [B, L]).
        step: decode step of the forward call.
        valid: [B, L] bool real rows (from the layout).
        keep_vectors: also keep the full gate [B, L, H, D] and both output parts [B, L, hidden].
    """
    g = event.gate.detach().float()  # [B, L, H, D] (often a transposed view of the model's [B, H, L, D])
    B, L, H, D = g.shape
    self_ctx, cross_ctx = event.self_context.detach().float(), event.cross_context.detach().float()
    applied = event.applied.detach().bool()  # [B, L], or [B, H, L] under a per-head knockout
    head_applied = None
    if applied.dim() == 3:
        head_applied = applied.transpose(1, 2)  # [B, L, H]
        skip = ~head_applied[..., None]  # [B, L, H, 1] head rows where the fusion was not applied
        applied = head_applied.any(-1)  # [B, L]
    else:
        skip = ~applied[..., None, None]  # [B, L, 1, 1] rows where the fusion was not applied
    # Each o_proj input is written once into a contiguous [B, L, H, D] buffer (the GEMM's rows), so no
    # strided temporaries or reshape copies; at most two [B, L, hidden] alive.
    text_in = torch.empty(B, L, H, D, dtype=g.dtype, device=g.device)
    torch.sub(1.0, g, out=text_in).mul_(self_ctx)  # self ⊙ (1 − g)
    if bool(skip.any()):
        torch.where(skip, self_ctx, text_in, out=text_in)  # rows without fusion: the self context
    vision_in = torch.empty_like(text_in)
    torch.mul(cross_ctx, g, out=vision_in).masked_fill_(skip, 0.0)  # cross ⊙ g
    output = _usable_output(event, (B, L, event.o_proj_weight.shape[0]))
    if output is None:
        text_out = _o_proj_linear(event.o_proj_weight, text_in.view(B, L, H * D))  # [B, L, hidden]
        vision_out = _o_proj_linear(event.o_proj_weight, vision_in.view(B, L, H * D))
    else:  # one product: the smaller part per row, the larger one = output − smaller
        vision_small = (vision_in.flatten(2).norm(dim=-1) <= text_in.flatten(2).norm(dim=-1))[..., None]
        small_in = torch.where(vision_small[..., None], vision_in, text_in, out=text_in)  # [B, L, H, D]
        small = _o_proj_linear(event.o_proj_weight, small_in.view(B, L, H * D))  # [B, L, hidden]
        large = torch.sub(output, small)
        if keep_vectors:
            text_out = torch.where(vision_small, large, small)
            vision_out = torch.where(vision_small, small, large)
        else:  # only the norms are kept: select them, not the [B, L, hidden] parts
            text_out = vision_out = None
            small_norm, large_norm = small.norm(dim=-1), large.norm(dim=-1)
            vision_small = vision_small[..., 0]
            text_norm = torch.where(vision_small, large_norm, small_norm)
            vision_norm = torch.where(vision_small, small_norm, large_norm)
    del text_in, vision_in
    if text_out is not None:
        text_norm, vision_norm = text_out.norm(dim=-1), vision_out.norm(dim=-1)
    return GateRecord(
        step=step,
        call=call,
        layer=int(event.layer),
        query_index=event.query_index.detach().cpu().long(),
        valid=valid.cpu(),
        applied=applied.cpu(),
        head_applied=None if head_applied is None else head_applied.cpu(),
        mean=g.mean(-1).cpu(),
        text_norm=text_norm.cpu(),
        vision_norm=vision_norm.cpu(),
        gate=g.cpu().clone() if keep_vectors else None,
        text_out=text_out.cpu() if keep_vectors else None,
        vision_out=vision_out.cpu() if keep_vectors else None,
    )
