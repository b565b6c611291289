"""Load an Owl3 checkpoint directory (official release or one saved by owl-lab) → (model, processor).

Weight layouts, dtype, device and attention choice: see :mod:`owl_lab.models.loading`. Tolerated
differences from the model's state_dict:

* missing ``vision_model.head.*`` / ``vision_model.post_layernorm.*`` (built by transformers, never used),
* missing ``language_model.lm_head.weight`` when ``tie_word_embeddings`` is true (1B/2B),
* unexpected ``vision_model.head.*`` / ``post_layernorm.*`` keys (always unused).

Every other missing, unexpected or wrongly shaped key is listed in a ValueError.
"""

from __future__ import annotations

from pathlib import Path

import torch

from owl_lab.models.loading import (
    check_attn_implementation,
    has_tokenizer,
    load_weights_into,
    read_state_dict,
    resolve_device,
    resolve_dtype,
)
from owl_lab.models.owl3.configuration_owl3 import load_config
from owl_lab.models.owl3.modeling_owl3 import Owl3ForCausalLM
from owl_lab.models.owl3.processing_owl3 import Owl3Processor

_UNUSED_VISION = ("vision_model.head.", "vision_model.post_layernorm.")
_TIED_HEAD = "language_model.lm_head.weight"


def load_checkpoint(
    directory: str | Path,
    device_map=None,
    torch_dtype=None,
    *,
    dtype=None,
    attn_implementation: str | None = None,
) -> tuple[Owl3ForCausalLM, Owl3Processor | None]:
    """Load ``(model, processor)`` from a checkpoint directory.

    Args:
        directory: folder with ``config.json`` and weights (official or saved by owl-lab).
        device_map, dtype (alias ``torch_dtype``), attn_implementation: see :mod:`owl_lab.models.loading`.

    Returns:
        the model in eval mode and an :class:`Owl3Processor`, or None when the directory has no
        tokenizer files.
    """
    directory = Path(directory)
    config = load_config(directory)
    if check_attn_implementation(attn_implementation):
        config._attn_implementation = attn_implementation
    state = read_state_dict(directory)
    dtype = resolve_dtype(dtype, torch_dtype, state=state, config_dtype=config.dtype)
    device = resolve_device(device_map)
    with torch.device("meta"):
        model = Owl3ForCausalLM(config)
    tied = bool(config.tie_word_embeddings)
    load_weights_into(
        model,
        state,
        dtype=dtype,
        device=device,
        what=(
            f"mPLUG-Owl3 checkpoint {directory} ({config.hyper_attention} hyper attention, "
            f"{config.projector} projector)"
        ),
        may_be_missing=lambda key: key.startswith(_UNUSED_VISION) or (tied and key == _TIED_HEAD),
        may_be_extra=lambda key: key.startswith(_UNUSED_VISION),
    )
    _materialize_rest(model, dtype, device)
    model.eval()
    processor = Owl3Processor.from_pretrained(directory, config=config) if has_tokenizer(directory) else None
    return model, processor


@torch.no_grad()
def _materialize_rest(model: Owl3ForCausalLM, dtype: torch.dtype, device: torch.device) -> None:
    """Give tolerated-missing params real values, re-tie lm_head, rebuild non-persistent buffers."""
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        if param.device.type != "meta":
            continue
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        is_norm_weight = attr == "weight" and isinstance(module, torch.nn.LayerNorm)
        value = torch.ones(param.shape) if is_norm_weight else torch.zeros(param.shape)
        value = value.to(device=device, dtype=dtype)
        setattr(module, attr, torch.nn.Parameter(value, requires_grad=param.requires_grad))
    if model.config.tie_word_embeddings:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    model.config.dtype = dtype
    _rebuild_buffers(model, device)  # rotary tables stay fp32, like transformers' Qwen2


@torch.no_grad()
def _rebuild_buffers(model: Owl3ForCausalLM, device: torch.device) -> None:
    """Recompute the non-persistent buffers (never stored in checkpoints) on ``device``."""
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
