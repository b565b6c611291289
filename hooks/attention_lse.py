"""The logsumexp paths of :func:`hooks.attention.grouped_mass`: group masses from the model's own softmax
normaliser instead of a second softmax.

The SDPA kernel hands out ``lse`` [B, H, Lq], the log of each row's softmax normaliser
(:func:`owl_lab.models.attention.sdpa_with_logsumexp`). Every probability is then one exponential,
``p = exp(scale q·k - lse)``, with no max / sum / divide pass over the row. Two ways to use it:

* **dominant group** (:func:`lse_chunk`, :func:`lse_fast`): one group holds most keys (text, in Owl2 /
  LLaVA / Owl3 self-attention). Only the keys outside it are scored; its mass is one minus theirs (an
  exact 0 where a row sees none of its keys). At L=4096 that is ~66 score columns instead of ~2048.
* **no dominant group** (:func:`lse_tiles`; Owl3's cross attention over 64 equal images): every
  allowed key is scored, key tile by key tile so a tile of scores stays in cache while it is
  exponentiated and summed into groups. The exponential is ``exp2`` of scores pre-multiplied by
  log2(e) (several times cheaper than ``exp`` on CPU), and each row is divided by its own total at the
  end, so ``lse`` only shifts the exponent (no overflow) and the masses are as exact as a softmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hooks.attention_runs import group_runs, reduce_runs

_LOG2E = 1.0 / math.log(2.0)
_TILE_BYTES = 2 << 20  # one key tile of scores [B, H, c, w] (1-4 MB measured alike on the 64-image bench)
_MIN_TILE_KEYS = 256  # narrower tiles make the score matmul thin


# ---- dominant group: scores of the small groups only ------------------------------------------------


@dataclass
class LsePlan:
    """What :func:`lse_chunk` needs for every chunk (built once per call).

    big: the group with the most keys (its mass is 1 - the rest), or -1 when no key has a group.
    cols: [n_e] sorted key columns outside ``big`` in at least one sample (computed explicitly).
    key_t: [B, H_kv, D, n_e] their keys, in the compute dtype. not_big: [B, n_e] those columns that
    are outside ``big`` in each sample (their mass is the rest). runs: per sample, the group runs over
    the explicit columns (in ``cols`` coordinates).
    """

    big: int
    cols: torch.Tensor
    key_t: torch.Tensor
    not_big: torch.Tensor
    runs: list


def lse_plan(key_group: torch.Tensor, key_t: torch.Tensor, cdtype: torch.dtype) -> LsePlan:
    """key_group [B, Lk] (-1 = no group), key_t [B, H_kv, D, Lk] → the plan of the dominant-group path."""
    kg = key_group.to(key_t.device, torch.long)
    grouped = kg[kg >= 0]
    big = int(torch.bincount(grouped).argmax()) if grouped.numel() else -1
    cols = (kg != big).any(0).nonzero().squeeze(-1)  # [n_e]
    kg_e = kg[:, cols]  # [B, n_e]
    kt = key_t.index_select(-1, cols).to(cdtype)  # [B, H_kv, D, n_e]
    return LsePlan(big, cols, kt, kg_e != big, group_runs(kg_e))


def lse_chunk(plan: LsePlan, query, logsumexp, scale, q0, q1, e0, e1, a, allowed_n, out) -> None:
    """out [B, H, c, G] = group masses of query rows q0..q1-1 from the logsumexp.

    e0, e1: the explicit columns ``plan.cols[e0:e1]`` the rows may see; a: bool [B, (H,) c, e1 - e0]
    which of them each row may see; allowed_n: [B, (H,) c] how many keys each row may see in all.
    Every explicit column's probability is ``exp(scale q·k - lse)`` (0 where not allowed); the big
    group gets ``1 - Σ`` of the columns outside it, exact up to rounding because ``lse`` normalises
    over exactly the allowed keys (and an exact 0 where the row may see none of the big group's keys).
    """
    B, H, _, D = query.shape
    c = q1 - q0
    cdtype = plan.key_t.dtype
    if e1 > e0:
        Hkv = plan.key_t.shape[1]
        qc = query[:, :, q0:q1].detach().to(cdtype).reshape(B, Hkv, H // Hkv * c, D)
        p = torch.matmul(qc * scale, plan.key_t[..., e0:e1]).view(B, H, c, e1 - e0)  # [B, H, c, n]
        p.sub_(logsumexp[:, :, q0:q1, None].to(cdtype)).exp_()
        p.masked_fill_(~(a if a.dim() == 4 else a[:, None]), 0.0)
        for b in range(B):
            reduce_runs(p[b], plan.runs[b], e0, e1, out[b], "auto")
    if plan.big < 0:
        return
    if e1 > e0:
        not_big = plan.not_big[:, e0:e1]  # [B, n]
        a_not_big = a & (not_big[:, None, None] if a.dim() == 4 else not_big[:, None])
        n_not_big = a_not_big.view(torch.uint8).sum(-1, dtype=torch.int32)
        allowed_n = allowed_n - n_not_big  # allowed keys of the big group
        rest = torch.matmul(p, not_big[:, None, :, None].to(cdtype)).squeeze(-1)  # [B, H, c]
        big = (1.0 - rest).clamp_(min=0.0)
    else:
        big = torch.ones(B, H, c, dtype=out.dtype, device=out.device)
    has_big = allowed_n > 0
    out[..., plan.big] = big.masked_fill_(~(has_big if has_big.dim() == 3 else has_big[:, None]), 0.0)


def lse_fast(plan: LsePlan, query, logsumexp, scale, fast: str, Lk: int, row_mask, rows: int, mass):
    """The dominant-group path for a ``fast`` mask (``causal``: key j visible to query i iff
    j <= i + Lk - Lq; ``all``), with every mask fact computed from positions instead of bool tensors.
    Fills ``mass`` [B, H, Lq, G]; returns (has_keys [B, Lq], seen [B, Lk])."""
    B, H, Lq, _ = query.shape
    device = mass.device
    offset = Lk - Lq if fast == "causal" else Lk  # row i sees keys < i + offset + 1 (all: every key)
    last_key = torch.arange(Lq, device=device) + offset  # [Lq] last visible key of each row
    last_key = last_key.clamp(max=Lk - 1)
    has_keys = (last_key >= 0)[None].expand(B, Lq).clone()
    counted = has_keys if row_mask is None else has_keys & row_mask.to(device)
    reach = torch.where(counted, last_key[None], -1).amax(-1)  # [B] last key a counted row sees
    seen = torch.arange(Lk, device=device)[None] <= reach[:, None]
    cols = plan.cols
    for q0 in range(0, Lq, rows):
        q1 = min(Lq, q0 + rows)
        last = last_key[q0:q1]  # [c]
        e1 = int(torch.searchsorted(cols, last[-1:].clamp(min=-1) + 1))
        a = (cols[None, :e1] <= last[:, None])[None].expand(B, -1, -1)  # [B, c, e1]
        allowed_n = (last + 1).clamp(min=0).to(torch.int32)[None].expand(B, -1)  # [B, c]
        lse_chunk(plan, query, logsumexp, scale, q0, q1, 0, e1, a, allowed_n, mass[:, :, q0:q1])
    return has_keys, seen


# ---- no dominant group: every allowed key, tile by tile ----------------------------------------------


def tile_edges(k0: int, k1: int, width: int, run_ends) -> list[int]:
    """Key tile boundaries k0 < … < k1, tiles about ``width`` keys wide, each end snapped back to a run
    boundary (``run_ends``: sorted numpy array) when one lies inside the tile, so runs are rarely split."""
    edges = [k0]
    while edges[-1] < k1:
        lo, end = edges[-1], min(k1, edges[-1] + width)
        if end < k1:
            i = int(run_ends.searchsorted(end, side="right")) - 1  # last run end <= end
            if i >= 0 and run_ends[i] > lo:
                end = int(run_ends[i])
        edges.append(end)
    return edges


def lse_tiles(query, key_t, logsumexp, scale, q0, q1, k0, k1, allow, runs, out, run_length=None) -> None:
    """out [B, H, c, G'] += unnormalised group sums ``Σ_k exp(scale q·k - lse)`` of query rows q0..q1-1
    over keys k0..k1-1, one key tile at a time (disallowed keys count 0).

    query: [B, H, Lq, D]; key_t: [B, H_kv, D, Lk]; logsumexp: [B, H, Lq]; allow: bool [B, (H,) c, Lk]
    (the chunk's mask rows, per head or not); runs: per sample (starts, ends, groups) as from
    :func:`~hooks.attention_runs.group_runs`, every key the rows may see in some run (so that the
    caller can divide each row by its total); run_length: T when key j is in group j // T in every
    sample (:func:`~hooks.attention_runs.uniform_run_length`), then tiles are whole runs and each is
    summed in one reshape for the whole batch. The scores are computed as
    ``exp2(log2(e) scale q·k - log2(e) lse)`` by one ``baddbmm`` per tile into a reused buffer.
    """
    B, H, _, D = query.shape
    Hkv, c = key_t.shape[1], q1 - q0
    cdtype = out.dtype
    rows = H // Hkv * c  # query rows per key head: head h = j * rep + r
    qc = (query[:, :, q0:q1].detach().to(cdtype) * (scale * _LOG2E)).reshape(B * Hkv, rows, D)
    shift = (logsumexp[:, :, q0:q1].to(cdtype) * -_LOG2E).reshape(B * Hkv, rows, 1)
    elem = torch.finfo(cdtype).bits // 8
    width = max(_MIN_TILE_KEYS, _TILE_BYTES // max(1, B * H * c * elem))
    T = run_length if run_length and k0 % run_length == 0 and k1 % run_length == 0 else None
    if T:
        width = max(T, width // T * T)  # tiles of whole runs
    buf = torch.empty(B * H * c * min(width, k1 - k0), dtype=cdtype, device=out.device)
    sub = allow if allow.dim() == 4 else allow[:, None]  # [B, 1 | H, c, Lk]
    u8 = allow.view(torch.uint8)
    ragged = u8.amin(-2).amin(0) == 0  # [(H,) Lk] keys some row of the chunk may not see
    ragged = (ragged.any(0) if ragged.dim() == 2 else ragged).nonzero()
    r0, r1 = (int(ragged[0]), int(ragged[-1]) + 1) if ragged.numel() else (0, 0)  # their column span
    edges = list(range(k0, k1, width)) + [k1] if T else tile_edges(k0, k1, width, runs[0][1])
    for t0, t1 in zip(edges[:-1], edges[1:], strict=True):
        w = t1 - t0
        p = buf[: B * H * c * w].view(B * Hkv, rows, w)
        torch.baddbmm(shift, qc, key_t[..., t0:t1].to(cdtype).reshape(B * Hkv, D, w), out=p)
        p.exp2_()
        p = p.view(B, H, c, w)
        a, b = max(r0, t0), min(r1, t1)
        if a < b:  # zero the keys a row may not see (only over the span of columns where rows differ)
            p[..., a - t0 : b - t0].masked_fill_(~sub[..., a:b], 0.0)
        if T:  # group g = keys gT..gT+T-1: one reshaped sum for the whole tile and batch
            out[..., t0 // T : t1 // T] += p.view(B, H, c, w // T, T).sum(-1)
        else:
            for i in range(B):
                reduce_runs(p[i], runs[i], t0, t1, out[i], "auto")
