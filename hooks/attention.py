"""Exact attention mass per key group, computed by query chunks without materialising [B, H, L, L].

For one softmax ``P = softmax(scale · q kᵀ masked by allowed)`` and a partition of the keys into G
groups (``key_group`` [B, Lk]), the mass of query i on group g is ``Σ_{k in g} P[i, k]``. We compute
it chunk by chunk over queries. For c queries:

1. scores S [B, H, c, Lk'] = scale · q kᵀ, only over the key range Lk' any of the c queries may see
   (causal ⇒ about half of the keys on average);
2. masked with -inf, but only on the columns where ``allowed`` is ragged (for a causal chunk that is
   the c×c diagonal block; fully visible columns are left alone);
3. softmax in place (same buffer);
4. reduced into the groups: keys of a group usually form a few contiguous runs (BOS, text, one
   image's rows …), so we sum each run; with many runs we fall back to one matmul with a one-hot.

When the model's SDPA kernel handed out its softmax normaliser (``logsumexp``, see
:func:`owl_lab.models.attention.sdpa_with_logsumexp`), steps 2–3 need no second softmax
(:mod:`hooks.attention_lse`): with one dominant group (text, in Owl2 / LLaVA / Owl3 self-attention)
only the keys outside it are scored and its mass is one minus theirs; without one (Owl3's cross
attention over equal images) every allowed key is scored key tile by key tile, exponentiated against
the logsumexp and each row divided by its own total.

Only one chunk tensor is alive at a time. Its default size is the event's own q tensor clamped to
[1 MB, 8 MB] (small enough to stay in cache, large enough for efficient matmuls), but never fewer
than 64 query rows (a thin [rows, D] × [D, Lk] matmul runs far below the CPU's peak).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hooks.attention_lse import lse_chunk, lse_fast, lse_plan, lse_tiles
from hooks.attention_runs import group_runs, reduce_runs, uniform_run_length

__all__ = ["REDUCERS", "MassResult", "chunk_rows", "group_runs", "grouped_mass"]

_MIN_AUTO_BYTES = 1 << 20
_MAX_AUTO_BYTES = 8 << 20
_MIN_AUTO_ROWS = 64  # (Owl3 with 64 images: 16 rows × 4096 image keys would fill 2 MB)
_MIN_TILE_ROWS = 128  # tiled path: 128 queries × 512-key tiles beat 64 × 1024 (same 2 MB) by ~5 % (64 images)
_LSE_MAX_EXPLICIT = 0.5  # dominant-group path only when at most this fraction of the keys is outside it
_LSE_TILES = True  # without a dominant group: the tiled logsumexp path (False: the full softmax)
REDUCERS = ("auto", "loop", "tiles", "reduceat", "onehot")


@dataclass
class MassResult:
    """Result of :func:`grouped_mass`.

    Attributes:
        mass: [B, H, Lq, G] softmax mass of every query on every group (0 on rows without keys
            and on rows outside ``row_mask``).
        has_keys: [B, Lq] bool, rows with at least one allowed key (the others are not a softmax).
        seen: [B, Lk] bool, keys allowed for at least one counted row (``row_mask`` & ``has_keys``).
        maps: [B, H, n_sel, Lk] full probabilities of the selected query rows, or None.
    """

    mass: torch.Tensor
    has_keys: torch.Tensor
    seen: torch.Tensor
    maps: torch.Tensor | None = None


def chunk_rows(batch: int, heads: int, n_keys: int, budget_bytes: int, elem_bytes: int = 4) -> int:
    """Queries per chunk so that one [batch, heads, rows, n_keys] score tensor fits ``budget_bytes``."""
    per_row = max(1, batch * heads * n_keys * elem_bytes)
    return max(1, budget_bytes // per_row)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # fp16/bf16 scores are upcast (the models' softmax runs in fp32 too); fp64 stays fp64.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _chunk_probs(query, key_t, probs, allow, allow_u8, head_allow, scale, q0, q1, k0, k1, cdtype):
    """[B, H, c, k1 - k0] softmax probabilities of query rows q0..q1-1 over keys k0..k1-1 (0 / NaN on
    disallowed keys / key-less rows): sliced from ``probs`` if given, else recomputed from q·kᵀ."""
    B, H, _, D = query.shape
    c = q1 - q0
    if head_allow is None:
        sub = allow[..., k0:k1][:, None]  # [B, 1, c, Lk']
        ragged = (allow_u8[..., k0:k1].amin(1).amin(0) == 0).nonzero()  # columns some query may not see
    else:
        sub = head_allow[..., k0:k1]  # [B, H, c, Lk']
        ragged = (sub.view(torch.uint8).flatten(0, 2).amin(0) == 0).nonzero()
    if probs is not None:
        p = probs[:, :, q0:q1, k0:k1].detach().to(cdtype)  # [B, H, c, Lk']
        if ragged.numel():
            a, b = int(ragged[0]), int(ragged[-1]) + 1
            p = p.clone()
            p[..., a:b].masked_fill_(~sub[..., a:b], 0.0)
        return p
    Hkv = key_t.shape[1]
    qc = query[:, :, q0:q1].detach().to(cdtype).reshape(B, Hkv, H // Hkv * c, D)  # head h = j*rep + r
    p = torch.matmul(qc * scale, key_t[..., k0:k1].to(cdtype))  # [B, H_kv, rep*c, Lk']
    p = p.view(B, H, c, k1 - k0)  # [B, H, c, Lk']
    if ragged.numel():
        a, b = int(ragged[0]), int(ragged[-1]) + 1
        p[..., a:b].masked_fill_(~sub[..., a:b], float("-inf"))
    # In place (out= aliases the input): the row-wise kernel reads a row before writing it;
    # tests compare against a materialised softmax. Rows without keys become NaN, zeroed by the caller.
    torch.softmax(p, dim=-1, out=p)
    return p


@torch.no_grad()
def grouped_mass(
    query: torch.Tensor,
    key: torch.Tensor | None,
    scale: float,
    allowed: Callable[[int, int], torch.Tensor],
    key_group: torch.Tensor,
    n_groups: int,
    *,
    probs: torch.Tensor | None = None,
    logsumexp: torch.Tensor | None = None,
    row_mask: torch.Tensor | None = None,
    select: torch.Tensor | None = None,
    chunk_bytes: int | None = None,
    reduce: str = "auto",
    use_logsumexp: bool = True,
) -> MassResult:
    """Softmax mass per key group for every query, exact and query-chunked.

    Args:
        query: [B, H, Lq, D] queries after RoPE (only its shape is used when ``probs`` is given).
        key: [B, H_kv, Lk, D] keys; query head h uses key head ``h // (H // H_kv)`` (GQA).
        scale: softmax scale applied to q·k.
        allowed: ``(q0, q1) -> bool [B, q1 - q0, Lk]``, True = the softmax may use that key.
        key_group: [B, Lk] long group id of every key in ``0..n_groups-1`` (-1 = in no group).
        n_groups: G.
        probs: [B, H, Lq, Lk] probabilities the model already materialised (eager); then they are
            reduced directly instead of being recomputed.
        logsumexp: [B, H, Lq] log of each row's softmax normaliser, from the model's own kernel
            (:attr:`AttentionEvent.logsumexp`). Then only the scores of keys outside the largest
            group are computed, as ``exp(scale q·k - logsumexp)``, and the largest group's mass is
            one minus the rest; without a dominant group every allowed key is scored against it (see
            :mod:`hooks.attention_lse`). Used unless ``probs``, ``select`` or a
            ``reduce`` other than ``auto`` is given; ``use_logsumexp=False`` forces the full softmax.
        row_mask: [B, Lq] bool, rows that count (e.g. real, non-pad queries): only they mark keys
            as ``seen``, and the mass of the other rows is set to 0.
        select: [n_sel] long local query rows whose full probability rows are returned in ``maps``.
        chunk_bytes: size budget of one score chunk; default = the size of ``query`` clamped to
            [1 MB, 8 MB].
        reduce: how probabilities are summed into groups — ``loop`` (one sum per contiguous run),
            ``tiles`` (back-to-back runs of one length summed as one reshaped tensor, else like
            auto), ``reduceat`` (all runs at once, CPU), ``onehot`` (one matmul) or ``auto`` (loop
            for few runs, tiles when they tile, else reduceat on CPU / onehot elsewhere). All
            exact; a knob for tests/tuning.

    Returns:
        :class:`MassResult` with ``mass`` [B, H, Lq, G] in fp32 (fp64 for fp64 inputs).
    """
    B, H, Lq, _ = query.shape
    Lk = key_group.shape[1]
    device = query.device
    if probs is None:
        if key is None or key.shape[0] != B or key.shape[2] != Lk or H % key.shape[1]:
            raise ValueError(
                f"key must be [B={B}, H_kv dividing H={H}, Lk={Lk}, D], got "
                f"{None if key is None else tuple(key.shape)}"
            )
    elif tuple(probs.shape) != (B, H, Lq, Lk):
        raise ValueError(f"probs must be [B, H, Lq, Lk] = {(B, H, Lq, Lk)}, got {tuple(probs.shape)}")
    cdtype = _compute_dtype(query if probs is None else probs)
    G = int(n_groups)
    runs = group_runs(key_group)
    if reduce not in REDUCERS:
        raise ValueError(f"reduce must be one of {REDUCERS}, got {reduce!r}")
    if reduce in ("auto", "tiles", "reduceat") and device.type != "cpu":
        reduce = "onehot"  # reduceat runs in numpy
    onehot = None
    if reduce == "onehot":  # [B, G, Lk]: keys with group -1 get an all-zero column
        kg = key_group.to(device, torch.long)
        onehot = torch.zeros(B, G + 1, Lk, dtype=cdtype, device=device)
        onehot.scatter_(1, torch.where(kg < 0, G, kg).unsqueeze(1), 1.0)
        onehot = onehot[:, :G]
    mass = torch.zeros(B, H, Lq, G, dtype=cdtype, device=device)
    has_keys = torch.zeros(B, Lq, dtype=torch.bool, device=device)
    seen = torch.zeros(B, Lk, dtype=torch.bool, device=device)
    sel = None if select is None else select.to(device, torch.long)
    maps = None if sel is None else torch.zeros(B, H, sel.numel(), Lk, dtype=cdtype, device=device)

    auto_chunk = chunk_bytes is None
    if auto_chunk:
        chunk_bytes = min(max(query.numel() * query.element_size(), _MIN_AUTO_BYTES), _MAX_AUTO_BYTES)
    rows = chunk_rows(B, H, Lk, chunk_bytes, torch.finfo(cdtype).bits // 8)
    if auto_chunk:  # at least _MIN_AUTO_ROWS queries per chunk: thin score matmuls run far below peak
        rows = max(rows, min(Lq, _MIN_AUTO_ROWS))
    key_t = None if probs is not None else key.detach().transpose(-1, -2)  # [B, H_kv, D, Lk] (view)
    path = "softmax"  # or "dominant" / "tiles": the two logsumexp paths of hooks.attention_lse
    if use_logsumexp and logsumexp is not None and probs is None and sel is None and reduce == "auto":
        if tuple(logsumexp.shape) != (B, H, Lq):
            raise ValueError(f"logsumexp must be [B, H, Lq] = {(B, H, Lq)}, got {tuple(logsumexp.shape)}")
        kg = key_group.to(device, torch.long)
        grouped = kg[kg >= 0]
        big = int(torch.bincount(grouped).argmax()) if grouped.numel() else -1
        if int((kg != big).any(0).sum()) <= Lk * _LSE_MAX_EXPLICIT:
            path = "dominant"
        elif _LSE_TILES:
            path = "tiles"
    if path == "dominant":
        plan = lse_plan(key_group, key_t, cdtype)
        if auto_chunk:  # a chunk holds scores of the explicit keys only, plus its bool mask rows
            mask_heads = H if getattr(allowed, "per_head", True) else 1  # a bare callable may be per head
            per_row = B * (H * max(1, plan.cols.numel()) * (torch.finfo(cdtype).bits // 8) + mask_heads * Lk)
            rows = max(rows, min(Lq, chunk_bytes // per_row))
        fast = getattr(allowed, "fast", None)
        if fast in ("causal", "all") and Lk >= Lq:  # no mask tensor at all
            has_keys, seen = lse_fast(plan, query, logsumexp, scale, fast, Lk, row_mask, rows, mass)
            kept = has_keys if row_mask is None else has_keys & row_mask.to(device)
            mass.masked_fill_(~kept[:, None, :, None], 0.0)
            return MassResult(mass=mass, has_keys=has_keys, seen=seen, maps=None)
    elif path == "tiles":  # sums per group plus one column for keys in no group: every row's total
        key_t = key.detach().to(cdtype).transpose(-1, -2)  # cast once, not per tile
        sums = torch.zeros(B, H, Lq, G + 1, dtype=cdtype, device=device)
        mass = sums[..., :G]  # [B, H, Lq, G] (view)
        key_group = torch.where(key_group < 0, G, key_group)  # [B, Lk]: keys in no group in column G
        runs, run_length = group_runs(key_group), uniform_run_length(key_group)
        if auto_chunk:  # the tiles bound the score buffer, not the chunk: taller tiles, faster GEMMs
            rows = max(rows, min(Lq, _MIN_TILE_ROWS))

    for q0 in range(0, Lq, rows):
        q1 = min(Lq, q0 + rows)
        c = q1 - q0
        allow = allowed(q0, q1).to(device=device, dtype=torch.bool)  # [B, c, Lk] or per head [B, H, c, Lk]
        if tuple(allow.shape) not in ((B, c, Lk), (B, H, c, Lk)):
            raise ValueError(
                f"allowed({q0}, {q1}) returned {tuple(allow.shape)}, expected {(B, c, Lk)} or {(B, H, c, Lk)}"
            )
        head_allow = None
        if allow.dim() == 4:  # a per-head knockout: every head has its own mask
            head_allow = allow
            head_rows = allow.view(torch.uint8).amax(-1).bool()  # [B, H, c] head rows with >= 1 key
            allow = allow.view(torch.uint8).amax(1).bool()  # [B, c, Lk] keys some head may see
        allow_u8 = allow.view(torch.uint8)  # reductions on uint8 are much faster than bool any/all on CPU
        row_any = allow_u8.amax(-1).bool()  # [B, c] rows with at least one key
        has_keys[:, q0:q1] = row_any
        counted = row_any if row_mask is None else row_any & row_mask[:, q0:q1].to(device)
        col_any = allow_u8.amax(1)  # [B, Lk] keys some query of the chunk may see
        seen.logical_or_(
            col_any.bool()
            if bool(counted.all())
            else (allow_u8 & counted.unsqueeze(-1).to(torch.uint8)).amax(1).bool()
        )
        cols = col_any.amax(0).nonzero()
        if cols.numel() == 0:
            continue
        k0, k1 = int(cols[0]), int(cols[-1]) + 1  # contiguous key range (causal ⇒ k1 ≈ q1 + past)
        if path == "dominant":  # scores of the explicit columns only; no softmax pass
            e0, e1 = (int(i) for i in torch.searchsorted(plan.cols, torch.tensor([k0, k1], device=device)))
            mask_rows = allow if head_allow is None else head_allow  # [B, (H,) c, Lk]
            a = mask_rows.index_select(-1, plan.cols[e0:e1])
            allowed_n = mask_rows.view(torch.uint8).sum(-1, dtype=torch.int32)  # allowed keys per row
            lse_chunk(plan, query, logsumexp, scale, q0, q1, e0, e1, a, allowed_n, mass[:, :, q0:q1])
        elif path == "tiles":  # every allowed key, exp against the logsumexp; normalised below
            mask_rows = allow if head_allow is None else head_allow  # [B, (H,) c, Lk]
            lse_tiles(
                query, key_t, logsumexp, scale, q0, q1, k0, k1, mask_rows, runs, sums[:, :, q0:q1], run_length
            )
        else:
            p = _chunk_probs(query, key_t, probs, allow, allow_u8, head_allow, scale, q0, q1, k0, k1, cdtype)
            if reduce != "onehot":
                for b in range(B):
                    reduce_runs(p[b], runs[b], k0, k1, mass[b, :, q0:q1], reduce)
            else:
                sums = torch.matmul(
                    onehot[:, :, k0:k1], p.reshape(B, H * c, k1 - k0).transpose(1, 2)
                )  # [B, G, H*c]
                mass[:, :, q0:q1] = sums.view(B, G, H, c).permute(0, 2, 3, 1)
            if sel is not None:
                inside = (sel >= q0) & (sel < q1)
                if inside.any():
                    maps[:, :, inside.nonzero().squeeze(-1), k0:k1] = p[:, :, sel[inside] - q0]
            del p
        if head_allow is not None:  # a head row the knockout emptied is no softmax (NaN): mass 0
            mass[:, :, q0:q1].masked_fill_(~head_rows[..., None], 0.0)
    if path == "tiles":  # divide by each row's own total: the logsumexp only shifted the exponent
        total = sums.sum(-1, keepdim=True)  # [B, H, Lq, 1]; 0 on rows (or head rows) without keys
        mass = torch.where(total > 0, mass / total, 0.0)
    kept = has_keys if row_mask is None else has_keys & row_mask.to(device)
    mass.masked_fill_(~kept[:, None, :, None], 0.0)
    if maps is not None:
        maps.nan_to_num_(0.0)
    return MassResult(mass=mass, has_keys=has_keys, seen=seen, maps=maps)
