"""The registry of families and the lookups everything else uses: by name, by loaded model, by
checkpoint directory, and from a component name to the module(s) it names in a model."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from owl_lab.families.llava import LLAVA
from owl_lab.families.owl2 import OWL2
from owl_lab.families.owl3 import OWL3
from owl_lab.families.spec import FamilySpec
from owl_lab.models.loading import checkpoint_keys

#: Every registered family, by name. Adding a family = adding an entry here.
FAMILIES: dict[str, FamilySpec] = {spec.name: spec for spec in (OWL2, OWL3, LLAVA)}


# ---- lookups -------------------------------------------------------------------------------------
def _supported() -> str:
    return ", ".join(
        f"{s.title} ({s.name!r}, model_type {'/'.join(s.model_types)})" for s in FAMILIES.values()
    )


def get_family(name: str | FamilySpec) -> FamilySpec:
    """The registered family called ``name`` (a spec is returned as is); ValueError naming the known ones."""
    if isinstance(name, FamilySpec):
        return name
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; registered families: {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_for_model_type(model_type: str | None) -> FamilySpec | None:
    """The family owning ``config.model_type`` (None when no registered family does)."""
    return next((s for s in FAMILIES.values() if model_type in s.model_types), None)


def family_of(model: nn.Module) -> FamilySpec:
    """The family of a loaded model, from ``model.config.model_type``.

    Raises:
        ValueError: naming the class and model_type of anything no registered family owns.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = family_for_model_type(model_type)
    if spec is None:
        raise ValueError(
            f"expected a model of a registered family ({_supported()}); "
            f"got {type(model).__name__} with model_type={model_type!r}."
        )
    return spec


def family_of_checkpoint(directory: str | os.PathLike) -> FamilySpec:
    """The family of a checkpoint directory: ``config.json``'s ``model_type``, else the key markers.

    Raises:
        ValueError: naming the model_type and first keys found when neither identifies a family.
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    model_type = json.loads(config_path.read_text()).get("model_type") if config_path.is_file() else None
    spec = family_for_model_type(model_type)
    if spec is not None:
        return spec
    try:
        keys = checkpoint_keys(directory)
    except FileNotFoundError:
        keys = []
    for spec in FAMILIES.values():
        if all(any(k.startswith(marker) for k in keys) for marker in spec.key_markers):
            return spec
    sample = ", ".join(keys[:5]) or "no weight files"
    raise ValueError(
        f"Unknown model family in {directory}: config model_type={model_type!r}, keys start with "
        f"[{sample}]. Registered families: {_supported()}."
    )


# ---- module paths ----------------------------------------------------------------------------------
def resolve_path(
    model: nn.Module, spec: FamilySpec | str, component: str, i: int | None = None, k: int | None = None
):
    """The object at ``component``'s path in ``model`` (a module, or a method such as ``encode_images``)."""
    return get_family(spec).resolve(model, component, i, k)


def _pattern_regex(pattern: str) -> re.Pattern:
    parts = re.split(r"(\{[a-z]\})", pattern)
    body = "".join(r"(\d+)" if re.fullmatch(r"\{[a-z]\}", p) else re.escape(p) for p in parts)
    return re.compile(rf"^{body}$")


@dataclass(frozen=True)
class HookSite:
    """One resolved module: its component, index (``{i}`` or ``{k}``; -1 if none), path and module."""

    component: str
    index: int
    path: str
    module: nn.Module


def find_sites(model: nn.Module, spec: FamilySpec | str, component: str) -> list[HookSite]:
    """All modules of ``model`` matching the family's pattern for ``component``, sorted by index.

    Returns [] when the family has no such component or the model has no matching module (e.g. the
    gate of a fused Owl3).
    """
    pattern = get_family(spec).paths.get(component)
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
