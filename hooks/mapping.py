"""Where each observable component lives, per model family (component → module-path pattern).

This table is the only model-specific knowledge in ``hooks``: everything else consumes the events
defined in :mod:`owl_lab.models.observe`. ``{i}`` stands for a decoder layer index, ``{k}`` for an
Owl2 abstractor layer index. A component missing from a family's row does not exist there.

=============  ==================================================================  =====================
component      hook point receives                                                 families
=============  ==================================================================  =====================
layout         SequenceLayout, once per top-level forward (one decode step)        owl2, owl3
attention      AttentionEvent ``self`` / ``cross`` / ``joint``, q [B,H,Lq,D],       owl2, owl3
               k [B,H_kv,Lk,D]
abstractor     AttentionEvent ``abstractor``, q [N_img,H,Q,D], keys [queries; CLS;  owl2
               patches]
gate           GateEvent, g [B,L,H,D] (Owl3 240728 gated hyper layers)              owl3 (gated only)
=============  ==================================================================  =====================
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from hooks.transformers_attention import install

# config.model_type → family
MODEL_TYPES = {"mplug_owl2": "owl2", "mplugowl3": "owl3", "llava": "llava"}

HOOK_PATHS: dict[str, dict[str, str]] = {
    "owl2": {
        "layout": "hook_layout",
        "attention": "model.layers.{i}.self_attn.hook_attn",
        "abstractor": "model.visual_abstractor.encoder.layers.{k}.crossattention.attention.hook_attn",
    },
    "llava": {  # stock transformers LLaVA; hook points added by hooks.transformers_attention.install
        "layout": "hook_layout",
        "attention": "model.language_model.layers.{i}.self_attn.hook_attn",
    },
    "owl3": {
        "layout": "hook_layout",
        "attention": "language_model.model.layers.{i}.self_attn.hook_attn",
        "gate": "language_model.model.layers.{i}.self_attn.hook_gate",
    },
}


def detect_family(model: nn.Module) -> str:
    """``"owl2"`` or ``"owl3"`` from ``model.config.model_type``; ValueError for anything else."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"hooks.capture supports mPLUG-Owl models (config.model_type in {sorted(MODEL_TYPES)}), "
            f"got model_type={model_type!r} ({type(model).__name__})."
        )
    return MODEL_TYPES[model_type]


#: families that are stock transformers models: their hook points are installed on first use
STOCK_FAMILIES = ("llava",)


def prepare(model: nn.Module, family: str) -> None:
    """Install the attention observer on a stock transformers model (no-op for the Owl families)."""
    if family in STOCK_FAMILIES:


        install(model)


def _pattern_regex(pattern: str) -> re.Pattern:
    parts = re.split(r"(\{[a-z]\})", pattern)
    body = "".join(r"(\d+)" if re.fullmatch(r"\{[a-z]\}", p) else re.escape(p) for p in parts)
    return re.compile(rf"^{body}$")


@dataclass(frozen=True)
class HookSite:
    """One resolved hook point: its component, index ({i} or {k}; -1 if none), path and module."""

    component: str
    index: int
    path: str
    module: nn.Module


def find_sites(model: nn.Module, family: str, component: str) -> list[HookSite]:
    """All modules of ``model`` matching the family's pattern for ``component``, sorted by index.

    Returns [] when the family has no such component or the model has no matching module.
    """
    pattern = HOOK_PATHS[family].get(component)
    if pattern is None:
        return []
    regex = _pattern_regex(pattern)
    sites = []
    for path, module in model.named_modules():
        m = regex.match(path)
        if m:
            index = int(m.group(1)) if m.groups() else -1
            sites.append(HookSite(component, index, path, module))
    return sorted(sites, key=lambda s: s.index)
