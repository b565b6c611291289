"""Attention knockout: block attention from chosen query positions to chosen keys at chosen layers.

    with hooks.knockout(model, queries="last", keys="visual", layers=range(0, 4)):
        model(**batch)

Groups are capture's token vocabulary (:mod:`hooks.groups`) plus two more:

===============  ===========================================================================
group            positions / keys
===============  ===========================================================================
``visual``       Owl2 image rows (``vit_eos`` included); Owl3 the image keys of hyper layers
``image:k``      the same for sample-relative image k
``text``         every real non-image position (``bos``, ``question``, ``placeholder``, ``generated``)
``bos``          the first real token of each sample
``question``     prompt text other than ``bos`` (the last prompt token included)
``placeholder``  Owl3 ``<|image|>`` placeholder tokens
``generated``    tokens fed back by ``generate``
``last``         each sample's last real position so far (the current token during ``generate``)
``all``          every real position (and, as keys, every image key)
===============  ===========================================================================

A group may also be a list of names (their union) or a [B, S] bool tensor over sequence positions.
``layers=None`` means every decoder layer; ``heads=None`` every head.

The mask goes through the attention core's knockout slot (``module.attention_edit``, see
:mod:`owl_lab.models.attention`): it is ANDed into the boolean mask the kernel uses and the
observation event carries, so ``capture()`` inside a knockout records the softmax actually used, on
the SDPA path too. Rows the knockout empties: a ``self``/``joint`` query keeps its own key; in Owl3's
gated (240728) hyper layers a query left with no image key behaves as a token that saw no image (its
self-attention output passes unchanged); in the fused (241101) softmax the remaining keys
renormalise. A knockout that blocks nothing in a call (``layers=[]``, a group with no positions)
leaves that call untouched, so the logits stay bitwise equal.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import nn

from hooks.groups import BOS, GENERATED, N_TOKEN_FIXED, PLACEHOLDER, QUESTION, SequenceHistory, key_groups
from hooks.sites import family_spec, n_layers
from owl_lab.models.attention import RowKeep
from owl_lab.models.observe import TOKEN_PAD

_FIXED = {
    "bos": (BOS,),
    "question": (QUESTION,),
    "placeholder": (PLACEHOLDER,),
    "generated": (GENERATED,),
    "text": (BOS, QUESTION, PLACEHOLDER, GENERATED),
}
NAMES = ("visual", "text", "bos", "question", "placeholder", "generated", "last", "all")
_DECODER_KINDS = ("self", "cross", "joint")


def _check_group(group) -> None:
    if not isinstance(group, (str, list, tuple, torch.Tensor)):
        raise ValueError(
            f"a knockout group is a name, a list of names or a [B, S] bool tensor, got {type(group)}"
        )
    names = [group] if isinstance(group, str) else (group if isinstance(group, (list, tuple)) else [])
    for name in names:
        if not isinstance(name, str) or not (
            name in NAMES or (name.startswith("image:") and name[6:].isdigit())
        ):
            raise ValueError(
                f"unknown knockout group {name!r}; expected one of {list(NAMES)}, 'image:k', "
                "a list of them, or a [B, S] bool tensor"
            )


def _positions_in(group, history: SequenceHistory) -> torch.Tensor:
    """[B, S] bool: which sequence positions seen so far belong to ``group``."""
    B, S = history.kind.shape
    if isinstance(group, torch.Tensor):
        if group.dim() != 2 or group.shape[0] != B or group.shape[1] < S:
            raise ValueError(f"a knockout mask must be [B={B}, S>={S}] bool, got {tuple(group.shape)}")
        return group[:, :S].bool().cpu()
    if isinstance(group, (list, tuple)):
        out = torch.zeros(B, S, dtype=torch.bool)
        for name in group:
            out |= _positions_in(name, history)
        return out
    real = history.kind != TOKEN_PAD
    if history.attention_mask is not None:
        real &= history.attention_mask
    if group == "all":
        return real
    if group == "last":
        idx = torch.arange(S).expand(B, S)
        return idx == torch.where(real, idx, -1).amax(1)[:, None]
    n_images = max([0, *history.images_per_sample, int(history.image.max()) + 1 if S else 0])
    g = key_groups(history, torch.arange(S).expand(B, S), torch.full((B, S), -1), n_images)  # [B, S]
    if group == "visual":
        return (g >= N_TOKEN_FIXED) & real
    if group.startswith("image:"):
        return (g == N_TOKEN_FIXED + int(group[6:])) & real
    return torch.isin(g, torch.tensor(_FIXED[group])) & real


def _images_in(group, n_images: int, batch: int) -> torch.Tensor:
    """[B, N] bool: which images' keys (outside the sequence, Owl3 hyper layers) belong to ``group``."""
    out = torch.zeros(batch, n_images, dtype=torch.bool)
    if isinstance(group, (list, tuple)):
        for name in group:
            out |= _images_in(name, n_images, batch)
    elif group in ("visual", "all"):
        out[:] = True
    elif isinstance(group, str) and group.startswith("image:") and int(group[6:]) < n_images:
        out[:, int(group[6:])] = True
    return out


