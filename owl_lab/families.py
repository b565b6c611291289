"""The family registry: the one place that knows what an Owl2, an Owl3 (or a later family) is.

Supporting a family is data, not a fork (like pyvene's per-architecture mapping files): a
:class:`FamilySpec` names its classes, how to load a checkpoint directory, how an image is marked
in ``input_ids``, and the module path of every component. Hooks, analysis, training and widgets
look things up here instead of branching on the family name.

Module-path patterns use ``{i}`` for a decoder layer index and ``{k}`` for a bridge (abstractor)
or vision layer index. A component absent from ``paths`` does not exist in that family.

Components (``FamilySpec.paths`` keys):

====================  ==========================================================================
component             what lives there
====================  ==========================================================================
embed_tokens          token embedding table
decoder_layer         one decoder block ``{i}``
attention             the block's attention module (``q_proj``/``o_proj`` ...)
mlp                   the block's MLP
input_norm            pre-attention norm (Owl2: per-modality ``multiway``)
post_norm             pre-MLP norm
final_norm            norm after the last block
lm_head               output projection to the vocabulary
vision_tower          the image encoder
vision_layer          one encoder block ``{k}``
bridge                Owl2 visual abstractor / Owl3 projector
layout                observation point: ``SequenceLayout`` once per forward
attention_event       observation point: ``AttentionEvent`` of every decoder softmax
abstractor_event      observation point: ``AttentionEvent`` of every abstractor softmax (Owl2)
gate_event            observation point: ``GateEvent`` of every gated hyper layer (Owl3 240728)
====================  ==========================================================================

``sites`` maps the public, TransformerLens-style site names of the causal toolkit
(``blocks.{i}.hook_resid_pre`` ...) to the module path of the writable hook point that carries
that tensor (a forward hook on it may return a replacement).
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Public site names every decoder block has (``{i}`` = layer), and what each tensor is.
BLOCK_SITES = {
    "hook_resid_pre": "[B, L, D] residual stream entering block i",
    "hook_resid_mid": "[B, L, D] residual stream after the attention update",
    "hook_resid_post": "[B, L, D] residual stream leaving block i",
    "hook_attn_out": "[B, L, D] attention output added to the stream (after o_proj)",
    "hook_mlp_out": "[B, L, D] MLP output added to the stream",
}


def _block_sites(layer_prefix: str) -> dict[str, str]:
    """``blocks.{i}.<site>`` → ``<layer_prefix>.{i}.<site>`` plus the attention's ``hook_z``."""
    sites = {f"blocks.{{i}}.{name}": f"{layer_prefix}.{{i}}.{name}" for name in BLOCK_SITES}
    sites["blocks.{i}.attn.hook_z"] = f"{layer_prefix}.{{i}}.self_attn.hook_z"
    return sites


@dataclass(frozen=True)
class FamilySpec:
    """Everything the lab needs to know about one model family.

    Attributes:
        name: short family name used across the lab (``"owl2"``, ``"owl3"``).
        model_types: ``config.model_type`` values that belong to this family.
        key_markers: state-dict key prefixes that identify the family when ``config.json`` is
            silent (all must be present).
        image_token: how an image is marked in the prompt text (``"<|image|>"``).
        image_token_id: the id that marks an image in ``input_ids`` when it is a fixed sentinel
            (Owl2: ``-200``, expanded into rows by the model); None when it is a vocabulary id.
        paths: component → module-path pattern (see the module docstring).
        sites: public site name pattern → module-path pattern of its writable hook point.
    """

    name: str
    model_types: tuple[str, ...]
    key_markers: tuple[str, ...]
    image_token: str
    image_token_id: int | None
    paths: dict[str, str] = field(default_factory=dict)
    sites: dict[str, str] = field(default_factory=dict)

    def has(self, component: str) -> bool:
        return component in self.paths


OWL2 = FamilySpec(
    name="owl2",
    model_types=("mplug_owl2",),
    key_markers=("model.visual_abstractor.", "model.vision_model."),
    image_token="<|image|>",
    image_token_id=-200,
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
        "bridge": "model.visual_abstractor",
        "layout": "hook_layout",
        "attention_event": "model.layers.{i}.self_attn.hook_attn",
        "abstractor_event": "model.visual_abstractor.encoder.layers.{k}.crossattention.attention.hook_attn",
    },
    sites={**_block_sites("model.layers"), "hook_image_embeds": "model.hook_image_embeds"},
)

OWL3 = FamilySpec(
    name="owl3",
    model_types=("mplugowl3",),
    key_markers=("language_model.model.", "vision2text_model"),
    image_token="<|image|>",
    image_token_id=None,
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
        "bridge": "vision2text_model",
        "layout": "hook_layout",
        "attention_event": "language_model.model.layers.{i}.self_attn.hook_attn",
        "gate_event": "language_model.model.layers.{i}.self_attn.hook_gate_event",
    },
    sites={
        **_block_sites("language_model.model.layers"),
        "hook_image_embeds": "hook_image_embeds",
        # gated (240728) hyper layers only
        "blocks.{i}.attn.hook_gate": "language_model.model.layers.{i}.self_attn.hook_gate",
        "blocks.{i}.attn.hook_cross_z": "language_model.model.layers.{i}.self_attn.hook_cross_z",
    },
)

#: Every registered family, by name. Adding a family = adding an entry here.
FAMILIES: dict[str, FamilySpec] = {spec.name: spec for spec in (OWL2, OWL3)}
