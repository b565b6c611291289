"""Where do the Owl2 abstractor's learnable queries look? Per-query numbers from ``rec.abstractor_maps``.

Input everywhere: ``maps`` [abstractor_layer, image, head, query, grid_h, grid_w], the patch
probabilities the hooks record (each query's softmax also spends mass on CLS and on the queries, so a
map sums to the query's *patch share*, not to 1). Conventions (our choices, stated once):

* heads are averaged first, then each map is **renormalised over the patches**, so the spatial
  numbers describe *where* a query looks, independent of how much it looks at patches at all;
* a patch belongs to the board cell (:data:`owl_lab.synth.vocab.GRID` × GRID, row-major) that holds
  its centre. With an 8×8 patch grid and a 3×3 board the cells hold 9, 6 or 4 patches, so a cell's
  mass is compared with its **area share** (``lift`` = mass / area share; 1 = a uniform map);
* the peak cell is the cell with the largest lift (a density peak, so small cells are not penalised).
"""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pandas as pd
import torch

from owl_lab.synth.vocab import GRID

STAT_COLUMNS = [
    "abstractor_layer",
    "image",
    "query",
    "patch_share",
    "entropy",
    "com_row",
    "com_col",
    "peak_cell",
    "peak_row",
    "peak_col",
    "peak_share",
    "peak_lift",
    "occupied",
]


def _check_maps(maps) -> torch.Tensor:
    maps = torch.as_tensor(maps, dtype=torch.float64) if not torch.is_tensor(maps) else maps.double()
    if maps.dim() != 6:
        raise ValueError(
            "abstractor maps must be [abstractor_layer, image, head, query, grid_h, grid_w]; "
            f"got {maps.dim()} dims {tuple(maps.shape)}"
        )
    return maps


def patch_cells(grid_h: int, grid_w: int, board: int = GRID) -> torch.Tensor:
    """[grid_h, grid_w] long: the board cell (row-major, 0..board²-1) holding each patch centre."""
    if grid_h < board or grid_w < board:
        raise ValueError(f"a {grid_h}x{grid_w} patch grid cannot cover a {board}x{board} board")
    rows = ((torch.arange(grid_h) + 0.5) * board / grid_h).floor().long()  # [gh]
    cols = ((torch.arange(grid_w) + 0.5) * board / grid_w).floor().long()  # [gw]
    return rows[:, None] * board + cols[None, :]


def cell_mass(maps, board: int = GRID) -> torch.Tensor:
    """Head-mean, patch-renormalised maps summed per board cell: [A, N, Q, board²] (rows sum to 1)."""
    maps = _check_maps(maps)
    m = maps.mean(2)  # [A, N, Q, gh, gw]
    m = m / m.sum((-2, -1), keepdim=True).clamp_min(1e-30)
    cells = patch_cells(m.shape[-2], m.shape[-1], board).flatten()  # [gh*gw]
    flat = m.flatten(-2)  # [A, N, Q, gh*gw]
    out = flat.new_zeros(*flat.shape[:-1], board * board)
    return out.index_add_(-1, cells, flat)


