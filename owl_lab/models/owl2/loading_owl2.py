"""Load an official-format mPLUG-Owl2 checkpoint directory (owl2 SPEC §2.4).

Accepted weight layouts: ``model.safetensors``, ``model.safetensors.index.json`` (+ shards),
``pytorch_model.bin``, ``pytorch_model.bin.index.json`` (+ pickle shards, the official release).
Tolerated key differences: ``*.rotary_emb.inv_freq`` in the file (persistent in transformers 4.31,
recomputed here) and the abstractor's ``q_pos_embed`` / ``k_pos_embed`` (never saved; non-persistent
buffers here). Anything else missing or unexpected is a ValueError that lists the keys.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .configuration_owl2 import Owl2Config
from .modeling_owl2 import Owl2ForCausalLM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
_TOLERATED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_config_dict(path: Path) -> dict:
    """config.json as a dict; the legacy ``torch_dtype`` key is renamed ``dtype`` (same meaning)."""
    data = json.loads(Path(path).read_text())
    if "torch_dtype" in data:
        data.setdefault("dtype", data.pop("torch_dtype"))
        data.pop("torch_dtype", None)
    return data


def _weight_files(directory: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [directory / n for n in names]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (directory / single).is_file():
            return [directory / single]
    raise FileNotFoundError(
        f"No weights in {directory}: expected model.safetensors, model.safetensors.index.json, "
        f"pytorch_model.bin or pytorch_model.bin.index.json."
    )


def read_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (CPU; .bin shards are memory-mapped)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(Path(directory)):
        if path.suffix == ".safetensors":
            state.update(load_file(str(path)))
        else:
            state.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    return state


def _resolve_device(device_map) -> torch.device:
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ValueError(f"Only single-device placement is supported, got device_map={device_map}.")
        device_map = devices.pop()
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    return torch.device(device_map)


def _resolve_dtype(torch_dtype, state) -> torch.dtype:
    if torch_dtype is None:
        return torch.float32  # project default: fp32
    if torch_dtype == "auto":
        return next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    return getattr(torch, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype


def model_from_state_dict(config: Owl2Config, state: dict, dtype=torch.float32, device="cpu",
                          source: str = "state dict") -> Owl2ForCausalLM:
    """Build on the meta device, check the key set, then assign the tensors (no double allocation)."""
    with torch.device("meta"):
        model = Owl2ForCausalLM(config)
    expected = set(model.state_dict())
    given = {k for k in state if not k.endswith(_TOLERATED_SUFFIXES)}
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise ValueError(
            f"Checkpoint {source} does not match the mPLUG-Owl2 architecture of its config.json: "
            f"{len(missing)} missing key(s) {missing}; {len(unexpected)} unexpected key(s) {unexpected}."
        )
    bad_shapes = [f"{k}: checkpoint {list(state[k].shape)} vs model {list(v.shape)}"
                  for k, v in model.state_dict().items() if tuple(state[k].shape) != tuple(v.shape)]
    if bad_shapes:
        raise ValueError(f"Checkpoint {source} has tensors of the wrong shape: {bad_shapes}.")
    device = torch.device(device)
    tensors = {k: (state[k].to(device=device, dtype=dtype) if state[k].is_floating_point()
                   else state[k].to(device)) for k in expected}
    model.load_state_dict(tensors, strict=True, assign=True)
    model.rebuild_buffers(device)
    model.config.dtype = dtype
    return model.eval()


def load_checkpoint(directory: str | Path, device_map=None, torch_dtype=None):
    """Load ``(model, processor)`` from an official or owl-lab checkpoint directory.

    Args:
        directory: holds ``config.json`` and weights (see module doc); tokenizer files optional.
        device_map: None/"cpu", a device string or index, ``"auto"``, or ``{"": device}``.
        torch_dtype: None = float32 (project default), a dtype/str, or ``"auto"`` = as stored.

    Returns:
        (model in eval mode, :class:`Owl2Processor` or None when there are no tokenizer files).
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"No config.json in {directory}.")
    config = Owl2Config.from_dict(read_config_dict(config_path))
    state = read_state_dict(directory)
    dtype = _resolve_dtype(torch_dtype, state)
    model = model_from_state_dict(config, state, dtype=dtype, device=_resolve_device(device_map),
                                  source=str(directory))
    processor: object | None = None
    if any((directory / f).is_file() for f in TOKENIZER_FILES):
        from .processing_owl2 import Owl2Processor

        processor = Owl2Processor.from_pretrained(directory)
    return model, processor
