"""The comparison family: a stock ``transformers.LlavaForConditionalGeneration`` (CLIP tower, MLP
projector, Llama decoder). Its image marker is a vocabulary id repeated once per visual token, and its
observation points are installed by ``prepare`` (the lab's attention function in transformers' registry)."""

from __future__ import annotations

from owl_lab.families.owl2 import OWL2
from owl_lab.families.spec import FamilySpec
from owl_lab.models.llava import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    build_for_training,
    llava_patch_features,
    prepare_llava,
)
from owl_lab.models.llava import load_checkpoint as load_llava_checkpoint


def _text_layers(config) -> list[int]:
    return list(range(config.get_text_config().num_hidden_layers))


#: A stock ``transformers.LlavaForConditionalGeneration`` (CLIP tower, MLP projector, Llama decoder):
#: the comparison family. Its image marker is a vocabulary id repeated once per visual token.
LLAVA = FamilySpec(
    name="llava",
    title="LLaVA",
    model_types=("llava",),
    key_markers=("model.multi_modal_projector.", "model.vision_tower."),
    config_class=LlavaConfig,
    model_class=LlavaForConditionalGeneration,
    processor_class=LlavaProcessor,
    loader=load_llava_checkpoint,
    image_token="<|image|>",
    image_token_id=None,
    expands_image_marker=False,
    images_in_sequence=True,
    image_layers=_text_layers,
    patch_features=llava_patch_features,
    vision_pretrain=("vision_tower",),
    vision_pretrain_board=("vision_tower", "bridge"),
    tokenizer=OWL2.tokenizer,  # the decoder is a Llama: LLaMA-like specials
    paths={
        "embed_tokens": "model.language_model.embed_tokens",
        "decoder_layer": "model.language_model.layers.{i}",
        "attention": "model.language_model.layers.{i}.self_attn",
        "mlp": "model.language_model.layers.{i}.mlp",
        "input_norm": "model.language_model.layers.{i}.input_layernorm",
        "post_norm": "model.language_model.layers.{i}.post_attention_layernorm",
        "final_norm": "model.language_model.norm",
        "lm_head": "lm_head",
        "vision_tower": "model.vision_tower",
        "vision_layer": "model.vision_tower.encoder.layers.{k}",
        "patch_embed": "model.vision_tower.embeddings.patch_embedding",
        "bridge": "model.multi_modal_projector",
        "encode_images": "owl_encode_images",  # attached by prepare_llava (projected patch features)
        "layout": "hook_layout",
        "attention_event": "model.language_model.layers.{i}.self_attn.hook_attn",
    },
    prepare=prepare_llava,
    build_from_recipe=build_for_training,
)
