"""Build and load the ``llava`` family: stock transformers classes, the lab's processor.

A saved llava directory is what ``LlavaForConditionalGeneration.save_pretrained`` writes, plus the
lab tokenizer and ``processor_config.json``. Loading goes through transformers' own
``from_pretrained`` (it checks keys and shapes); the only thing the lab adds is the attention
observer (:mod:`owl_lab.models.transformers_attention`), installed so ``hooks.capture`` can watch it.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration

from owl_lab.models.transformers_attention import install

from .configuration_llava import llava_config
from .processing_llava import PROCESSOR_CONFIG, LlavaProcessor


def encode_images(model: LlavaForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """[N, 3, S, S] → [N, T, D]: the projected visual tokens the decoder reads (one per patch)."""
    out = model.get_image_features(
        pixel_values=pixel_values,
        vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
    )
    return torch.stack(list(out.pooler_output))


def prepare_llava(model: LlavaForConditionalGeneration) -> LlavaForConditionalGeneration:
    """Make a stock LLaVA usable by the lab (idempotent): the attention observer and hook points
    (:func:`owl_lab.models.transformers_attention.install`) and ``owl_encode_images`` (the registry's
    ``encode_images`` component, a plain attribute — LLaVA's own ``get_image_features`` returns a
    model output, not the [N, T, D] tensor the lab reads)."""
    install(model)
    if not hasattr(model, "owl_encode_images"):
        object.__setattr__(model, "owl_encode_images", partial(encode_images, model))
    return model


def build_for_training(
    config: dict, tokenizer, seed: int = 0
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A freshly initialised (model, processor) from a recipe's ``config`` block and the lab tokenizer
    of family ``llava`` (``owl_lab.synth.tokenizer.build_tokenizer("llava")``), seeded."""
    cfg = llava_config(
        config,
        vocab_size=len(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image|>"),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = prepare_llava(LlavaForConditionalGeneration(cfg))
    return model, LlavaProcessor.from_config(cfg, tokenizer)


def load_checkpoint(
    directory: str | Path,
    *,
    dtype=None,
    torch_dtype=None,
    device_map=None,
    attn_implementation: str | None = None,
):
    """(model, processor) from a saved llava directory; model in eval mode, observer installed.

    Options mean what they mean for every family (:mod:`owl_lab.models.loading`): ``dtype`` None =
    float32, ``"auto"`` = the checkpoint's; ``attn_implementation`` ``"eager"`` / ``"sdpa"`` / None.
    ``processor`` is None when the directory has no ``processor_config.json``.
    """
    directory = Path(directory)
    dtype = dtype if dtype is not None else torch_dtype
    kwargs = {"dtype": torch.float32 if dtype is None else dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation is not None:
        kwargs["attn_implementation"] = {"text_config": attn_implementation}
    model = LlavaForConditionalGeneration.from_pretrained(str(directory), **kwargs)
    model.eval()
    prepare_llava(model)
    processor = (
        LlavaProcessor.from_pretrained(directory) if (directory / PROCESSOR_CONFIG).is_file() else None
    )
    return model, processor
