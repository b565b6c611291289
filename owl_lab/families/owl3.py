"""The mPLUG-Owl3 entry of the family registry: a Qwen2 decoder whose hyper layers cross-attend to a
SigLIP's projected patches; images are not decoder rows (``<|image|>`` stays one text token)."""

from __future__ import annotations

import torch
from torch import nn

from owl_lab.families.spec import FamilySpec, TokenizerSpec, block_sites
from owl_lab.models.owl3 import Owl3Config, Owl3ForCausalLM, Owl3Processor
from owl_lab.models.owl3 import load_checkpoint as load_owl3_checkpoint


def _hyper_layers(config) -> list[int]:
    return list(config.hyper_layer_indices)


def _owl3_patch_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The visual tokens the hyper layers read, one per patch: [N, 3, S, S] → [N, G*G, D]."""
    return OWL3.resolve(model, "encode_images")(pixel_values)


OWL3 = FamilySpec(
    name="owl3",
    title="mPLUG-Owl3",
    model_types=("mplugowl3",),
    key_markers=("language_model.model.", "vision2text_model"),
    config_class=Owl3Config,
    model_class=Owl3ForCausalLM,
    processor_class=Owl3Processor,
    loader=load_owl3_checkpoint,
    image_token="<|image|>",
    image_token_id=None,
    expands_image_marker=False,
    images_in_sequence=False,
    image_layers=_hyper_layers,
    patch_features=_owl3_patch_features,
    vision_pretrain=("vision_tower", "bridge"),
    vision_pretrain_board=("vision_tower", "bridge"),
    tokenizer=TokenizerSpec(
        specials=(
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<unk>",
        ),  # <unk>: a word-level model needs one
        # <|im_start|> has no role, so it is listed as an extra special: all_special_ids must hold every chat
        # marker (attribution keeps special tokens in its baseline; decoding skips them)
        roles=dict(
            eos_token="<|im_end|>",
            unk_token="<unk>",
            pad_token="<|endoftext|>",
            extra_special_tokens=["<|im_start|>"],
        ),
    ),
    paths={
        "embed_tokens": "language_model.model.embed_tokens",
        "decoder_layer": "language_model.model.layers.{i}",
        "attention": "language_model.model.layers.{i}.self_attn",
        "mlp": "language_model.model.layers.{i}.mlp",
        "input_norm": "language_model.model.layers.{i}.input_layernorm",
        "post_norm": "language_model.model.layers.{i}.post_attention_layernorm",
        "final_norm": "language_model.model.norm",
        "lm_head": "language_model.lm_head",
        "vision_tower": "vision_model",
        "vision_layer": "vision_model.encoder.layers.{k}",
        "patch_embed": "vision_model.embeddings.patch_embedding",
        "bridge": "vision2text_model",
        "encode_images": "encode_images",
        "layout": "hook_layout",
        "attention_event": "language_model.model.layers.{i}.self_attn.hook_attn",
        "gate_event": "language_model.model.layers.{i}.self_attn.hook_gate_event",
    },
    sites={
        **block_sites("language_model.model.layers"),
        "hook_image_embeds": "hook_image_embeds",
        # gated (240728) hyper layers only
        "blocks.{i}.attn.hook_gate": "language_model.model.layers.{i}.self_attn.hook_gate",
        "blocks.{i}.attn.hook_cross_z": "language_model.model.layers.{i}.self_attn.hook_cross_z",
    },
)
