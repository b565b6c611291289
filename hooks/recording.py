"""What a capture recorded: tensors per (step, layer, kind), tidy DataFrames built on first access."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from hooks.abstractor import AbstractorRecord
from hooks.gates import GateRecord

MASS_COLUMNS = ["batch", "step", "layer", "head", "query", "kind", "level", "group", "mass", "call"]
GATE_COLUMNS = ["batch", "step", "layer", "query", "head", "gate", "applied", "call"]
SPLIT_COLUMNS = [
    "batch",
    "step",
    "layer",
    "query",
    "applied",
    "text_norm",
    "vision_norm",
    "vision_share",
    "call",
]
ABSTRACTOR_COLUMNS = ["abstractor_layer", "image", "head", "query", "patches", "cls", "queries"]


@dataclass
class AttentionRecord:
    """Mass of one attention call (B = batch, H = heads, Lq = queries, G = groups).

    Attributes:
        mass: [B, H, Lq, G] float32 softmax mass per group.
        query_index: [Lq] absolute sequence index of each query.
        valid: [B, Lq] bool, rows kept: real (non-pad) queries with at least one allowed key.
        present: [B, G] bool, groups reported for a sample (some key of the group was allowed for
            some valid query). Groups of one ``level`` partition those keys.
        levels, groups: the G level and group names (only groups some sample reports, modality
            level first: e.g. Owl3 self-attention has no ``visual``/``image:i`` column).
        heads: [H] long head index of each row of axis 1 (-1 = mean over heads), None = 0..H-1.
    """

    step: int
    layer: int
    kind: str
    mass: torch.Tensor
    query_index: torch.Tensor
    valid: torch.Tensor
    present: torch.Tensor
    levels: list
    groups: list
    call: int = 0
    heads: torch.Tensor | None = None

    def group_index(self, group: str, level: str | None = None) -> int:
        """Index of ``group`` along the last axis of ``mass`` (``pad`` exists at both levels:
        without ``level``, the modality-level one)."""
        for i, (lv, name) in enumerate(zip(self.levels, self.groups, strict=True)):
            if name == group and level in (None, lv):
                return i
        raise KeyError(f"no group {group!r} at level {level!r}; groups are {self.groups}")


class FullMaps(dict):
    """``{(call, step, layer, kind): FullMap}``; a 3-tuple key ``(step, layer, kind)`` means call 0."""

    @staticmethod
    def _key(key):
        return (0, *key) if isinstance(key, tuple) and len(key) == 3 else key

    def __getitem__(self, key):
        return super().__getitem__(self._key(key))

    def __contains__(self, key):
        return super().__contains__(self._key(key))

    def get(self, key, default=None):
        return super().get(self._key(key), default)


@dataclass
class FullMap:
    """Full probabilities for chosen queries of one attention call.

    Attributes:
        probs: [B, H, n_queries, Lk] probabilities (0 on masked keys; rows of pad queries kept).
        query_index: [n_queries] absolute positions of the rows.
        key_position: [B, Lk] sequence index of each key (-1 for image keys outside the sequence).
        key_image: [B, Lk] image index of image keys (else -1).
        key_group: [B, Lk] token-level group name index into ``groups`` (-1 = padded key slot).
        groups: names for ``key_group``.
    """

    probs: torch.Tensor
    query_index: torch.Tensor
    key_position: torch.Tensor
    key_image: torch.Tensor
    key_group: torch.Tensor
    groups: list


class Recording:
    """Everything captured inside one ``with hooks.capture(model) as rec:`` block.

    DataFrames (built lazily, cached):
        attention_mass: batch, step, layer, head, query, kind, level, group, mass.
        gates: batch, step, layer, query, head, gate, applied (Owl3 gated only).
        gate_split: batch, step, layer, query, applied, text_norm, vision_norm, vision_share.
        abstractor_summary: abstractor_layer, image, head, query, patches, cls, queries.
    Tensors:
        abstractor_maps: [abstractor_layer, image, head, query, grid_h, grid_w] (Owl2).
        full_maps: {(step, layer, kind): FullMap}.
        token_kind / image_index: [B, S] the sequence as seen at the end (``TOKEN_*`` codes).

    Note: ``head`` and ``query`` are also DataFrame method names, so select them as
    ``df["head"]`` / ``df["query"]`` (``df.head`` is the method).
    """

    def __init__(self, family: str):
        self.family = family
        self.attention_records: list[AttentionRecord] = []
        self.gate_records: list[GateRecord] = []
        self.abstractor_records: list[list[AbstractorRecord]] = []  # per forward call, per layer
        self.full_maps = FullMaps()
        self.n_steps = 0  # forward calls observed (prefills and decode steps)
        self.n_calls = 0  # prefills: one per plain forward or generate call
        self.token_kind: torch.Tensor | None = None
        self.image_index: torch.Tensor | None = None
        self._cache: dict[str, object] = {}

    def __repr__(self) -> str:
        return (
            f"Recording(family={self.family!r}, steps={self.n_steps}, attention calls="
            f"{len(self.attention_records)}, gate calls={len(self.gate_records)}, "
            f"abstractor calls={len(self.abstractor_records)})"
        )

    def _changed(self) -> None:
        self._cache.clear()

    # ---------------------------------------------------------------- attention
    def mass(self, layer: int, kind: str = "self", step: int = 0, call: int = 0) -> AttentionRecord:
        """The tensor record of one attention call (see :class:`AttentionRecord`); ``call`` counts
        the prefills (plain forwards / ``generate`` calls) inside the capture block, ``step`` the
        decode steps within one call."""
        for r in self.attention_records:
            if (r.call, r.step, r.layer, r.kind) == (call, step, layer, kind):
                return r
        have = sorted({(r.call, r.step, r.layer, r.kind) for r in self.attention_records})
        raise KeyError(
            f"no attention record for call={call}, step={step}, layer={layer}, kind={kind!r}; "
            f"have (call, step, layer, kind) {have}"
        )

    @property
    def attention_mass(self) -> pd.DataFrame:
        """Tidy mass table; for each (batch, step, layer, head, query, kind, level) masses sum to 1."""
        if "attention_mass" not in self._cache:
            self._cache["attention_mass"] = _mass_frame(self.attention_records)
        return self._cache["attention_mass"]

    # ---------------------------------------------------------------- gates
    @property
    def gates(self) -> pd.DataFrame:
        """Gate channel-mean per (batch, step, layer, query, head); real (non-pad) rows only."""
        if "gates" not in self._cache:
            frames = []
            for r in self.gate_records:
                B, L, H = r.mean.shape
                keep = r.valid[:, :, None].expand(B, L, H)
                b, q, h = keep.nonzero(as_tuple=True)
                frames.append(
                    pd.DataFrame(
                        {
                            "batch": b.numpy(),
                            "step": r.step,
                            "layer": r.layer,
                            "query": r.query_index[q].numpy(),
                            "head": h.numpy(),
                            "gate": r.mean[b, q, h].numpy(),
                            "applied": (
                                r.applied[b, q] if r.head_applied is None else r.head_applied[b, q, h]
                            ).numpy(),
                            "call": r.call,
                        }
                    )
                )
            self._cache["gates"] = _concat(frames, GATE_COLUMNS)
        return self._cache["gates"]

    @property
    def gate_split(self) -> pd.DataFrame:
        """Norms of the text part ``o_proj(self⊙(1−g))`` and vision part ``o_proj(cross⊙g)`` per row."""
        if "gate_split" not in self._cache:
            frames = []
            for r in self.gate_records:
                b, q = r.valid.nonzero(as_tuple=True)
                t, v = r.text_norm[b, q], r.vision_norm[b, q]
                frames.append(
                    pd.DataFrame(
                        {
                            "batch": b.numpy(),
                            "step": r.step,
                            "layer": r.layer,
                            "query": r.query_index[q].numpy(),
                            "applied": r.applied[b, q].numpy(),
                            "text_norm": t.numpy(),
                            "vision_norm": v.numpy(),
                            "vision_share": (v / (t + v).clamp_min(1e-30)).numpy(),
                            "call": r.call,
                        }
                    )
                )
            self._cache["gate_split"] = _concat(frames, SPLIT_COLUMNS)
        return self._cache["gate_split"]

    def gate_vectors(self, layer: int, step: int = 0, call: int = 0) -> GateRecord:
        """The full :class:`GateRecord` (``gate``/``text_out``/``vision_out`` need ``gate_vectors=True``)."""
        for r in self.gate_records:
            if (r.call, r.step, r.layer) == (call, step, layer):
                return r
        raise KeyError(f"no gate record for call={call}, step={step}, layer={layer}")

    # ---------------------------------------------------------------- abstractor
    @property
    def abstractor_maps(self) -> torch.Tensor:
        """[abstractor_layer, image, head, query, grid_h, grid_w] patch probabilities (images in
        the order the abstractor saw them, over all forward calls)."""
        if not self.abstractor_records:
            raise ValueError(
                "no abstractor maps were recorded (Owl2 with images and abstractor capture only)"
            )
        per_layer = zip(*[[r.patch_probs for r in call] for call in self.abstractor_records], strict=True)
        return torch.stack([torch.cat(maps, 0) for maps in per_layer])

    @property
    def abstractor_summary(self) -> pd.DataFrame:
        """Mass of each learnable query on all patches, on CLS and on the queries (sums to 1)."""
        if "abstractor_summary" not in self._cache:
            frames, offset = [], 0
            for call in self.abstractor_records:
                for r in call:
                    N, H, Q = r.patch_mass.shape
                    n, h, q = torch.ones(N, H, Q, dtype=torch.bool).nonzero(as_tuple=True)
                    frames.append(
                        pd.DataFrame(
                            {
                                "abstractor_layer": r.layer,
                                "image": (n + offset).numpy(),
                                "head": h.numpy(),
                                "query": q.numpy(),
                                "patches": r.patch_mass.flatten().numpy(),
                                "cls": r.cls_mass.flatten().numpy(),
                                "queries": r.query_mass.flatten().numpy(),
                            }
                        )
                    )
                offset += call[0].patch_mass.shape[0] if call else 0
            self._cache["abstractor_summary"] = _concat(frames, ABSTRACTOR_COLUMNS)
        return self._cache["abstractor_summary"]


def _concat(frames: list, columns: list) -> pd.DataFrame:
    if not frames:
        return pd.DataFrame({c: [] for c in columns})
    return pd.concat(frames, ignore_index=True)[columns]


def _mass_frame(records: list[AttentionRecord]) -> pd.DataFrame:
    frames = []
    for r in records:
        B, H, Lq, G = r.mass.shape
        keep = r.valid[:, None, :, None] & r.present[:, None, None, :]  # [B, 1, Lq, G] → [B, H, Lq, G]
        keep = keep.expand(B, H, Lq, G)
        b, h, q, g = keep.nonzero(as_tuple=True)
        g_np = g.numpy()
        frames.append(
            pd.DataFrame(
                {
                    "batch": b.numpy(),
                    "step": r.step,
                    "layer": r.layer,
                    "head": (h if r.heads is None else r.heads[h]).numpy(),
                    "query": r.query_index[q].numpy(),
                    "kind": r.kind,
                    "level": np.asarray(r.levels, dtype=object)[g_np],
                    "group": np.asarray(r.groups, dtype=object)[g_np],
                    "mass": r.mass[b, h, q, g].float().numpy(),
                    "call": r.call,
                }
            )
        )
    df = _concat(frames, MASS_COLUMNS)
    for col in ("kind", "level", "group"):
        df[col] = df[col].astype("category")
    return df
