"""Loading plumbing shared by every family: weight files, key checks, dtype / device / attention choice.

A checkpoint directory holds ``config.json`` and weights in one of the layouts the official releases
use: ``model.safetensors``, ``model.safetensors.index.json`` (+ shards), ``pytorch_model.bin`` or
``pytorch_model.bin.index.json`` (+ pickle shards). A family loader (``loading_owl2`` /
``loading_owl3``) reads its config, then calls :func:`load_weights_into` with the model class and
the keys its architecture tolerates being absent or extra.

One meaning for every family:

* ``dtype`` (``torch_dtype`` is an alias): None = float32 (the project default), a ``torch.dtype``
  or its name, or ``"auto"`` = the checkpoint's own dtype: the dtype its floating tensors are stored
  in (for every official and lab checkpoint the ``dtype`` of ``config.json``; that value is the
  fall-back when no floating tensor is stored). Nothing is cast under ``"auto"``.
* ``device_map`` (here, in a family loader): None = CPU, ``"auto"`` = the first GPU if any else CPU, a
  device (str, index or ``torch.device``), or a dict whose values all name that one device
  (``{"": "cuda:0"}``). ``load_owl`` hands only such single-device maps to the family loader; a map
  spreading the model (several devices, ``"disk"``, the ``"auto"`` / ``"balanced"`` / ``"sequential"``
  strategies) is applied after loading through accelerate (:mod:`owl_lab.models.dispatch`).
* ``attn_implementation``: None = the config's choice, else one of :data:`ATTN_IMPLEMENTATIONS`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

#: attention kernels every family implements (``load_owl(..., attn_implementation=...)``)
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
#: files whose presence means the directory carries a tokenizer (hence a processor)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


# ---- config.json ---------------------------------------------------------------------------------
def read_config_json(directory: str | Path) -> dict:
    """``config.json`` as a dict; the legacy ``torch_dtype`` key is renamed ``dtype`` (same meaning)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"No config.json in {directory}.")
    data = json.loads(path.read_text())
    if "torch_dtype" in data:
        legacy = data.pop("torch_dtype")
        data.setdefault("dtype", legacy)
    return data


# ---- weight files --------------------------------------------------------------------------------
def weight_files(directory: str | Path) -> list[Path]:
    """The weight files of a checkpoint: the shards an index lists, else the single weights file."""
    directory = Path(directory)
    for index_name in _INDEX_FILES:
        index = directory / index_name
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [directory / n for n in names]
    for single in _SINGLE_FILES:
        if (directory / single).is_file():
            return [directory / single]
    raise FileNotFoundError(
        f"No weights in {directory}: expected model.safetensors, model.safetensors.index.json, "
        f"pytorch_model.bin or pytorch_model.bin.index.json."
    )


def checkpoint_keys(directory: str | Path) -> list[str]:
    """Sorted state-dict key names of a checkpoint, read from the index or safetensors headers.

    Only a single unindexed ``pytorch_model.bin`` has to be unpickled to list its keys.
    """
    directory = Path(directory)
    for index_name in _INDEX_FILES:
        index = directory / index_name
        if index.is_file():
            return sorted(json.loads(index.read_text())["weight_map"])
    keys: list[str] = []
    for path in weight_files(directory):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                keys.extend(handle.keys())
        else:
            keys.extend(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    return sorted(keys)


def read_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, on CPU in its stored dtype (.bin shards memory-mapped)."""
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(directory):
        if path.suffix == ".safetensors":
            state.update(load_file(str(path)))
        else:
            state.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    return state


#: keyword arguments ``AutoProcessor.from_pretrained`` forwards that only mean something for a Hub repository
_HUB_KWARGS = (
    "_from_auto",
    "trust_remote_code",
    "cache_dir",
    "force_download",
    "local_files_only",
    "token",
    "revision",
    "subfolder",
    "code_revision",
    "proxies",
)


def drop_hub_kwargs(kwargs: dict) -> dict:
    """``kwargs`` without the Hub-download options ``AutoProcessor`` passes along (a lab checkpoint is a
    local directory), so a processor's ``from_pretrained`` can be reached through ``AutoProcessor``."""
    return {k: v for k, v in kwargs.items() if k not in _HUB_KWARGS}


def has_tokenizer(directory: str | Path) -> bool:
    """True when the directory carries tokenizer files (so a processor can be built from it)."""
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


# ---- dtype / device / attention --------------------------------------------------------------------
def _as_dtype(value) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return getattr(torch, value)
    raise ValueError(
        f"dtype must be None, 'auto', a torch.dtype or its name (e.g. 'bfloat16'); got {value!r}."
    )


def stored_dtype(state: dict[str, torch.Tensor]) -> torch.dtype | None:
    """The dtype holding most floating-point elements of ``state``; None when nothing is floating."""
    counts: Counter = Counter()
    for tensor in state.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] += tensor.numel()
    return counts.most_common(1)[0][0] if counts else None


