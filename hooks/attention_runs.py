"""Summing probability columns into key groups: the maximal runs of equal group id per sample.

Keys of a group usually form a few contiguous runs (BOS, text, one image's rows …), so a group's
mass is one sum per run; back-to-back runs of one length (Owl3's image keys, T each) are one reshaped
sum; many irregular runs go through numpy's ``add.reduceat``. Used by every path of
:func:`hooks.attention.grouped_mass`.
"""

from __future__ import annotations

import numpy as np
import torch

_LOOP_RUNS = 8  # up to this many contiguous runs per sample: one sum per run; else reduceat / one-hot


def group_runs(key_group: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per sample, the maximal runs of equal group id (group ≥ 0 only) as arrays (start, end, group)."""
    runs = []
    for row in key_group.cpu().numpy():
        change = np.flatnonzero(np.diff(row)) + 1
        starts = np.concatenate([[0], change])
        ends = np.concatenate([change, [row.size]])
        keep = row[starts] >= 0 if row.size else np.zeros(0, dtype=bool)
        runs.append((starts[keep], ends[keep], row[starts[keep]]))
    return runs


def uniform_run_length(key_group: torch.Tensor) -> int | None:
    """T when key j is in group j // T in every sample (keys in back-to-back runs of T, groups in order:
    Owl3's image keys, image n = keys nT..nT+T-1), else None. key_group: [B, Lk]."""
    B, Lk = key_group.shape
    if Lk == 0:
        return None
    T = int((key_group[0] == key_group[0, 0]).sum())
    if T == 0 or Lk % T:
        return None
    expected = torch.arange(Lk, device=key_group.device) // T
    return T if bool((key_group == expected).all()) else None


def _tiled(s: np.ndarray, e: np.ndarray) -> bool:
    """True when the runs are back to back and all of one length (e.g. Owl3's image keys: T each)."""
    return s.size > 1 and bool((s[1:] == e[:-1]).all()) and bool(((e - s) == (e[0] - s[0])).all())


def reduce_runs(p, runs_b, k0, k1, out_b, reducer: str) -> None:
    """out_b [H, c, G] += Σ over each run of p [H, c, Lk'] (p holds key columns k0..k1-1).

    ``loop``: one vectorised sum per run (best for a handful of runs). ``tiles``: runs back to back
    and of one length T (Owl3 image keys) are one ``view(..., n, T).sum(-1)``; runs clipped by the
    chunk's key range at either end are looped. ``reduceat``: all runs in one pass with numpy's
    ``add.reduceat`` over the run boundaries (CPU; many irregular runs, e.g. 64 placeholders).
    """
    starts, ends, groups = runs_b
    s, e = np.maximum(starts, k0) - k0, np.minimum(ends, k1) - k0  # clip the runs to the chunk's keys
    inside = s < e
    s, e, groups = s[inside], e[inside], groups[inside]
    if reducer in ("auto", "tiles") and s.size > 1:  # back-to-back runs of one length: one reshaped sum
        for lo, hi in ((0, s.size), (1, s.size), (0, s.size - 1), (1, s.size - 1)):  # clipped ends looped
            if _tiled(s[lo:hi], e[lo:hi]):
                H, c, _ = p.shape
                n, T = hi - lo, int(e[lo] - s[lo])
                sums = p[..., int(s[lo]) : int(e[hi - 1])].view(H, c, n, T).sum(-1)  # [H, c, n]
                g = groups[lo:hi]
                if bool((np.diff(g) == 1).all()):  # images in order: one slice, no scatter
                    out_b[..., int(g[0]) : int(g[0]) + n] += sums
                else:
                    out_b.index_add_(-1, torch.from_numpy(g).to(out_b.device), sums)
                edges = [i for i in (0, s.size - 1) if not lo <= i < hi]
                for i in edges:
                    out_b[..., int(groups[i])] += p[..., int(s[i]) : int(e[i])].sum(-1)
                return
    if reducer == "tiles":
        reducer = "loop" if s.size <= _LOOP_RUNS else "reduceat"
    if reducer == "auto":
        reducer = "loop" if s.size <= _LOOP_RUNS else "reduceat"
    if reducer == "loop":
        for si, ei, gi in zip(s.tolist(), e.tolist(), groups.tolist(), strict=True):
            out_b[..., gi] += p[..., si:ei].sum(-1)
        return
    if s.size == 0:
        return
    H, c, width = p.shape
    bounds = np.unique(np.concatenate([s, e[e < width]]))  # every run starts a segment
    sums = np.add.reduceat(p.reshape(H * c, width).numpy(), bounds, axis=1)  # [H*c, n_segments]
    picked = torch.from_numpy(sums[:, np.searchsorted(bounds, s)])  # [H*c, n_runs]
    out_b.index_add_(-1, torch.from_numpy(groups), picked.view(H, c, -1))
