"""Writable hook sites: read (``record``) or replace (``edit``) named tensors of a forward pass.

Site names are TransformerLens-style and the same for every family (see ``owl_lab.families``)::

    hook_image_embeds                 visual features the decoder consumes (Owl2 [n_images, T, D]
                                      rows after abstractor + projection; Owl3 projected patches)
    blocks.{i}.hook_resid_pre         [B, L, D] residual stream entering block i
    blocks.{i}.attn.hook_z            [B, L, H, Dh] attention context before the output projection
    blocks.{i}.hook_attn_out          [B, L, D] attention output added to the stream
    blocks.{i}.hook_resid_mid         [B, L, D] residual after the attention update
    blocks.{i}.hook_mlp_out           [B, L, D] MLP output added to the stream
    blocks.{i}.hook_resid_post        [B, L, D] residual stream leaving block i
    blocks.{i}.attn.hook_gate         Owl3 gated hyper layers: gate g
    blocks.{i}.attn.hook_cross_z      Owl3 gated hyper layers: cross-attention context

Where a site lives is data: ``FamilySpec.sites`` maps each name to the module path of a
``HookPoint`` inside the model; a forward hook on it sees the tensor and may return a replacement.
For a model built without those hook points (a checkpoint class from before the causal toolkit, or a
third-party model with the same block structure) the block-level sites fall back to hooks on the
components themselves (``FamilySpec.paths``): the decoder layer's input and output, the attention
and MLP outputs, the output projection's input. ``hook_resid_mid`` is then readable but not
writable, and the gate sites do not exist.

Every hook is removed when the ``with`` block exits, also on an exception. Hooks fire on every
forward call, so an edit applies to a plain forward and to every step of ``generate``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from owl_lab.families import FamilySpec, family_of

#: Order in which one block's sites are listed (the order the forward computes them).
_BLOCK_ORDER = (
    "hook_resid_pre",
    "attn.hook_z",
    "attn.hook_gate",
    "attn.hook_cross_z",
    "hook_attn_out",
    "hook_resid_mid",
    "hook_mlp_out",
    "hook_resid_post",
)
_SITE_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def family_spec(model: nn.Module) -> FamilySpec:
    """The registry entry of ``model`` (``owl_lab.families.family_of``; ValueError for unknown models).

    A stock transformers family is prepared on the way (its observation points and knockout slot are
    installed, ``FamilySpec.prepare``), so record/edit/knockout work on a plain stock model."""
    spec = family_of(model)
    if spec.prepare is not None:
        spec.prepare(model)
    return spec


def _module(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def n_layers(model: nn.Module, spec: FamilySpec | None = None) -> int:
    """Number of decoder blocks of ``model``."""
    spec = spec or family_spec(model)
    layers = _module(model, spec.paths["decoder_layer"].rsplit(".", 1)[0])
    return len(layers)


@dataclass(frozen=True)
class Site:
    """One resolved site: how to attach to it.

    ``how`` is ``"point"`` (forward hook on a HookPoint: value in, replacement out), ``"input"`` (a
    forward pre-hook on ``module``: the value is its first positional argument), ``"output"`` (a
    forward hook: the value is the output, or its first element when the output is a tuple) or
    ``"features"`` (Owl2 abstractor output object, value in its ``features`` field).
    ``heads`` > 0 means the value is shown as [B, L, heads, Dh] although the module sees [B, L, H*Dh].
    """

    name: str
    module: nn.Module
    how: str
    writable: bool = True
    heads: int = 0


def _fallback(model: nn.Module, spec: FamilySpec, name: str) -> Site | None:
    """The component-level attachment of ``name`` when the model has no HookPoint for it."""
    if name == "hook_image_embeds":
        bridge = _module(model, spec.paths.get("bridge", ""))
        if bridge is None:
            return None
        return Site(name, bridge, "features" if spec.name == "owl2" else "output")
    m = _SITE_RE.match(name)
    if m is None:
        return None
    i, site = m.group(1), m.group(2)
    path = lambda component: spec.paths[component].replace("{i}", i)  # noqa: E731
    if site == "hook_resid_pre":
        return Site(name, _module(model, path("decoder_layer")), "input")
    if site == "hook_resid_post":
        return Site(name, _module(model, path("decoder_layer")), "output")
    if site == "hook_attn_out":
        return Site(name, _module(model, path("attention")), "output")
    if site == "hook_mlp_out":
        return Site(name, _module(model, path("mlp")), "output")
    if site == "hook_resid_mid":
        return Site(name, _module(model, path("post_norm")), "input", writable=False)
    if site == "attn.hook_z":
        attention = _module(model, path("attention"))
        return Site(name, attention.o_proj, "input", heads=attention.num_heads)
    return None


def resolve(model: nn.Module) -> dict[str, Site]:
    """Every site of ``model`` by name, in forward order (image embeddings first)."""
    spec = family_spec(model)
    names = ["hook_image_embeds"] + [
        f"blocks.{i}.{s}" for i in range(n_layers(model, spec)) for s in _BLOCK_ORDER
    ]
    patterns = {}
    for pattern, module_path in spec.sites.items():
        regex = re.escape(pattern).replace(re.escape("{i}"), r"(\d+)")
        patterns[re.compile(f"^{regex}$")] = module_path
    sites: dict[str, Site] = {}
    for name in names:
        point = None
        for regex, module_path in patterns.items():
            m = regex.match(name)
            if m:
                point = _module(model, module_path.replace("{i}", m.group(1)) if m.groups() else module_path)
                break
        if point is not None:
            sites[name] = Site(name, point, "point")
        elif (site := _fallback(model, spec, name)) is not None and site.module is not None:
            sites[name] = site
    return sites


def sites(model: nn.Module) -> list[str]:
    """Names of the sites ``model`` has, in forward order (``hook_image_embeds``, then block by block)."""
    return list(resolve(model))


def _lookup(model: nn.Module, names: Iterable[str]) -> list[Site]:
    if isinstance(names, str):
        names = [names]
    table = resolve(model)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(
            f"unknown site(s) {unknown} for {type(model).__name__}; hooks.sites(model) lists "
            f"{len(table)}, e.g. {list(table)[:4]}"
        )
    return [table[n] for n in names]


def _attach(site: Site, fn: Callable[[torch.Tensor], torch.Tensor | None]):
    """Register ``fn(value) -> replacement or None`` on ``site``; returns the handle."""

    def as_view(x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (site.heads, -1)) if site.heads else x

    def back(new: torch.Tensor | None, old: torch.Tensor) -> torch.Tensor | None:
        if new is None:
            return None
        if new is not old and new.shape != as_view(old).shape:
            raise ValueError(
                f"edit of {site.name} returned shape {tuple(new.shape)}, expected {tuple(as_view(old).shape)}"
            )
        return new.flatten(-2) if site.heads and new is not old else new

    if site.how == "input":

        def pre_hook(module, args):
            new = back(fn(as_view(args[0])), args[0])
            return None if new is None or new is args[0] else (new, *args[1:])

        return site.module.register_forward_pre_hook(pre_hook)

    def hook(module, args, output):
        if site.how == "features":
            new = back(fn(output.features), output.features)
            return (
                None if new is None or new is output.features else dataclasses.replace(output, features=new)
            )
        if isinstance(output, tuple):
            new = back(fn(as_view(output[0])), output[0])
            return None if new is None or new is output[0] else (new, *output[1:])
        new = back(fn(as_view(output)), output)
        return None if new is None or new is output else new

    return site.module.register_forward_hook(hook)


class ActivationCache(Mapping):
    """What :func:`record` saw: ``cache[name]`` is the tensor of the forward pass.

    Under ``generate`` every call is kept (``cache.steps[name]``); ``cache[name]`` then concatenates
    the per-call tensors along the sequence dimension (dim 1) for block sites, and returns the first
    call's tensor for ``hook_image_embeds`` (images are encoded once).
    """

    def __init__(self, names: list[str]):
        self.steps: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def __getitem__(self, name: str) -> torch.Tensor:
        values = self.steps[name]
        if not values:
            raise KeyError(f"{name} was recorded but no forward pass reached it")
        if len(values) == 1 or name == "hook_image_embeds":
            return values[0]
        return torch.cat(values, dim=1)

    def __iter__(self) -> Iterator[str]:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)


@contextmanager
def _hooked(model: nn.Module, fns: Mapping[str, Callable]):
    handles = []
    try:
        for site in _lookup(model, list(fns)):
            handles.append(_attach(site, fns[site.name]))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def record(model: nn.Module, names: Iterable[str] | str, detach: bool = True):
    """Record the tensors at ``names`` (see :func:`sites`) during the forward passes in the block.

    Yields an :class:`ActivationCache`; ``cache["blocks.3.hook_resid_post"]`` is [B, L, D].
    """
    names = [names] if isinstance(names, str) else list(names)
    cache = ActivationCache(names)

    def keeper(name):
        def keep(value):
            cache.steps[name].append(value.detach() if detach else value)

        return keep

    with _hooked(model, {n: keeper(n) for n in names}):
        yield cache


@contextmanager
def edit(model: nn.Module, edits: Mapping[str, Callable[[torch.Tensor], torch.Tensor]]):
    """Replace the tensor at each site by ``fn(value)`` inside the block (every forward call).

    ``fn`` gets the tensor the model computed and returns the one it should use instead (same
    shape; returning the argument itself is an exact no-op).
    """
    for site in _lookup(model, list(edits)):
        if not site.writable:
            raise ValueError(
                f"{site.name} is read-only on {type(model).__name__} (no HookPoint for it); "
                "edit hook_resid_pre of the next block or hook_attn_out instead"
            )
    with _hooked(model, dict(edits)):
        yield model


__all__ = ["ActivationCache", "Site", "edit", "family_spec", "n_layers", "record", "resolve", "sites"]
