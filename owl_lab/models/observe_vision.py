"""The ``vision`` observation event: one vision-encoder self-attention softmax (both families).

Each vision attention module owns a ``hook_attn`` :class:`~owl_lab.models.observe.HookPoint` and,
only when a hook is attached, hands it an :class:`~owl_lab.models.observe.AttentionEvent` of kind
``vision`` built here (``hooks.vision`` reduces it). Key layout, like the abstractor's: ``key_image``
is -2 for the CLS token (Owl2's ViT; SigLIP has none) and the row-major patch index for patches.
"""
from __future__ import annotations

import torch

from owl_lab.models.observe import AttentionEvent

KEY_CLS = -2


def vision_event(layer: int, query: torch.Tensor, key: torch.Tensor, scale: float, grid: tuple[int, int],
                 has_cls: bool, probs: torch.Tensor | None = None) -> AttentionEvent:
    """Event for an unmasked encoder softmax: query/key [N, h, T, hd] (T = cls + gh*gw tokens).

    ``probs`` [N, h, T, T] when the module materialised them (eager path), else None.
    """
    n, _, t, _ = query.shape
    dev = query.device
    cls = int(has_cls)
    if t != cls + grid[0] * grid[1]:
        raise ValueError(f"vision attention has {t} tokens; expected {cls} CLS + a {grid[0]}x{grid[1]} grid")
    key_image = torch.cat([torch.full((cls,), KEY_CLS, device=dev), torch.arange(t - cls, device=dev)])
    return AttentionEvent(
        layer=layer, kind="vision", query=query, key=key, scale=scale,
        query_index=torch.arange(t, device=dev),
        key_position=torch.full((n, t), -1, device=dev),
        key_image=key_image.expand(n, -1),
        allowed=lambda q0, q1: torch.ones(n, q1 - q0, t, dtype=torch.bool, device=dev),
        probs=probs, extra={"grid": tuple(grid), "has_cls": bool(has_cls)},
    )