def query_map_stats(maps, scenes=None, board: int = GRID) -> pd.DataFrame:
    """One row per (abstractor_layer, image, query) with the columns of :data:`STAT_COLUMNS`.

    ``patch_share``: mass on patches (mean over heads, before renormalising); ``entropy``: spatial
    entropy of the renormalised map over log(#patches) (1 = uniform); ``com_row``/``com_col``: centre
    of mass in [0, 1] of the image height/width; ``peak_*``: the density-peak board cell, its mass and
    lift; ``occupied``: whether a scene object sits in the peak cell (needs ``scenes``, the
    :class:`~owl_lab.synth.Scene` of each image in order; else NaN).
    """
    maps = _check_maps(maps)
    A, N, _, Q, gh, gw = maps.shape
    if scenes is not None and len(scenes) != N:
        raise ValueError(f"got {len(scenes)} scenes for {N} images")
    mean = maps.mean(2)  # [A, N, Q, gh, gw]
    share = mean.sum((-2, -1))  # [A, N, Q]
    p = mean / share[..., None, None].clamp_min(1e-30)
    plogp = torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))
    entropy = -plogp.sum((-2, -1)) / math.log(gh * gw)
    rows_c = (torch.arange(gh, dtype=p.dtype) + 0.5) / gh
    cols_c = (torch.arange(gw, dtype=p.dtype) + 0.5) / gw
    com_row = (p.sum(-1) * rows_c).sum(-1)  # [A, N, Q]
    com_col = (p.sum(-2) * cols_c).sum(-1)
    cells = cell_mass(maps, board)  # [A, N, Q, board²]
    area = torch.bincount(patch_cells(gh, gw, board).flatten(), minlength=board * board).to(p.dtype) / (
        gh * gw
    )
    lift = cells / area
    peak = lift.argmax(-1)  # [A, N, Q]
    a, n, q = (
        t.flatten() for t in torch.meshgrid(torch.arange(A), torch.arange(N), torch.arange(Q), indexing="ij")
    )
    peak_f = peak.flatten()
    occupied = np.full(peak_f.numel(), np.nan)
    if scenes is not None:
        occ = torch.tensor(
            [[s.at(c // board, c % board) is not None for c in range(board * board)] for s in scenes]
        )
        occupied = occ[n, peak_f].numpy().astype(float)
    return pd.DataFrame(
        {
            "abstractor_layer": a.numpy(),
            "image": n.numpy(),
            "query": q.numpy(),
            "patch_share": share.flatten().numpy(),
            "entropy": entropy.flatten().numpy(),
            "com_row": com_row.flatten().numpy(),
            "com_col": com_col.flatten().numpy(),
            "peak_cell": peak_f.numpy(),
            "peak_row": (peak_f // board).numpy(),
            "peak_col": (peak_f % board).numpy(),
            "peak_share": cells.flatten(0, 2)[torch.arange(peak_f.numel()), peak_f].numpy(),
            "peak_lift": lift.flatten(0, 2)[torch.arange(peak_f.numel()), peak_f].numpy(),
            "occupied": occupied,
        }
    )[STAT_COLUMNS]


def _consistency(peaks: np.ndarray) -> float:
    """peaks [N, Q] → mean over queries of the fraction of images at that query's most common cell."""
    return float(
        np.mean(
            [Counter(peaks[:, j].tolist()).most_common(1)[0][1] / len(peaks) for j in range(peaks.shape[1])]
        )
    )


def specialisation(
    stats: pd.DataFrame, scenes=None, board: int = GRID, shuffles: int = 200, seed: int = 0
) -> pd.DataFrame:
    """Does each query look at its own place? One row per abstractor layer.

    Columns:
        peak_lift: mean peak-cell lift (1 = a uniform map; higher = more concentrated).
        consistency: per query, the fraction of images whose peak cell is the query's most common one,
            averaged over queries.
        consistency_shuffled: the same after randomly permuting the query labels within each image
            (``shuffles`` seeded draws, averaged): what consistency would be if queries were
            interchangeable. ``consistency > consistency_shuffled`` = queries differ in where they look.
        consistency_p: permutation p-value, (1 + #shuffles at least as consistent) / (1 + shuffles).
        distinct_cells: how many different "most common" peak cells the queries have.
        object_hit / object_chance: share of peaks on a cell with an object, and the chance of that for
            a cell drawn uniformly (mean objects per image / board²); needs ``scenes`` (else NaN).
        object_coverage: per image, the fraction of its objects that are the peak of some query,
            averaged over images (do the queries share the objects out?); needs ``scenes``.
    """
    rng = random.Random(seed)
    out = []
    for layer, rows in stats.groupby("abstractor_layer"):
        peaks = rows.pivot(index="image", columns="query", values="peak_cell").to_numpy()  # [N, Q]
        shuffled = []
        for _ in range(shuffles):
            perm = np.array([rng.sample(range(peaks.shape[1]), peaks.shape[1]) for _ in range(len(peaks))])
            shuffled.append(_consistency(np.take_along_axis(peaks, perm, axis=1)))
        observed = _consistency(peaks)
        modal = [Counter(peaks[:, j].tolist()).most_common(1)[0][0] for j in range(peaks.shape[1])]
        chance = coverage = np.nan
        if scenes is not None:
            if len(scenes) != len(peaks):
                raise ValueError(f"got {len(scenes)} scenes for {len(peaks)} images")
            chance = float(np.mean([len(s.objects) for s in scenes])) / (board * board)
            coverage = float(
                np.mean(
                    [
                        len({c for c in row.tolist() if s.at(c // board, c % board) is not None})
                        / len(s.objects)
                        for row, s in zip(peaks, scenes, strict=True)
                    ]
                )
            )
        out.append(
            {
                "abstractor_layer": int(layer),
                "peak_lift": float(rows["peak_lift"].mean()),
                "consistency": observed,
                "consistency_shuffled": float(np.mean(shuffled)),
                "consistency_p": (1 + sum(x >= observed - 1e-12 for x in shuffled)) / (1 + shuffles),
                "distinct_cells": len(set(modal)),
                "object_hit": float(rows["occupied"].mean()),
                "object_chance": chance,
                "object_coverage": coverage,
            }
        )
    return pd.DataFrame(out).set_index("abstractor_layer")


def per_image_specialisation(stats: pd.DataFrame, scenes, board: int = GRID, layer: int = -1) -> pd.DataFrame:
    """The numbers of :func:`specialisation`, per image, for one abstractor layer (so they get standard
    errors).

    Columns (one row per image):
        own_cell: fraction of the queries whose peak is that query's most common peak cell (over all images).
        object_hit: fraction of the queries whose peak cell holds an object.
        object_chance: the chance of that for a uniformly drawn cell (objects / board²).
        peak_lift: mean peak-cell lift over the queries (1 = uniform).
    """
    layers = sorted(stats["abstractor_layer"].unique())
    rows = stats[stats["abstractor_layer"] == layers[layer]]
    peaks = rows.pivot(index="image", columns="query", values="peak_cell")  # [N, Q]
    if len(scenes) != len(peaks):
        raise ValueError(f"got {len(scenes)} scenes for {len(peaks)} images")
    modal = peaks.mode().iloc[0]  # each query's most common peak cell (smallest on ties)
    return pd.DataFrame(
        {
            "own_cell": (peaks == modal).mean(axis=1),
            "object_hit": rows.groupby("image")["occupied"].mean(),
            "object_chance": [len(s.objects) / (board * board) for s in scenes],
            "peak_lift": rows.groupby("image")["peak_lift"].mean(),
        }
    )


__all__ = [
    "STAT_COLUMNS",
    "patch_cells",
    "cell_mass",
    "per_image_specialisation",
    "query_map_stats",
    "specialisation",
]
