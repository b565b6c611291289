"""The mPLUG-Owl2 entry of the family registry: a LLaMA decoder with modality-adaptive blocks reading a
ViT through the visual abstractor; each image marker in ``input_ids`` becomes ``tokens_per_image`` rows."""

from __future__ import annotations

import torch
from torch import nn

from owl_lab.families.spec import FamilySpec, TokenizerSpec, block_sites
from owl_lab.models.owl2 import IMAGE_TOKEN_INDEX, Owl2Config, Owl2ForCausalLM, Owl2Processor
from owl_lab.models.owl2 import load_checkpoint as load_owl2_checkpoint


def _all_layers(config) -> list[int]:
    return list(range(config.num_hidden_layers))


def _owl2_patch_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """ViT output without CLS: [N, 3, S, S] → [N, G*G, Wv]."""
    hidden = OWL2.resolve(model, "vision_tower")(pixel_values).last_hidden_state  # [N, (1+)G², Wv]
    return hidden[:, 1:] if model.config.vision_settings.use_cls_token else hidden


OWL2 = FamilySpec(
    name="owl2",
    title="mPLUG-Owl2",
    model_types=("mplug_owl2",),
    key_markers=("model.visual_abstractor.", "model.vision_model."),
    config_class=Owl2Config,
    model_class=Owl2ForCausalLM,
    processor_class=Owl2Processor,
    loader=load_owl2_checkpoint,
    image_token="<|image|>",
    image_token_id=IMAGE_TOKEN_INDEX,
    expands_image_marker=True,
    images_in_sequence=True,
    image_layers=_all_layers,
    patch_features=_owl2_patch_features,
    vision_pretrain=("vision_tower",),
    vision_pretrain_board=("vision_tower", "bridge"),
    tokenizer=TokenizerSpec(
        specials=("<unk>", "<s>", "</s>"),  # the LLaMA-2 ids 0, 1, 2
        roles=dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"),
        prepend_bos=True,
    ),
    paths={
        "embed_tokens": "model.embed_tokens",
        "decoder_layer": "model.layers.{i}",
        "attention": "model.layers.{i}.self_attn",
        "mlp": "model.layers.{i}.mlp",
        "input_norm": "model.layers.{i}.input_layernorm",
        "post_norm": "model.layers.{i}.post_attention_layernorm",
        "final_norm": "model.norm",
        "lm_head": "lm_head",
        "vision_tower": "model.vision_model",
        "vision_layer": "model.vision_model.encoder.layers.{k}",
        "patch_embed": "model.vision_model.embeddings.patch_embed",
        "bridge": "model.visual_abstractor",
        "encode_images": "model.encode_images",
        "layout": "hook_layout",
        "attention_event": "model.layers.{i}.self_attn.hook_attn",
        "abstractor_event": "model.visual_abstractor.encoder.layers.{k}.crossattention.attention.hook_attn",
    },
    sites={**block_sites("model.layers"), "hook_image_embeds": "model.hook_image_embeds"},
)