def resolve_dtype(dtype=None, torch_dtype=None, *, state=None, config_dtype=None) -> torch.dtype:
    """The one meaning of ``dtype`` / ``torch_dtype`` (see the module docstring).

    Args:
        dtype, torch_dtype: the user's choice; at most one may be given (``torch_dtype`` is the alias
            transformers used before ``dtype``).
        state: the checkpoint's tensors (for ``"auto"``).
        config_dtype: ``config.json``'s ``dtype`` (for ``"auto"`` when ``state`` has no floating tensor).
    """
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(
            f"Give dtype or its alias torch_dtype, not both (got {dtype!r} and {torch_dtype!r})."
        )
    choice = dtype if dtype is not None else torch_dtype
    if choice is None:
        return torch.float32
    if choice == "auto":
        found = stored_dtype(state or {})
        if found is not None:
            return found
        return _as_dtype(config_dtype) if config_dtype is not None else torch.float32
    return _as_dtype(choice)


def resolve_device(device_map=None) -> torch.device:
    """The one device a ``device_map`` names (see the module docstring)."""
    if isinstance(device_map, dict):
        devices = {
            str(torch.device(d) if not isinstance(d, int) else torch.device("cuda", d))
            for d in device_map.values()
        }
        if len(devices) != 1:
            raise ValueError(
                f"device_map must place the whole model on one device; got {device_map} ({sorted(devices)}). "
                f"To spread a model over several devices or disk, use load_owl (accelerate dispatch)."
            )
        device_map = next(iter(device_map.values()))
    if device_map is None:
        return torch.device("cpu")
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    if isinstance(device_map, (str, torch.device)):
        return torch.device(device_map)
    raise ValueError(
        f"device_map must be None, 'auto', a device or a dict of one device; got {device_map!r}."
    )


def check_attn_implementation(value: str | None) -> str | None:
    """``value`` if it is None or a supported kernel; ValueError naming the supported ones otherwise."""
    if value is not None and value not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation={value!r} is not supported; choose one of {ATTN_IMPLEMENTATIONS} (or None "
            f"for the config's default)."
        )
    return value


# ---- key checks and assignment ----------------------------------------------------------------------
def key_report(
    expected: dict[str, torch.Size],
    state: dict[str, torch.Tensor],
    *,
    may_be_missing: Callable[[str], bool] = lambda key: False,
    may_be_extra: Callable[[str], bool] = lambda key: False,
) -> list[str]:
    """Human-readable problems between a model's ``expected`` key → shape map and a checkpoint ``state``.

    Returns [] when they match up to the tolerated keys, else parts such as
    ``"2 missing key(s) [...]"``, ``"1 unexpected key(s) [...]"``, ``"1 shape mismatch(es) [...]"``.
    """
    missing = sorted(k for k in expected if k not in state and not may_be_missing(k))
    unexpected = sorted(k for k in state if k not in expected and not may_be_extra(k))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k])}"
        for k in sorted(expected)
        if k in state and tuple(state[k].shape) != tuple(expected[k])
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) {missing}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) {unexpected}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es) {shapes}")
    return parts


def load_weights_into(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    *,
    dtype: torch.dtype,
    device: torch.device,
    what: str,
    may_be_missing: Callable[[str], bool] = lambda key: False,
    may_be_extra: Callable[[str], bool] = lambda key: False,
) -> torch.nn.Module:
    """Check ``state`` against a model built on the meta device, then assign its tensors (no copy on meta).

    Floating tensors are cast to ``dtype``, every tensor moved to ``device``; tolerated extra keys are
    dropped. Tolerated missing parameters stay on the meta device for the family to fill (see
    ``loading_owl3``); non-persistent buffers are the family's to rebuild.

    Raises:
        ValueError: listing every missing / unexpected / wrongly shaped key, prefixed by ``what``.
    """
    expected = {k: v.shape for k, v in model.state_dict().items()}
    problems = key_report(expected, state, may_be_missing=may_be_missing, may_be_extra=may_be_extra)
    if problems:
        raise ValueError(
            f"{what} does not match the model built from its config.json: " + "; ".join(problems) + "."
        )
    tensors = {
        k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
        for k, v in state.items()
        if k in expected
    }
    model.load_state_dict(tensors, strict=False, assign=True)
    return model
