"""mPLUG-Owl2 configuration: a LLaMA config plus the official nested ``visual_config`` dict.

The official ``config.json`` (model_type ``mplug_owl2``) is a LLaMA config with one extra key,
``visual_config = {"visual_model": {...}, "visual_abstractor": {...}}``. We keep that dict exactly as
read, so ``save_pretrained`` writes it back unchanged, and resolve it into two small typed views
(:class:`Owl2VisionSettings`, :class:`Owl2AbstractorSettings`) with the official fall-backs for keys
the Nov-2023 release does not have (``use_cls_token``, ``use_post_layernorm``, ``add_v2t_pos_emb``,
``grid_size``). See ``data/reference/owl2/SPEC.md`` §1.

One field is ours: ``modality_adaptive`` (default True, absent from official configs). False builds
the paper's "w/o MAM" ablation: one shared ``k_proj``/``v_proj``/``input_layernorm``/
``post_attention_layernorm`` per layer, with the stock LLaMA key names.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import LlamaConfig

from owl_lab.models.loading import read_config_json
from owl_lab.models.remote_code import AutoMapConfigMixin

IMAGE_TOKEN_INDEX = -200  # the id `<|image|>` becomes in input_ids (not a vocabulary entry); the one constant
IGNORE_INDEX = -100  # label value ignored by the loss
DEFAULT_IMAGE_TOKEN = "<|image|>"

# Released 7B values (data/reference/owl2/SPEC.md §1.2 / §1.3). Only meaningful fields; the official file
# nests the full PretrainedConfig.to_dict() of each sub-config, which we keep verbatim when we read one.
DEFAULT_VISUAL_MODEL: dict[str, Any] = {
    "model_type": "mplug_owl_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "projection_dim": 768,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 448,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-6,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "use_flash_attn": False,
    "use_cls_token": True,
    "use_post_layernorm": True,
}
DEFAULT_VISUAL_ABSTRACTOR: dict[str, Any] = {
    "model_type": "mplug_owl_visual_abstract",
    "num_learnable_queries": 64,
    "hidden_size": 1024,
    "num_hidden_layers": 6,
    "num_attention_heads": 16,
    "intermediate_size": 2816,
    "attention_probs_dropout_prob": 0.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-6,
    "encoder_hidden_size": 1024,
    "grid_size": None,
    "use_cls_token": True,
    "add_v2t_pos_emb": False,
}


def _get(d: dict, key: str, default):
    """``d[key]`` unless absent or null (the official loaders treat both as 'use the default')."""
    value = d.get(key)
    return default if value is None else value


@dataclass(frozen=True)
class Owl2VisionSettings:
    """Resolved ``visual_config["visual_model"]`` (CLIP-style ViT)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_channels: int
    image_size: int
    patch_size: int
    hidden_act: str
    layer_norm_eps: float
    use_cls_token: bool
    use_post_layernorm: bool

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        """Tokens per image out of the ViT: grid² patches (+1 CLS)."""
        return self.grid**2 + int(self.use_cls_token)


@dataclass(frozen=True)
class Owl2AbstractorSettings:
    """Resolved ``visual_config["visual_abstractor"]``."""

    num_learnable_queries: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    # only the FFN-internal ``ffn_ln``; norm1/normk/norm2 use 1e-5 (data/reference/owl2/SPEC.md §3.3)
    layer_norm_eps: float
    encoder_hidden_size: int
    grid_size: int
    use_cls_token: bool
    add_v2t_pos_emb: bool


class Owl2Config(AutoMapConfigMixin, LlamaConfig):
    r"""Configuration of :class:`Owl2ForCausalLM` (official ``MPLUGOwl2Config`` layout).

    Args (beyond :class:`~transformers.LlamaConfig`):
        visual_config: ``{"visual_model": dict, "visual_abstractor": dict}`` as in the official file;
            None gives the released 7B values.
        modality_adaptive: True (official) = per-modality K/V projections and RMSNorms
            (``.multiway.0`` text, ``.multiway.1`` vision); False = shared, stock LLaMA keys.
    """

    model_type = "mplug_owl2"
    auto_map_model = "Owl2ForCausalLM"  # saved config.json: auto_map for trust_remote_code (remote_code.py)

    visual_config: dict | None = None
    modality_adaptive: bool = True

    def __post_init__(self, **kwargs):
        if self.visual_config is None:
            self.visual_config = {
                "visual_model": copy.deepcopy(DEFAULT_VISUAL_MODEL),
                "visual_abstractor": copy.deepcopy(DEFAULT_VISUAL_ABSTRACTOR),
            }
        else:
            self.visual_config = dict(self.visual_config)
            self.visual_config.setdefault("visual_model", copy.deepcopy(DEFAULT_VISUAL_MODEL))
            self.visual_config.setdefault("visual_abstractor", copy.deepcopy(DEFAULT_VISUAL_ABSTRACTOR))
        if self.modality_adaptive is None:  # an explicit null means "official behaviour"
            self.modality_adaptive = True
        super().__post_init__(**kwargs)

    # ---- resolved views -------------------------------------------------------------------------
    @property
    def vision_settings(self) -> Owl2VisionSettings:
        v, d = self.visual_config["visual_model"], DEFAULT_VISUAL_MODEL
        return Owl2VisionSettings(
            **{
                k: _get(v, k, d[k])
                for k in (
                    "hidden_size",
                    "intermediate_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "num_channels",
                    "image_size",
                    "patch_size",
                    "hidden_act",
                    "layer_norm_eps",
                    "use_cls_token",
                    "use_post_layernorm",
                )
            }
        )

    @property
    def abstractor_settings(self) -> Owl2AbstractorSettings:
        a, d = self.visual_config["visual_abstractor"], DEFAULT_VISUAL_ABSTRACTOR
        vision = self.vision_settings
        values = {
            k: _get(a, k, d[k])
            for k in (
                "num_learnable_queries",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
                "layer_norm_eps",
                "encoder_hidden_size",
                "use_cls_token",
                "add_v2t_pos_emb",
            )
        }
        values["grid_size"] = _get(a, "grid_size", vision.grid)
        return Owl2AbstractorSettings(**values)

    @property
    def image_size(self) -> int:
        return self.vision_settings.image_size

    @property
    def tokens_per_image(self) -> int:
        """Rows one image occupies in the LLM sequence: learnable queries + ``vit_eos``."""
        return self.abstractor_settings.num_learnable_queries + 1

    def validate_architecture(self):
        super().validate_architecture()
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )

    # ---- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Also write the legacy keys transformers 4.31 (the official runtime) reads."""
        out = super().to_dict()
        rope = out.get("rope_parameters") or {}
        out.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
        if rope.get("rope_type", "default") == "default":
            out.setdefault("rope_scaling", None)
        return out


def load_config(directory: str | Path) -> Owl2Config:
    """``config.json`` of a checkpoint directory → :class:`Owl2Config` (legacy ``torch_dtype`` read as
    ``dtype``)."""
    return Owl2Config.from_dict(read_config_json(directory))


__all__ = [
    "Owl2Config",
    "load_config",
    "Owl2VisionSettings",
    "Owl2AbstractorSettings",
    "IMAGE_TOKEN_INDEX",
    "IGNORE_INDEX",
    "DEFAULT_IMAGE_TOKEN",
]
