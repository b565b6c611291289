"""Owl2 visual abstractor: learnable-query → patch attention maps on the patch grid.

The abstractor's softmax runs over ``[queries ; CLS ; patches]`` at once (``key_image`` = -1, -2 and
the row-major patch index). We keep the patch probabilities reshaped to the grid (not renormalised)
and report the mass on CLS and on the other queries separately, so the three parts sum to 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hooks.attention import grouped_mass
from owl_lab.models.observe import AttentionEvent

KEY_QUERY, KEY_CLS = -1, -2


@dataclass
class AbstractorRecord:
    """One abstractor layer of one forward call (N = images, H = heads, Q = learnable queries).

    Attributes:
        layer: abstractor layer index.
        patch_probs: [N, H, Q, grid_h, grid_w] probability of each patch (row-major grid).
        query_mass, cls_mass, patch_mass: [N, H, Q] mass on the queries, on CLS and on all patches.
    """

    layer: int
    patch_probs: torch.Tensor
    query_mass: torch.Tensor
    cls_mass: torch.Tensor
    patch_mass: torch.Tensor


def _grid(event: AttentionEvent, n_patches: int) -> tuple[int, int]:
    grid = event.grid
    if grid is not None:
        gh, gw = (grid, grid) if isinstance(grid, int) else tuple(grid)
    else:
        gh = gw = math.isqrt(n_patches)
    if gh * gw != n_patches:
        raise ValueError(f"abstractor has {n_patches} patch keys, which is not a {gh}x{gw} grid")
    return int(gh), int(gw)


@torch.no_grad()
def summarize_abstractor(event: AttentionEvent, chunk_bytes=None) -> AbstractorRecord:
    """Full query→key probabilities of one abstractor softmax, split into patches / CLS / queries."""
    q = event.query
    N, H, Q, _ = q.shape
    key_image = event.key_image.detach().to("cpu", torch.long)  # [N, Lk]
    ids = key_image[0]
    if not bool((key_image == ids).all()):
        raise ValueError("abstractor key layout must be the same for every image")
    patch_cols = (ids >= 0).nonzero().squeeze(-1)
    patch_cols = patch_cols[ids[patch_cols].argsort()]  # row-major patch order
    gh, gw = _grid(event, patch_cols.numel())
    group = torch.full_like(key_image, -1)  # groups: 0 queries, 1 CLS, 2 patches
    group[key_image == KEY_QUERY] = 0
    group[key_image == KEY_CLS] = 1
    group[key_image >= 0] = 2
    res = grouped_mass(
        q,
        event.key,
        event.scale,
        event.allowed,
        group,
        3,
        probs=event.probs,
        select=torch.arange(Q),
        chunk_bytes=chunk_bytes,
    )
    probs = res.maps.float().cpu()  # [N, H, Q, Lk]
    patch = probs[..., patch_cols.to(probs.device)].reshape(N, H, Q, gh, gw)  # [N, H, Q, gh, gw]
    mass = res.mass.float().cpu()  # [N, H, Q, 3]
    return AbstractorRecord(
        layer=int(event.layer),
        patch_probs=patch,
        query_mass=mass[..., 0],
        cls_mass=mass[..., 1],
        patch_mass=mass[..., 2],
    )
