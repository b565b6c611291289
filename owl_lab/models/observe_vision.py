"""The ``vision`` observation event: one vision-encoder self-attention softmax (both families).

Each vision attention module owns a ``hook_attn`` :class:`~owl_lab.models.observe.HookPoint`. Both
Owl2's ViT and Owl3's SigLIP go through the attention core (:func:`owl_lab.models.attention.attention`),
which builds the event from :func:`vision_key_facts`; :func:`vision_event` builds the same event by hand
(tests, and encoders observed outside the core). ``hooks.vision`` reduces it.

Key layout, like the abstractor's: ``key_image`` is -2 for the CLS token (Owl2's ViT; SigLIP has
none) and the row-major patch index for patches; ``key_position`` is the token index in the encoder's
sequence; ``grid`` is the patch grid.
"""

from __future__ import annotations

import torch

from owl_lab.models.attention import Allowed
from owl_lab.models.observe import AttentionEvent

KEY_CLS = -2


def vision_key_facts(n: int, t: int, grid: tuple[int, int], has_cls: bool, device) -> dict:
    """Event fields of an encoder softmax over ``t`` = cls + gh*gw tokens for ``n`` images."""
    cls = int(has_cls)
    if t != cls + grid[0] * grid[1]:
        raise ValueError(f"vision attention has {t} tokens; expected {cls} CLS + a {grid[0]}x{grid[1]} grid")
    key_image = torch.cat([torch.full((cls,), KEY_CLS, device=device), torch.arange(t - cls, device=device)])
    return dict(
        query_index=torch.arange(t, device=device),
        key_position=torch.arange(t, device=device).expand(n, -1),
        key_image=key_image.expand(n, -1),
        grid=tuple(grid),
    )


def vision_event(
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    grid: tuple[int, int],
    has_cls: bool,
    probs: torch.Tensor | None = None,
) -> AttentionEvent:
    """Event for an unmasked encoder softmax: query/key [N, h, T, hd]; ``probs`` [N, h, T, T] or None."""
    n, _, t, _ = query.shape
    return AttentionEvent(
        layer=layer,
        kind="vision",
        query=query,
        key=key,
        scale=scale,
        allowed=Allowed((n, t, t), fast="all", device=query.device),
        probs=probs,
        **vision_key_facts(n, t, grid, has_cls, query.device),
    )
