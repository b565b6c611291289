"""Checkpoint names → directories, model-family detection, and the one loading entry point.

A checkpoint directory is whatever the official releases ship (``config.json`` plus
``model.safetensors`` or sharded ``pytorch_model-*.bin`` with an index) and, optionally, tokenizer
files. The lab's own tiny checkpoints live in ``data/checkpoints/<name>/`` in the same format.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

FAMILIES = ("owl2", "owl3", "llava")

# config.json model_type → family
_MODEL_TYPES = {"mplug_owl2": "owl2", "mplugowl3": "owl3", "llava": "llava"}
# state_dict key prefixes that identify a family when config.json is silent
_KEY_MARKERS = {
    "owl2": ("model.visual_abstractor.", "model.vision_model."),
    "owl3": ("language_model.model.", "vision2text_model"),
}


def data_dir() -> Path:
    """The project's ``data/`` folder (override with ``OWL_LAB_DATA``)."""
    env = os.environ.get("OWL_LAB_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "data"


def checkpoints_dir() -> Path:
    return data_dir() / "checkpoints"


def list_checkpoints() -> list[str]:
    """Names of the shipped checkpoints (sub-directories of ``data/checkpoints`` with a config)."""
    root = checkpoints_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """Turn a shipped checkpoint name or a directory path into an existing directory."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    shipped = checkpoints_dir() / str(name_or_path)
    if shipped.is_dir():
        return shipped
    known = ", ".join(list_checkpoints()) or "(none shipped yet)"
    raise FileNotFoundError(
        f"No checkpoint directory or shipped checkpoint named {str(name_or_path)!r}. "
        f"Shipped checkpoints: {known}."
    )


def checkpoint_keys(directory: Path) -> list[str]:
    """State-dict key names stored in a checkpoint directory, read without loading tensors."""
    directory = Path(directory)
    keys: list[str] = []
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            return sorted(json.loads(index.read_text())["weight_map"])
    # Only weight files: model.safetensors or model-0000k-of-0000n.safetensors (a folder may hold
    # other safetensors files, e.g. the goldens' inputs/outputs).
    for st in sorted(directory.glob("model*.safetensors")):
        from safetensors import safe_open

        with safe_open(str(st), framework="pt") as f:
            keys.extend(f.keys())
    return sorted(keys)


def model_family(model) -> str:
    """Return ``"owl2"`` or ``"owl3"`` for a loaded model (from ``model.config.model_type``).

    Raises ValueError naming the class and model_type of anything else.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _MODEL_TYPES:
        raise ValueError(
            f"expected an mPLUG-Owl2 / mPLUG-Owl3 model (config.model_type 'mplug_owl2' or 'mplugowl3'); "
            f"got {type(model).__name__} with model_type={model_type!r}."
        )
    return _MODEL_TYPES[model_type]


def detect_family(directory: str | os.PathLike) -> str:
    """Return ``"owl2"`` or ``"owl3"`` for a checkpoint directory.

    Uses ``config.json``'s ``model_type`` first, then the state-dict key names.
    Raises ValueError naming what was found when neither identifies a known family.
    """
    directory = resolve_checkpoint(directory)
    config_path = directory / "config.json"
    model_type = None
    if config_path.is_file():
        model_type = json.loads(config_path.read_text()).get("model_type")
        if model_type in _MODEL_TYPES:
            return _MODEL_TYPES[model_type]
    keys = checkpoint_keys(directory)
    for family, markers in _KEY_MARKERS.items():
        if any(k.startswith(markers[0]) for k in keys) and any(k.startswith(markers[1]) for k in keys):
            return family
    sample = ", ".join(keys[:5]) or "no weight files"
    raise ValueError(
        f"Unknown model family in {directory}: config model_type={model_type!r}, keys start with "
        f"[{sample}]. owl-lab supports mPLUG-Owl2 (model_type 'mplug_owl2') and mPLUG-Owl3 "
        f"(model_type 'mplugowl3')."
    )


def load_owl(name_or_path: str | os.PathLike, *, device_map=None, torch_dtype=None):
    """Load a model and its processor from a shipped name or a local checkpoint directory.

    Args:
        name_or_path: a shipped checkpoint name (see :func:`list_checkpoints`) or a directory with
            ``config.json`` and weights in the official format.
        device_map, torch_dtype: passed through to the family loader (as in ``from_pretrained``).

    Returns:
        ``(model, processor)``; ``model`` is in eval mode. ``processor`` is None when the directory
        has no tokenizer files (e.g. bare golden fixtures).
    """
    directory = resolve_checkpoint(name_or_path)
    family = detect_family(directory)
    if family == "owl2":
        from owl_lab.models.owl2 import load_checkpoint
    elif family == "llava":
        from owl_lab.models.llava import load_checkpoint
    else:
        from owl_lab.models.owl3 import load_checkpoint
    return load_checkpoint(directory, device_map=device_map, torch_dtype=torch_dtype)
