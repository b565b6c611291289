"""A stock ``transformers.LlavaConfig`` built from a lab recipe (no LLaVA code of our own).

LLaVA-1.5's shape at toy scale: a CLIP vision tower, a 2-layer GELU MLP projector and a Llama
decoder; every patch becomes one visual token in the decoder's sequence (no abstractor). The
image is marked in ``input_ids`` by a *vocabulary* id (the lab tokenizer's ``<|image|>``),
repeated once per visual token, as transformers' LLaVA expects.

A recipe's ``config`` block for family ``llava``::

    {"hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 6, "num_attention_heads": 4,
     "num_key_value_heads": 4, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
     "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "image_size": 56, "patch_size": 7},
     "vision_feature_layer": -1, "vision_feature_select_strategy": "default"}

Top-level keys that are not LLaVA's own go to the Llama ``text_config``.
"""

from __future__ import annotations

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

#: LlavaConfig's own keys (everything else in a recipe's config block belongs to the text model)
LLAVA_KEYS = (
    "vision_feature_layer",
    "vision_feature_select_strategy",
    "projector_hidden_act",
    "multimodal_projector_bias",
    "image_seq_length",
    "image_token_index",
    "tie_word_embeddings",
)
VISION_DEFAULTS = dict(hidden_act="quick_gelu", layer_norm_eps=1e-6, projection_dim=64)


def patches_per_image(vision: CLIPVisionConfig, strategy: str) -> int:
    """Visual tokens one image contributes: (image_size / patch_size)², +1 with CLS (strategy 'full')."""
    if vision.image_size % vision.patch_size:
        raise ValueError(
            f"image_size {vision.image_size} is not a multiple of patch_size {vision.patch_size}"
        )
    n = (vision.image_size // vision.patch_size) ** 2
    return n + 1 if strategy == "full" else n


def llava_config(
    config: dict,
    *,
    vocab_size: int,
    image_token_id: int,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> LlavaConfig:
    """A ``LlavaConfig`` (CLIP vision tower + MLP projector + Llama decoder) from a recipe config block.

    Args:
        config: the recipe's ``config`` dict (see the module docstring).
        vocab_size / image_token_id / bos / eos / pad: from the lab tokenizer.
    """
    config = dict(config)
    vision = CLIPVisionConfig(**{**VISION_DEFAULTS, **config.pop("vision_config", {})})
    own = {k: config.pop(k) for k in LLAVA_KEYS if k in config}
    own.setdefault("vision_feature_layer", -1)
    own.setdefault("vision_feature_select_strategy", "default")
    own.setdefault("tie_word_embeddings", False)
    text = LlamaConfig(
        **{
            **config,
            "vocab_size": vocab_size,
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id,
            "tie_word_embeddings": own["tie_word_embeddings"],
        }
    )
    n = patches_per_image(vision, own["vision_feature_select_strategy"])
    if own.setdefault("image_seq_length", n) != n:
        raise ValueError(f"image_seq_length={own['image_seq_length']} but the tower yields {n} visual tokens")
    out = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id, **own)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(out, k, getattr(text, k))
    return out


def llava_patch_features(model, pixel_values):
    """[N, 3, S, S] → [N, G*G, W]: the tower's hidden state the projector reads, CLS dropped."""
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    return hidden[model.config.vision_feature_layer][:, 1:]
