"""Checkpoint names → directories, and the one loading entry point :func:`load_owl`.

A checkpoint directory is whatever the official releases ship (``config.json`` plus
``model.safetensors`` or sharded ``pytorch_model-*.bin`` with an index) and, optionally, tokenizer
files. The lab's own tiny checkpoints live in ``data/checkpoints/<name>/`` in the same format.
Which family a directory holds, and how to load it, is the registry's knowledge
(:mod:`owl_lab.families`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from owl_lab.families import family_of_checkpoint
from owl_lab.models.dispatch import dispatch_loaded, needs_dispatch
from owl_lab.models.loading import check_attn_implementation, checkpoint_keys

__all__ = [
    "data_dir",
    "checkpoints_dir",
    "list_checkpoints",
    "resolve_checkpoint",
    "checkpoint_keys",
    "detect_family",
    "native_render_size",
    "load_owl",
]


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
    known = ", ".join(list_checkpoints()) or "(none)"
    raise FileNotFoundError(
        f"No checkpoint directory or shipped checkpoint named {str(name_or_path)!r}. "
        f"Shipped checkpoints: {known}."
    )


def detect_family(name_or_path: str | os.PathLike) -> str:
    """The family name (``"owl2"``, ``"owl3"``) of a shipped checkpoint name or checkpoint directory.

    (For a loaded model use :func:`owl_lab.families.family_of`.) Raises ValueError naming what was
    found when neither ``config.json`` nor the key names identify a registered family.
    """
    return family_of_checkpoint(resolve_checkpoint(name_or_path)).name


def native_render_size(name_or_path: str | os.PathLike, default: int = 112) -> int:
    """The side (px) of the scene renders a checkpoint was trained on: its ``recipe.json``'s
    ``world.render_size``, else ``default`` (the worlds' native 112, also for checkpoints without a recipe).

    A model whose processor resizes by a non-integer factor loses the 1-px pattern bands (llava-tiny:
    96 → 48 px keeps them, 112 → 48 px does not), so analyses render held-out scenes at this size.
    """
    recipe = resolve_checkpoint(name_or_path) / "recipe.json"
    if not recipe.is_file():
        return default
    return int(json.loads(recipe.read_text()).get("world", {}).get("render_size", default))


def load_owl(
    name_or_path: str | os.PathLike,
    *,
    dtype=None,
    torch_dtype=None,
    device_map=None,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
    attn_implementation: str | None = None,
):
    """Load a model and its processor from a shipped name or a local checkpoint directory.

    Args:
        name_or_path: a shipped checkpoint name (see :func:`list_checkpoints`) or a directory with
            ``config.json`` and weights in the official format.
        dtype: None (float32), a ``torch.dtype`` or its name, or ``"auto"`` (the checkpoint's own
            dtype); ``torch_dtype`` is an alias.
        device_map: None (CPU) or one device (a plain load); ``"auto"`` / ``"balanced"`` /
            ``"sequential"`` or a dict of module path → device (``"cpu"``, ``"disk"``, ...) spread the
            model through accelerate (:mod:`owl_lab.models.dispatch`).
        max_memory, offload_folder: accelerate's budget per device and folder for ``"disk"`` modules.
        attn_implementation: None (the config's choice), ``"eager"`` or ``"sdpa"``.

    Returns:
        ``(model, processor)``; ``model`` is in eval mode. ``processor`` is None when the directory
        has no tokenizer files (e.g. bare golden fixtures).

    See :mod:`owl_lab.models.loading` for the exact meaning of each option (one for every family).
    """
    check_attn_implementation(attn_implementation)
    directory = resolve_checkpoint(name_or_path)
    spec = family_of_checkpoint(directory)
    dispatch = needs_dispatch(device_map)
    if not dispatch and (max_memory is not None or offload_folder is not None):
        raise ValueError(
            "max_memory / offload_folder only apply when device_map spreads the model (an auto strategy "
            f"or a dict of several devices); got device_map={device_map!r}."
        )
    model, processor = spec.loader(
        directory,
        dtype=dtype,
        torch_dtype=torch_dtype,
        device_map=None if dispatch else device_map,
        attn_implementation=attn_implementation,
    )
    if dispatch:  # loaded on CPU first, then spread: one meaning of device_map for every family
        model = dispatch_loaded(model, device_map, max_memory=max_memory, offload_folder=offload_folder)
    return model, processor
