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

Rules. A query always keeps its own key, so no softmax row of the self/joint attention is ever
empty. In Owl3's gated (240728) hyper layers a query left with no image key behaves as a token that
saw no image (its self-attention output passes unchanged); in the fused (241101) softmax the
remaining keys renormalise. A knockout that blocks nothing in a call (``layers=[]``, a group with
no positions) does not touch that call, so the logits stay bitwise equal. The mask is handed to the
model through the same objects its kernels and observation events read (Owl2 ``Owl2Sequence``,
Owl3 ``AttnContext``), so ``capture()`` inside a knockout records the softmax actually used. The
kernels get a [B, 1, Lq, Lk] mask, never a per-head [B, H, Lq, Lk] tensor.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import nn

from hooks.groups import BOS as G_BOS
from hooks.groups import GENERATED, N_TOKEN_FIXED, PLACEHOLDER, QUESTION, SequenceHistory, key_groups
from hooks.sites import family_spec, n_layers
from owl_lab.models.observe import TOKEN_PAD

_FIXED = {"bos": (G_BOS,), "question": (QUESTION,), "placeholder": (PLACEHOLDER,), "generated": (GENERATED,),
          "text": (G_BOS, QUESTION, PLACEHOLDER, GENERATED)}
NAMES = ("visual", "text", "bos", "question", "placeholder", "generated", "last", "all")


def _check_group(group) -> None:
    names = [group] if isinstance(group, str) else (group if isinstance(group, (list, tuple)) else [])
    for name in names:
        if not isinstance(name, str) or not (name in NAMES or (name.startswith("image:") and name[6:].isdigit())):
            raise ValueError(f"unknown knockout group {name!r}; expected one of {list(NAMES)}, 'image:k', "
                             "a list of them, or a [B, S] bool tensor")
    if not isinstance(group, (str, list, tuple, torch.Tensor)):
        raise ValueError(f"a knockout group is a name, a list of names or a [B, S] bool tensor, got {type(group)}")


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
        last = torch.where(real, idx, -1).amax(1)
        return idx == last[:, None]
    n_images = max([0, *history.images_per_sample, int(history.image.max()) + 1 if S else 0])
    g = key_groups(history, torch.arange(S).expand(B, S), torch.full((B, S), -1), n_images)  # [B, S]
    if group == "visual":
        return (g >= N_TOKEN_FIXED) & real
    if group.startswith("image:"):
        return (g == N_TOKEN_FIXED + int(group[6:])) & real
    return torch.isin(g, torch.tensor(_FIXED[group])) & real


def _images_in(group, n_images: int, batch: int) -> torch.Tensor:
    """[B, N] bool: which image keys (Owl3 hyper layers) belong to ``group``."""
    if isinstance(group, torch.Tensor):
        return torch.zeros(batch, n_images, dtype=torch.bool)
    if isinstance(group, (list, tuple)):
        out = torch.zeros(batch, n_images, dtype=torch.bool)
        for name in group:
            out |= _images_in(name, n_images, batch)
        return out
    out = torch.zeros(batch, n_images, dtype=torch.bool)
    if group in ("visual", "all"):
        out[:] = True
    elif group.startswith("image:") and int(group[6:]) < n_images:
        out[:, int(group[6:])] = True
    return out


class _Plan:
    """Resolves the groups against the sequence seen so far and builds the blocked masks."""

    def __init__(self, queries, keys):
        self.queries, self.keys = queries, keys
        self.history = SequenceHistory()
        self._cached = None

    def blocked_sequence(self, query_index: torch.Tensor, n_keys: int) -> torch.Tensor:
        """[B, Lq, Lk] bool over sequence keys (own key never blocked); the same for every layer of a call."""
        key = (self.history.length, int(query_index[0]), query_index.shape[0], n_keys)
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        q_in = _positions_in(self.queries, self.history)[:, query_index.cpu()]  # [B, Lq]
        k_in = _positions_in(self.keys, self.history)[:, :n_keys]  # [B, Lk]
        own = query_index.cpu()[:, None] == torch.arange(n_keys)[None, :]  # [Lq, Lk]
        blocked = q_in[:, :, None] & k_in[:, None, :] & ~own[None]
        self._cached = (key, blocked)
        return blocked

    def blocked_images(self, query_index: torch.Tensor, n_images: int) -> torch.Tensor:
        """[B, Lq, N] bool over Owl3 image keys (per image)."""
        q_in = _positions_in(self.queries, self.history)[:, query_index.cpu()]  # [B, Lq]
        k_in = _images_in(self.keys, n_images, q_in.shape[0])  # [B, N]
        return q_in[:, :, None] & k_in[:, None, :]


class _KnockedOwl2Sequence:
    """An ``Owl2Sequence`` whose masks also exclude the blocked (query, key) pairs."""

    def __init__(self, seq, blocked: torch.Tensor):
        self._seq, self._blocked = seq, blocked.to(seq.attention_mask.device)  # [B, L, P+L]
        self._masks = {}

    def __getattr__(self, name):
        return getattr(self._seq, name)

    def allowed(self, q0: int, q1: int) -> torch.Tensor:
        return self._seq.allowed(q0, q1) & ~self._blocked[:, q0:q1]

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._masks:
            allowed = self.allowed(0, self._seq.length)[:, None]  # [B, 1, L, P+L]
            self._masks[dtype] = torch.where(allowed, torch.zeros((), dtype=dtype, device=allowed.device),
                                             torch.finfo(dtype).min)
        return self._masks[dtype]

    def sdpa_mask(self, dtype: torch.dtype):
        # a boolean mask (True = attend) is a quarter of the additive one and gives the same softmax
        return self.allowed(0, self._seq.length)[:, None], False

    def eager_mask(self, dtype: torch.dtype):
        return self.additive_mask(dtype)


