"""The masks of the attention core (:mod:`owl_lab.models.attention`): :class:`Allowed`, the one boolean
"may attend" mask kernels and hooks share, and :class:`RowKeep`, an edit of a few query rows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


class Allowed:
    """Which keys each query may attend: bool [B, Lq, Lk] (or [B, H, Lq, Lk]), True = attend.

    Built lazily: hooks read it in query chunks (``allowed(q0, q1)``), the kernel asks for the whole
    tensor only when it needs one. ``fast`` marks masks no kernel needs a tensor for: ``"causal"``
    (key j visible to query i iff j <= i + Lk - Lq) and ``"all"``.

    Args:
        shape: (B, Lq, Lk).
        rows: ``(q0, q1) -> bool [B, q1 - q0, Lk]`` (``[B, heads, q1 - q0, Lk]`` when ``heads`` is
            set); or None for a ``fast`` mask.
        fast: ``"causal"``, ``"all"`` or None.
        device: where fast masks are built.
        heads: number of heads of a per-head mask (rows are then [B, H, c, Lk]); None = shared.
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        rows: Callable[[int, int], torch.Tensor] | None = None,
        fast: str | None = None,
        device: torch.device | None = None,
        heads: int | None = None,
    ):
        if (rows is None) == (fast is None):
            raise ValueError("Allowed needs exactly one of rows= or fast=")
        self.shape, self._rows, self.fast, self.device = tuple(shape), rows, fast, device
        self.heads = heads
        self._tensor: torch.Tensor | None = None
        self._additive: dict = {}
        self._last_edit: tuple | None = None  # (edit mask, kind, edited Allowed), see _apply_edit
        # set on an edited mask: the mask before the edit and the query rows [r0, r1) that differ
        self.unedited: Allowed | None = None
        self.changed_rows: tuple[int, int] | None = None

    @classmethod
    def from_tensor(cls, allowed: torch.Tensor) -> Allowed:
        """Wrap a bool [B, Lq, Lk] or per-head [B, H, Lq, Lk] tensor."""
        heads = allowed.shape[1] if allowed.dim() == 4 else None
        mask = cls(
            (allowed.shape[0], *allowed.shape[-2:]), rows=lambda q0, q1: allowed[..., q0:q1, :], heads=heads
        )
        mask._tensor = allowed
        return mask

    @property
    def per_head(self) -> bool:
        """True when the mask differs per head (a per-head edit): rows are [B, H, c, Lk]."""
        return self.heads is not None

    def __call__(self, q0: int, q1: int) -> torch.Tensor:
        """bool [B, q1 - q0, Lk] (per-head masks: [B, H, q1 - q0, Lk]) for queries q0..q1-1."""
        if self._rows is not None:
            return self._rows(q0, q1)
        B, Lq, Lk = self.shape
        if self.fast == "all":
            return torch.ones(B, q1 - q0, Lk, dtype=torch.bool, device=self.device)
        keys = torch.arange(Lk, device=self.device)
        queries = torch.arange(q0, q1, device=self.device) + (Lk - Lq)
        return (keys[None, :] <= queries[:, None])[None].expand(B, -1, -1)

    def tensor(self) -> torch.Tensor:
        """The whole mask, bool [B, Lq, Lk] (or [B, H, Lq, Lk]); built once, then cached."""
        if self._tensor is None:
            self._tensor = self(0, self.shape[1])
        return self._tensor

    def additive(self, dtype: torch.dtype) -> torch.Tensor:
        """[B, 1 | H, Lq, Lk]: 0 where allowed, ``finfo(dtype).min`` elsewhere (cached per dtype)."""
        if dtype not in self._additive:
            allowed = self.tensor()
            allowed = allowed if allowed.dim() == 4 else allowed[:, None]
            zero = torch.zeros((), dtype=dtype, device=allowed.device)
            self._additive[dtype] = torch.where(allowed, zero, torch.finfo(dtype).min)
        return self._additive[dtype]


@dataclass(frozen=True, eq=False)
class RowKeep:
    """An edit of a few query rows: ``keep`` bool [B, c, Lk] or [B, H, c, Lk] (True = keep) for query
    rows ``q0 .. q0 + c - 1``; every other row keeps all its keys. Lets a knockout of e.g. the last
    query avoid any [B, Lq, Lk] tensor (the core then runs the row-split SDPA path)."""

    q0: int
    keep: torch.Tensor

    @property
    def q1(self) -> int:
        return self.q0 + self.keep.shape[-2]
