"""Load an official-format mPLUG-Owl2 checkpoint directory (``data/reference/owl2/SPEC.md`` §2.4).

Weight layouts, dtype, device and attention choice: see :mod:`owl_lab.models.loading`. Tolerated key
differences: ``*.rotary_emb.inv_freq`` in the file (persistent in transformers 4.31, recomputed here)
and the abstractor's ``q_pos_embed`` / ``k_pos_embed`` (never saved; non-persistent buffers here).
Anything else missing, unexpected or wrongly shaped is a ValueError that lists the keys.
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
from owl_lab.models.owl2.configuration_owl2 import Owl2Config, load_config
from owl_lab.models.owl2.modeling_owl2 import Owl2ForCausalLM
from owl_lab.models.owl2.processing_owl2 import Owl2Processor

_TOLERATED_SUFFIXES = ("rotary_emb.inv_freq",)


def model_from_state_dict(
    config: Owl2Config,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    source: str = "state dict",
) -> Owl2ForCausalLM:
    """Build on the meta device, check the key set, then assign the tensors (no double allocation)."""
    with torch.device("meta"):
        model = Owl2ForCausalLM(config)
    device = torch.device(device)
    load_weights_into(
        model,
        state,
        dtype=dtype,
        device=device,
        what=f"mPLUG-Owl2 checkpoint {source}",
        may_be_extra=lambda key: key.endswith(_TOLERATED_SUFFIXES),
    )
    model.rebuild_buffers(device)
    model.config.dtype = dtype
    return model.eval()


def load_checkpoint(
    directory: str | Path,
    device_map=None,
    torch_dtype=None,
    *,
    dtype=None,
    attn_implementation: str | None = None,
) -> tuple[Owl2ForCausalLM, Owl2Processor | None]:
    """Load ``(model, processor)`` from an official or owl-lab checkpoint directory.

    Args:
        directory: holds ``config.json`` and weights; tokenizer files optional.
        device_map, dtype (alias ``torch_dtype``), attn_implementation: see :mod:`owl_lab.models.loading`.

    Returns:
        (model in eval mode, :class:`Owl2Processor` or None when there are no tokenizer files).
    """
    directory = Path(directory)
    config = load_config(directory)
    if check_attn_implementation(attn_implementation):
        config._attn_implementation = attn_implementation
    state = read_state_dict(directory)
    model = model_from_state_dict(
        config,
        state,
        dtype=resolve_dtype(dtype, torch_dtype, state=state, config_dtype=config.dtype),
        device=resolve_device(device_map),
        source=str(directory),
    )
    processor = Owl2Processor.from_pretrained(directory) if has_tokenizer(directory) else None
    return model, processor