def _knocked_owl3_context(ctx, blocked_text: torch.Tensor, blocked_images: torch.Tensor | None,
                          blocked_patches: torch.Tensor | None = None):
    """A copy of an Owl3 ``AttnContext`` whose text and image visibility exclude the blocked pairs.

    blocked_text [B, Lq, Lk]; blocked_images [B, Lq, N] whole images; blocked_patches [B, Lq, N*T]
    single image keys (an image whose every key is blocked for a query counts as not visible).
    """
    base = type(ctx)

    class KnockedContext(base):
        def text_allowed(self, q0: int, q1: int, lk: int) -> torch.Tensor:
            return base.text_allowed(self, q0, q1, lk) & ~blocked_text[:, q0:q1, :lk]

        def image_allowed(self, q0: int, q1: int) -> torch.Tensor:
            allowed = base.image_allowed(self, q0, q1)
            return allowed if blocked_patches is None else allowed & ~blocked_patches[:, q0:q1]

    fields = {f.name: getattr(ctx, f.name) for f in dataclasses.fields(ctx)}
    knocked = KnockedContext(**fields)
    if knocked.key_valid is None:  # force the explicit-mask path (the fast path is plain causal)
        lk = blocked_text.shape[-1]
        knocked.key_valid = torch.ones(ctx.batch_size, lk, dtype=torch.bool, device=ctx.query_index.device)
    if blocked_images is not None and ctx.image_visible is not None:
        knocked.image_visible = ctx.image_visible & ~blocked_images
    if blocked_patches is not None and ctx.image_visible is not None:
        b, lq, n = ctx.image_visible.shape
        all_gone = blocked_patches.view(b, lq, n, -1).all(-1)  # [B, Lq, N]
        knocked.image_visible = knocked.image_visible & ~all_gone
    return knocked


@contextmanager
def knockout(model: nn.Module, queries="all", keys="visual", layers: Iterable[int] | None = None,
             heads: Iterable[int] | None = None, image_keys: torch.Tensor | None = None):
    """Block attention from ``queries`` to ``keys`` at ``layers`` inside the ``with`` block.

    Args:
        model: an Owl model (registered family).
        queries, keys: group names (see the module docstring), a list of them, or [B, S] bool masks.
        layers: decoder layers (None = all; an empty list = no-op).
        heads: must be None (all heads): a per-head mask would need a [B, H, Lq, Lk] tensor.
        image_keys: Owl3 only, [B, N, T] bool: single image keys (patches) to block for ``queries``
            in hyper layers, on top of ``keys`` (visual-token pruning uses it).
    """
    _check_group(queries)
    _check_group(keys)
    if heads is not None:
        raise ValueError("heads= other than None is not supported: a per-head mask would need a [B, H, Lq, Lk] "
                         "tensor; knock out whole layers, or edit blocks.{i}.attn.hook_z for one head")
    spec = family_spec(model)
    if image_keys is not None and spec.name != "owl3":
        raise ValueError("image_keys= is for models whose images are keys outside the sequence (Owl3); "
                         "Owl2 image rows are sequence positions: pass keys= a [B, S] bool mask")
    total = n_layers(model, spec)
    layers = list(range(total)) if layers is None else sorted({int(i) for i in layers})
    bad = [i for i in layers if not 0 <= i < total]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {total} decoder layers")
    plan = _Plan(queries, keys)
    handles = [model.get_submodule(spec.paths["layout"]).register_forward_hook(
        lambda module, args, out: plan.history.update(args[0]))]

    def owl2_hook(module, args):
        seq = args[3]
        P = seq.past_length
        blocked = plan.blocked_sequence(torch.arange(P, P + seq.length), seq.attention_mask.shape[1])
        if not blocked.any():
            return None
        return (*args[:3], _KnockedOwl2Sequence(seq, blocked), *args[4:])

    def owl3_hook(module, args):
        ctx = args[1]
        lk = ctx.past_length + ctx.query_index.shape[0]
        blocked_text = plan.blocked_sequence(ctx.query_index, lk)
        blocked_images = blocked_patches = None
        if ctx.image_visible is not None and len(args) > 2 and args[2] is not None:
            blocked_images = plan.blocked_images(ctx.query_index, ctx.image_visible.shape[-1])
            if image_keys is not None:
                q_in = _positions_in(queries, plan.history)[:, ctx.query_index.cpu()]  # [B, Lq]
                blocked_patches = q_in[:, :, None] & image_keys.flatten(1).cpu().bool()[:, None, :]
        if not blocked_text.any() and not any(x is not None and x.any() for x in (blocked_images, blocked_patches)):
            return None
        device = ctx.query_index.device
        knocked = _knocked_owl3_context(ctx, blocked_text.to(device),
                                        None if blocked_images is None else blocked_images.to(device),
                                        None if blocked_patches is None else blocked_patches.to(device))
        return (args[0], knocked, *args[2:])

    # How the mask reaches the kernel is the one family-specific step (the mask objects differ).
    hook = {"owl2": owl2_hook, "owl3": owl3_hook}[spec.name]
    try:
        for i in layers:
            attention = model.get_submodule(spec.paths["attention"].replace("{i}", str(i)))
            handles.append(attention.register_forward_pre_hook(hook))
        yield model
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["NAMES", "knockout"]
