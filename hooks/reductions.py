"""In-hook reductions for big models: keep only chosen heads and queries *before* any row exists.

A 7B decoder (28 layers × 28 heads) at 2,000 positions gives ~6 million self-attention mass rows
per forward, most of which nobody looks at. ``capture(model, heads=..., queries=...)`` reduces each
attention event inside the hook, so neither the [B, H, Lq, G] tensor nor the table ever holds more:

* ``heads``: ``None`` (every head, the default), ``"mean"`` (mean over heads — still a
  distribution over groups; the table's ``head`` column is ``-1``) or a list of head indices
  (only those heads' scores are computed at all).
* ``queries``: ``None`` (every query, the default), ``"last"`` (each sample's last real query of
  the call: with padding, each sample's own last non-pad position), an int or a list of absolute
  positions, a ``slice`` of absolute positions (negative bounds count from the end of the sequence
  seen so far, as in Python), or a callable ``fn(query_index [Lq], token_kind [B, Lq]) -> bool
  [Lq] or [B, Lq]`` (``TOKEN_*`` codes from :mod:`owl_lab.models.observe`). Rows not chosen are
  never computed.

Memory: one row of ``rec.attention_mass`` costs about 60 bytes (7 int64/category columns + fp32
mass, measured by tests/hooks/test_reductions.py), and 4 bytes per (batch, head, query, group) in
the record tensors before the table is built. So 28 layers × 28 heads × 2,000 queries × ~6 groups
≈ 9.4 M rows ≈ 560 MB; with ``heads="mean", queries="last"``: 28 × 1 × 1 × 6 = 168 rows per sample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

QUERY_WORDS = ("last",)
HEAD_WORDS = ("mean",)


@dataclass(frozen=True)
class Reductions:
    """Parsed ``heads`` / ``queries`` arguments of :class:`hooks.capture`."""

    heads: str | tuple[int, ...] | None = None
    queries: object = None

    @property
    def any(self) -> bool:
        return self.heads is not None or self.queries is not None


def parse_reductions(heads, queries, n_heads: int | None = None) -> Reductions:
    """Check ``heads`` and ``queries`` once, when the capture is built (clear errors early)."""
    if heads is not None:
        if isinstance(heads, str):
            if heads not in HEAD_WORDS:
                raise ValueError(f"heads must be None, 'mean' or a list of head indices, got {heads!r}")
        else:
            chosen = [heads] if isinstance(heads, int) else list(heads)
            if not chosen or not all(isinstance(h, int) and not isinstance(h, bool) for h in chosen):
                raise ValueError(f"heads must be None, 'mean' or a non-empty list of ints, got {heads!r}")
            if len(set(chosen)) != len(chosen):
                raise ValueError(f"heads lists a head twice: {chosen}")
            bad = [h for h in chosen if h < 0 or (n_heads is not None and h >= n_heads)]
            if bad:
                raise ValueError(f"heads {bad} out of range: the decoder has heads 0..{(n_heads or 1) - 1}")
            heads = tuple(chosen)
    if queries is not None and not callable(queries) and not isinstance(queries, slice):
        if isinstance(queries, str):
            if queries not in QUERY_WORDS:
                raise ValueError(
                    "queries must be None, 'last', a slice, an int or list of positions, or a callable; "
                    f"got {queries!r}"
                )
        else:
            chosen = [queries] if isinstance(queries, int) else list(queries)
            if not all(isinstance(q, int) and not isinstance(q, bool) for q in chosen):
                raise ValueError(f"queries as positions must be ints, got {queries!r}")
            queries = tuple(chosen)
    if isinstance(queries, slice):
        for part in (queries.start, queries.stop, queries.step):
            if part is not None and not isinstance(part, int):
                raise ValueError(f"queries slice bounds must be ints or None, got {queries!r}")
        if queries.step is not None and queries.step <= 0:
            raise ValueError(f"queries slice step must be positive, got {queries!r}")
    return Reductions(heads=heads, queries=queries)


def choose_queries(
    queries, query_index: torch.Tensor, valid: torch.Tensor, token_kind: torch.Tensor, seq_length: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Which rows of one attention call to compute, per sample.

    Args:
        queries: the parsed ``queries`` argument (not None).
        query_index: [Lq] absolute position of each query row.
        valid: [B, Lq] bool real (non-pad) query rows.
        token_kind: [B, Lq] ``TOKEN_*`` code of each query row.
        seq_length: positions seen so far (negative positions / slice bounds count from here).

    Returns:
        (rows [n] long local row indices, sorted; keep [B, n] bool rows each sample keeps).
    """
    qi = query_index.detach().to("cpu", torch.long)
    B, Lq = valid.shape
    if queries == "last":
        has = valid.any(1)
        last = torch.where(has, Lq - 1 - valid.flip(1).int().argmax(1), torch.full((B,), -1))  # [B]
        rows = torch.unique(last[has])
        return rows, rows[None, :] == last[:, None]
    if callable(queries):
        mask = queries(qi, token_kind)
        mask = torch.as_tensor(mask)
        if mask.dtype != torch.bool or tuple(mask.shape) not in ((Lq,), (B, Lq)):
            raise ValueError(
                f"a queries callable must return a bool tensor of shape [Lq]={[Lq]} or [B, Lq]={[B, Lq]}, "
                f"got {mask.dtype} {list(mask.shape)}"
            )
        mask = mask.expand(B, Lq)
    else:
        if isinstance(queries, slice):
            wanted = torch.arange(*queries.indices(seq_length))
        else:
            wanted = torch.tensor([q + seq_length if q < 0 else q for q in queries], dtype=torch.long)
        mask = torch.isin(qi, wanted)[None].expand(B, Lq)
    rows = mask.any(0).nonzero().squeeze(-1)
    return rows, mask[:, rows]


def allowed_rows(allowed: Callable[[int, int], torch.Tensor], rows: torch.Tensor) -> Callable:
    """``allowed`` restricted to ``rows`` (sorted local rows): ``(a, b) -> [B, b - a, Lk]`` for
    sub-rows a..b-1. Contiguous runs of rows are asked for in one call each."""
    rows_list = rows.tolist()

    def sub(a: int, b: int) -> torch.Tensor:
        picked = rows_list[a:b]
        parts, start = [], 0
        for i in range(1, len(picked) + 1):
            if i == len(picked) or picked[i] != picked[i - 1] + 1:
                parts.append(allowed(picked[start], picked[i - 1] + 1))
                start = i
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)  # (per-head masks: [B, H, c, Lk])

    return sub


def head_subset(
    query: torch.Tensor, key: torch.Tensor | None, probs: torch.Tensor | None, heads: tuple[int, ...]
):
    """(query, key, probs) restricted to ``heads``: query [B, h, Lq, D]; key [B, h, Lk, D] (the key head
    of each chosen query head, so GQA keeps working with one key head per query head)."""
    H = query.shape[1]
    bad = [h for h in heads if h >= H]
    if bad:
        raise ValueError(f"heads {bad} out of range: this attention has {H} heads")
    idx = torch.tensor(heads, dtype=torch.long, device=query.device)
    q = query.index_select(1, idx)
    k = None if key is None else key.index_select(1, idx // (H // key.shape[1]))
    p = None if probs is None else probs.index_select(1, idx)
    return q, k, p