class _Plan:
    """The groups, resolved against the sequence seen so far (updated from every ``SequenceLayout``)."""

    def __init__(self, queries, keys, image_keys: torch.Tensor | None, heads: list[int] | None):
        self.queries, self.keys, self.image_keys, self.heads = queries, keys, image_keys, heads
        self.history = SequenceHistory()
        self._resolved = None  # (history length, query positions [B, S], key positions [B, S])
        self._last = None  # (unedited mask, kind, answer): one answer object per forward and kind

    def update(self, layout) -> None:
        self.history.update(layout)

    def _positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._resolved is None or self._resolved[0] != self.history.length:
            self._resolved = (
                self.history.length,
                _positions_in(self.queries, self.history),
                _positions_in(self.keys, self.history),
            )
        return self._resolved[1], self._resolved[2]

    def keep(self, event) -> RowKeep | None:
        """The slot's answer for one attention call: the kept keys of the query rows the knockout
        touches (:class:`RowKeep`, no [B, Lq, Lk] tensor), or None (no edit).

        Layers of one forward share their unedited mask; the answer is computed once per (mask, kind)
        and the same object returned, so the core builds the edited mask once per forward.
        """
        if event.kind not in _DECODER_KINDS or self.history.kind is None:
            return None
        last = self._last
        if last is not None and last[0] is event.allowed and last[1] == event.kind:
            return last[2]
        answer = self._answer(event)
        self._last = (event.allowed, event.kind, answer)
        return answer

    def _answer(self, event) -> RowKeep | None:
        q_all, k_all = self._positions()
        q_in = q_all[:, event.query_index.cpu()]  # [B, Lq]
        rows = q_in.any(0).nonzero()
        if rows.numel() == 0:
            return None
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        kp, ki = event.key_position.cpu(), event.key_image.cpu()  # [B, Lk]
        in_seq = kp >= 0
        k_in = in_seq & k_all.gather(1, kp.clamp(min=0))
        image = ~in_seq & (ki >= 0)  # keys outside the sequence: Owl3 image keys, [image keys ; text keys]
        if image.any():
            k_in |= image & _images_in(self.keys, int(ki.max()) + 1, kp.shape[0]).gather(1, ki.clamp(min=0))
            if self.image_keys is not None:
                patches = self.image_keys.flatten(1).cpu().bool()  # [B, N*T], the order of the image keys
                n = min(patches.shape[1], kp.shape[1])
                k_in[:, :n] |= image[:, :n] & patches[:, :n]
        if not k_in.any():
            return None
        blocked = q_in[:, r0:r1, None] & k_in[:, None, :]  # [B, c, Lk], c = rows the knockout touches
        if self.heads is not None:  # per head: [B, H, c, Lk]
            on = torch.zeros(event.query.shape[1], dtype=torch.bool)
            on[self.heads] = True
            blocked = blocked[:, None] & on[None, :, None, None]
        return RowKeep(r0, ~blocked.to(event.key_position.device))


@contextmanager
def knockout(
    model: nn.Module,
    queries="all",
    keys="visual",
    layers: Iterable[int] | None = None,
    heads: Iterable[int] | None = None,
    image_keys: torch.Tensor | None = None,
):
    """Block attention from ``queries`` to ``keys`` at ``layers`` inside the ``with`` block.

    Args:
        model: an Owl model (registered family).
        queries, keys: group names (see the module docstring), a list of them, or [B, S] bool masks.
        layers: decoder layers (None = all; an empty list = no-op).
        heads: query heads to block (None = all); other heads keep their keys.
        image_keys: [B, N, T] bool, single image keys (patches) outside the sequence to block for
            ``queries``, on top of ``keys`` (Owl3 visual-token pruning uses it).
    """
    _check_group(queries)
    _check_group(keys)
    spec = family_spec(model)
    if image_keys is not None and spec.images_in_sequence:
        raise ValueError(
            f"image_keys= is for images that are keys outside the sequence; {spec.name} image rows "
            "are sequence positions: pass keys= a [B, S] bool mask"
        )
    total = n_layers(model, spec)
    layers = list(range(total)) if layers is None else sorted({int(i) for i in layers})
    bad = [i for i in layers if not 0 <= i < total]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {total} decoder layers")
    n_heads = model.get_submodule(spec.path("attention", i=0)).num_heads
    heads = None if heads is None else sorted({int(h) for h in heads})
    if heads is not None and any(not 0 <= h < n_heads for h in heads):
        raise ValueError(f"heads {heads} out of range: the model has {n_heads} heads")
    plan = _Plan(queries, keys, image_keys, heads)
    modules = [model.get_submodule(spec.path("attention", i=i)) for i in layers]
    busy = [m for m in modules if getattr(m, "attention_edit", None) is not None]
    if busy:
        raise RuntimeError(
            "another knockout is active on these layers; nest knockouts on disjoint layers only"
        )
    handle = model.get_submodule(spec.paths["layout"]).register_forward_hook(
        lambda module, args, out: plan.update(args[0])
    )
    try:
        for m in modules:
            m.attention_edit = plan.keep
        yield model
    finally:
        handle.remove()
        for m in modules:
            m.attention_edit = None


__all__ = ["NAMES", "knockout"]
