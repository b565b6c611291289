"""Vision-encoder attention (kind ``vision``): where each ViT / SigLIP token looks, reduced on the spot.

    with capture(model, vision=True) as rec:          # "grid" / "full" keep more, see below
        model(**batch)
    rec.vision.mass     # DataFrame: layer, image, head, query, level, group, mass
    rec.vision.maps     # [layer, image, head, grid_h, grid_w] received attention per patch ("grid", "full")
    rec.vision.full     # [layer, image, T, T] head-mean probabilities ("full"; what rollout needs)

Groups of one softmax (query = a token of the encoder: Owl2 ``0`` = CLS, then patches row-major;
Owl3's SigLIP has no CLS, every query is a patch):

* level ``token`` (Owl2 only): ``cls`` and ``patches``; they sum to 1.
* level ``locality``: ``cls`` (Owl2), ``local`` (the query's own patch and its up-to-8 grid
  neighbours) and ``far`` (every other patch); they sum to 1. SigLIP has no CLS, so this is its
  partition: how local the encoder's attention is, layer by layer. The CLS query has no patch, so
  its ``local`` is 0.

``maps`` is the attention each patch *receives*, averaged over the queries (a patch every token
attends to fully would read 1). Everything is computed query-chunk by query-chunk from the event's
exact q/k (or its probabilities on the eager path): no [N, H, T, T] tensor is materialised unless
``"full"`` asks for the head mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from owl_lab.families import FamilySpec, HookSite, find_sites
from owl_lab.models.observe import AttentionEvent, HookPoint
from owl_lab.models.observe_vision import KEY_CLS

#: ``capture(vision=...)`` values: what each keeps beyond the per-query masses.
VISION_LEVELS = {"mass": 0, "grid": 1, "full": 2}
VISION_COLUMNS = ["layer", "image", "head", "query", "level", "group", "mass"]
_MAX_CHUNK_BYTES = 8 << 20


def parse_vision(vision) -> str | None:
    """``capture(vision=...)`` → None (off), ``"mass"``, ``"grid"`` or ``"full"``."""
    if vision is None or vision is False:
        return None
    if vision is True:
        return "mass"
    if vision in VISION_LEVELS:
        return vision
    raise ValueError(f"vision must be False, True, 'mass', 'grid' or 'full'; got {vision!r}")


def vision_sites(model: nn.Module, spec: FamilySpec | str) -> list[HookSite]:
    """The ``hook_attn`` point of every vision-encoder attention, sorted by encoder layer.

    From the registry: its ``vision_event`` observation point when the family lists one, else the
    ``self_attn.hook_attn`` of each ``vision_layer``.
    """
    sites = find_sites(model, spec, "vision_event")
    if sites:
        return sites
    found = []
    for layer in find_sites(model, spec, "vision_layer"):
        point = getattr(getattr(layer.module, "self_attn", None), "hook_attn", None)
        if isinstance(point, HookPoint):
            found.append(HookSite("vision_event", layer.index, f"{layer.path}.self_attn.hook_attn", point))
    return found


@dataclass
class VisionRecord:
    """One encoder layer of one encoder pass (N images, H heads, T tokens = cls + gh*gw).

    Attributes:
        mass: [N, H, T, 3] float32 mass of each query on (cls, local patches, far patches).
        received: [N, H, gh, gw] mean over queries of the probability on each patch, or None.
        full: [N, T, T] probabilities averaged over heads, or None.
    """

    layer: int
    mass: torch.Tensor
    grid: tuple[int, int]
    has_cls: bool
    received: torch.Tensor | None = None
    full: torch.Tensor | None = None


def local_mask(grid: tuple[int, int], has_cls: bool) -> torch.Tensor:
    """[T, T] bool: key patch within one grid step (Chebyshev) of the query patch; CLS rows/cols False."""
    gh, gw = grid
    r, c = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    r, c = r.reshape(-1), c.reshape(-1)
    near = ((r[:, None] - r[None]).abs() <= 1) & ((c[:, None] - c[None]).abs() <= 1)  # [P, P]
    cls = int(has_cls)
    out = torch.zeros(cls + gh * gw, cls + gh * gw, dtype=torch.bool)
    out[cls:, cls:] = near
    return out


@torch.no_grad()
def summarize_vision(
    event: AttentionEvent, keep: str = "mass", chunk_bytes: int | None = None
) -> VisionRecord:
    """Reduce one ``vision`` event (see module doc); exact softmax, query-chunked."""
    if event.kind != "vision":
        raise ValueError(f"summarize_vision expects an event of kind 'vision', got {event.kind!r}")
    if keep not in VISION_LEVELS:
        raise ValueError(f"keep must be one of {sorted(VISION_LEVELS)}, got {keep!r}")
    q, k = event.query.detach(), event.key.detach()
    N, H, T, D = q.shape
    if event.grid is None:
        raise ValueError("a 'vision' event must carry its patch grid (event.grid)")
    grid, has_cls = tuple(event.grid), bool((event.key_image[0] == KEY_CLS).any())
    cls = int(has_cls)
    dev = q.device
    near = local_mask(grid, has_cls).to(dev)
    budget = chunk_bytes or _MAX_CHUNK_BYTES
    rows = max(1, min(T, budget // max(1, N * H * T * 4)))
    mass = torch.zeros(N, H, T, 3, device=dev)
    received = torch.zeros(N, H, T - cls, device=dev) if VISION_LEVELS[keep] >= 1 else None
    full = torch.zeros(N, T, T, device=dev) if VISION_LEVELS[keep] >= 2 else None
    k_t = k.float().transpose(-1, -2)  # [N, H, D, T]
    for q0 in range(0, T, rows):
        q1 = min(T, q0 + rows)
        if event.probs is not None:
            p = event.probs[:, :, q0:q1].float()  # [N, H, c, T]
        else:
            p = torch.softmax(torch.matmul(q[:, :, q0:q1].float() * event.scale, k_t), dim=-1)
        patches = p[..., cls:].sum(-1)  # [N, H, c]
        local = (p * near[q0:q1]).sum(-1)
        mass[:, :, q0:q1, 0] = p[..., 0] if has_cls else 0.0
        mass[:, :, q0:q1, 1] = local
        mass[:, :, q0:q1, 2] = patches - local
        if received is not None:
            received += p[..., cls:].sum(2)
        if full is not None:
            full[:, q0:q1] = p.mean(1)
        del p
    return VisionRecord(
        layer=int(event.layer),
        mass=mass.cpu(),
        grid=grid,
        has_cls=has_cls,
        received=None if received is None else (received / T).view(N, H, *grid).cpu(),
        full=None if full is None else full.cpu(),
    )


class VisionView:
    """``rec.vision``: what a capture recorded from the vision encoder (see the module docstring)."""

    def __init__(self, keep: str | None):
        self.keep = keep
        self.records: list[list[VisionRecord]] = []  # per encoder pass, per layer
        self._mass: pd.DataFrame | None = None

    def __repr__(self) -> str:
        return f"VisionView(keep={self.keep!r}, passes={len(self.records)})"

    def add(self, record: VisionRecord) -> None:
        """Append one layer's record; layer 0 (or a repeated layer) starts a new encoder pass."""
        if not self.records or any(r.layer == record.layer for r in self.records[-1]):
            self.records.append([])
        self.records[-1].append(record)
        self._mass = None

    def _need(self, level: str) -> None:
        if self.keep is None:
            raise ValueError(
                "vision attention was not captured: use capture(model, vision=True | 'grid' | 'full')"
            )
        if not self.records:
            raise ValueError("no vision-encoder pass was observed (no image in the inputs?)")
        if VISION_LEVELS[self.keep] < VISION_LEVELS[level]:
            raise ValueError(
                f"this needs capture(model, vision={level!r}) (captured with vision={self.keep!r})"
            )

    def _stack(self, field: str) -> torch.Tensor:
        per_layer = zip(*[[getattr(r, field) for r in p] for p in self.records], strict=True)
        return torch.stack([torch.cat(t, 0) for t in per_layer])  # images of all passes, in order

    @property
    def maps(self) -> torch.Tensor:
        """[layer, image, head, grid_h, grid_w] received attention per patch (mean over queries)."""
        self._need("grid")
        return self._stack("received")

    @property
    def full(self) -> torch.Tensor:
        """[layer, image, T, T] probabilities averaged over heads (T = cls + patches)."""
        self._need("full")
        return self._stack("full")

    @property
    def tensor(self) -> torch.Tensor:
        """[layer, image, head, T, 3] mass on (cls, local, far)."""
        self._need("mass")
        return self._stack("mass")

    @property
    def mass(self) -> pd.DataFrame:
        """Tidy masses: layer, image, head, query, level, group, mass (see the module docstring)."""
        self._need("mass")
        if self._mass is None:
            frames, offset = [], 0
            for p in self.records:
                for r in p:
                    frames += _frames(r, offset)
                offset += p[0].mass.shape[0]
            df = pd.concat(frames, ignore_index=True)[VISION_COLUMNS]
            for col in ("level", "group"):
                df[col] = df[col].astype("category")
            self._mass = df
        return self._mass


def _frames(r: VisionRecord, offset: int) -> list[pd.DataFrame]:
    N, H, T, _ = r.mass.shape
    n, h, q = (a.reshape(-1) for a in np.meshgrid(np.arange(N), np.arange(H), np.arange(T), indexing="ij"))
    m = r.mass.reshape(-1, 3).numpy()
    columns = [("locality", "local", m[:, 1]), ("locality", "far", m[:, 2])]
    if r.has_cls:
        columns = [
            ("token", "cls", m[:, 0]),
            ("token", "patches", m[:, 1] + m[:, 2]),
            ("locality", "cls", m[:, 0]),
            *columns,
        ]
    return [
        pd.DataFrame(
            {
                "layer": r.layer,
                "image": n + offset,
                "head": h,
                "query": q,
                "level": level,
                "group": group,
                "mass": values,
            }
        )
        for level, group, values in columns
    ]
