"""Load an Owl3 checkpoint directory (official release or one saved by owl-lab) → (model, processor).

Supports a single ``model.safetensors`` or sharded ``model-*.safetensors`` with
``model.safetensors.index.json``. Tolerated differences from the model's state_dict:

* missing ``vision_model.head.*`` / ``vision_model.post_layernorm.*`` (built by transformers, never used),
* missing ``language_model.lm_head.weight`` when ``tie_word_embeddings`` is true (1B/2B),
* unexpected ``vision_model.head.*`` / ``post_layernorm.*`` keys (always unused).

Every other missing, unexpected or wrongly shaped key is listed in a ValueError.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors import safe_open

from owl_lab.models.owl3.configuration_owl3 import Owl3Config, detect_variant

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
_UNUSED_VISION = ("vision_model.head.", "vision_model.post_layernorm.")


def weight_files(directory: Path) -> list[Path]:
    """The weight files: shards listed by ``model.safetensors.index.json``, else ``model.safetensors``."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / n for n in names]
    single = directory / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"No model.safetensors (or model.safetensors.index.json + shards) in {directory}.")
    return [single]


def checkpoint_keys(directory: Path) -> list[str]:
    keys: list[str] = []
    for f in weight_files(directory):
        with safe_open(str(f), framework="pt") as h:
            keys.extend(h.keys())
    return keys


def load_config(directory, **overrides) -> Owl3Config:
    """``config.json`` → Owl3Config; variant fields absent from the file are detected from the keys."""
    directory = Path(directory)
    return complete_config(Owl3Config.from_pretrained(str(directory), **overrides), directory)


def complete_config(config: Owl3Config, directory) -> Owl3Config:
    """Fill ``hyper_attention`` / ``projector`` from the checkpoint's key names when they are unset."""
    if config.hyper_attention is None or config.projector is None:
        found = detect_variant(checkpoint_keys(directory))
        if found["hyper_layers_0based"] != config.hyper_layer_indices:
            raise ValueError(
                f"config.json hyper_layers {config.hyper_layers} (0-based {config.hyper_layer_indices}) disagree with "
                f"the layers that own v_kv_proj weights: {found['hyper_layers_0based']}."
            )
        config = copy.deepcopy(config)
        config.hyper_attention = config.hyper_attention or found["hyper_attention"]
        config.projector = config.projector or found["projector"]
    return config


def _resolve_dtype(torch_dtype, config) -> torch.dtype:
    if torch_dtype is None:
        return torch.float32
    if torch_dtype == "auto":
        return config.dtype if isinstance(config.dtype, torch.dtype) else torch.float32
    if isinstance(torch_dtype, str):
        return getattr(torch, torch_dtype)
    return torch_dtype


def _resolve_device(device_map) -> torch.device:
    if device_map is None:
        return torch.device("cpu")
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, (str, torch.device, int)):
        return torch.device(device_map)
    raise ValueError(f"device_map must be None, 'auto' or one device (str/torch.device); got {device_map!r}.")


def load_state(directory: Path) -> dict[str, torch.Tensor]:
    state = {}
    for f in weight_files(directory):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                state[k] = h.get_tensor(k)
    return state


def check_keys(model, state: dict) -> None:
    """Raise ValueError listing every non-tolerated missing / unexpected / mis-shaped key."""
    expected = model.state_dict()
    tied = bool(model.config.tie_word_embeddings)
    missing = [
        k for k in expected
        if k not in state and not k.startswith(_UNUSED_VISION) and not (tied and k == "language_model.lm_head.weight")
    ]
    unexpected = [k for k in state if k not in expected and not k.startswith(_UNUSED_VISION)]
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {shapes}")
        raise ValueError(
            f"Checkpoint does not match the Owl3 model built from its config ({model.config.hyper_attention}, "
            f"{model.config.projector} projector): " + "; ".join(parts)
        )


def load_checkpoint(directory, device_map=None, torch_dtype=None):
    """Load ``(model, processor)`` from a checkpoint directory.

    Args:
        directory: folder with ``config.json`` and safetensors weights (official or saved by owl-lab).
        device_map: None (CPU), ``"auto"`` (first GPU if any) or one device.
        torch_dtype: None (float32), ``"auto"`` (config's dtype) or a torch dtype / its name.

    Returns:
        the model in eval mode and an :class:`Owl3Processor`, or None when the directory has no
        tokenizer files.
    """
    from owl_lab.models.owl3.modeling_owl3 import Owl3ForCausalLM
    from owl_lab.models.owl3.processing_owl3 import Owl3Processor

    directory = Path(directory)
    config = load_config(directory)
    dtype = _resolve_dtype(torch_dtype, config)
    device = _resolve_device(device_map)
    with torch.device("meta"):
        model = Owl3ForCausalLM(config)
    state = load_state(directory)
    check_keys(model, state)
    state = {k: v for k, v in state.items() if k in model.state_dict()}
    model.load_state_dict(state, strict=False, assign=True)
    _materialize_rest(model)
    model.to(device=device, dtype=dtype)
    _rebuild_buffers(model)  # after the cast: rotary tables stay fp32, like transformers' Qwen2
    model.eval()
    processor = None
    if any((directory / f).is_file() for f in TOKENIZER_FILES):
        processor = Owl3Processor.from_pretrained(directory, config=config)
    return model, processor


@torch.no_grad()
def _materialize_rest(model) -> None:
    """Give tolerated-missing params real values, re-tie lm_head, rebuild non-persistent buffers."""
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        if param.device.type != "meta":
            continue
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        is_norm_weight = attr == "weight" and isinstance(module, torch.nn.LayerNorm)
        value = torch.ones(param.shape) if is_norm_weight else torch.zeros(param.shape)
        setattr(module, attr, torch.nn.Parameter(value, requires_grad=param.requires_grad))
    if model.config.tie_word_embeddings:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    _rebuild_buffers(model)


@torch.no_grad()
def _rebuild_buffers(model) -> None:
    """Recompute the non-persistent buffers (never stored in checkpoints) on the model's device."""
    device = next(model.parameters()).device
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "original_inv_freq"):
            with torch.device("cpu"):
                fresh = type(module)(config=module.config)
            module.inv_freq = fresh.inv_freq.to(device)
            module.original_inv_freq = fresh.original_inv_freq.to(device)
        if hasattr(module, "position_ids") and hasattr(module, "num_positions"):
            module.position_ids = torch.arange(module.num_positions, device=device).expand((1, -1))
    leftovers = [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if leftovers:
        raise RuntimeError(f"Buffers left on the meta device after loading: {leftovers}")
