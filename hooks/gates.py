"""Owl3 (240728) adaptive gate: per-token/head gate values and the exact text-vs-vision split.

A gated hyper layer fuses, before ``o_proj``, ``fused = self ⊙ (1 − g) + cross ⊙ g`` on rows that see
an image (``applied``), and keeps ``fused = self`` elsewhere. ``o_proj`` is linear without bias, so
the attention output splits exactly into a text part ``o_proj(self ⊙ (1 − g))`` and a vision part
``o_proj(cross ⊙ g)`` (on non-applied rows: ``o_proj(self)`` and 0), in residual-stream units.
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
    # strided temporaries or reshape copies; one part at a time, at most two [B, L, hidden] alive.
    part = torch.empty(B, L, H, D, dtype=g.dtype, device=g.device)
    torch.sub(1.0, g, out=part).mul_(self_ctx)  # self ⊙ (1 − g)
    if bool(skip.any()):
        torch.where(skip, self_ctx, part, out=part)  # rows without fusion: the self context
    text_out = _o_proj_linear(event.o_proj_weight, part.view(B, L, H * D))  # [B, L, hidden]
    torch.mul(cross_ctx, g, out=part).masked_fill_(skip, 0.0)  # cross ⊙ g
    vision_out = _o_proj_linear(event.o_proj_weight, part.view(B, L, H * D))  # [B, L, hidden]
    del part
    return GateRecord(
        step=step,
        call=call,
        layer=int(event.layer),
        query_index=event.query_index.detach().cpu().long(),
        valid=valid.cpu(),
        applied=applied.cpu(),
        head_applied=None if head_applied is None else head_applied.cpu(),
        mean=g.mean(-1).cpu(),
        text_norm=text_out.norm(dim=-1).cpu(),
        vision_norm=vision_out.norm(dim=-1).cpu(),
        gate=g.cpu().clone() if keep_vectors else None,
        text_out=text_out.cpu() if keep_vectors else None,
        vision_out=vision_out.cpu() if keep_vectors else None,
    )
