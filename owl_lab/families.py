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
patch_embed           the vision tower's patch-embedding conv (input of pixel attributions)
encode_images         method: pixels [N, 3, S, S] → visual tokens the decoder reads [N, T, D]
layout                observation point: ``SequenceLayout`` once per forward
attention_event       observation point: ``AttentionEvent`` of every decoder softmax
abstractor_event      observation point: ``AttentionEvent`` of every abstractor softmax (Owl2)
gate_event            observation point: ``GateEvent`` of every gated hyper layer (Owl3 240728)
====================  ==========================================================================

Observation points are found on a model with :func:`find_sites` (``hooks`` uses nothing else),
any component with :func:`resolve_path`. Look a family up with :func:`get_family` (by name),
:func:`family_of` (a loaded model) or :func:`family_of_checkpoint` (a directory).

Adding a family is one more entry in :data:`FAMILIES`. A stock transformers VLM such as LLaVA would
set its classes and loader, ``image_token_id=None`` (its image rows are vocabulary tokens:
:meth:`FamilySpec.image_marker` reads ``config.image_token_id``), ``images_in_sequence=True``,
``expands_image_marker=False`` (the processor already wrote one token per row), and observation
points on the modules where the lab's attention function (registered in transformers' attention
registry) emits its events.

``sites`` maps the public, TransformerLens-style site names of the causal toolkit
(``blocks.{i}.hook_resid_pre`` ...) to the module path of the writable hook point that carries
that tensor (a forward hook on it may return a replacement).
"""

from __future__ import annotations

import json
import operator
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from owl_lab.models.llava import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    build_for_training,
    llava_patch_features,
    prepare_llava,
)
from owl_lab.models.llava import load_checkpoint as load_llava_checkpoint
from owl_lab.models.loading import checkpoint_keys
from owl_lab.models.owl2 import IMAGE_TOKEN_INDEX, Owl2Config, Owl2ForCausalLM, Owl2Processor
from owl_lab.models.owl2 import load_checkpoint as load_owl2_checkpoint
from owl_lab.models.owl3 import Owl3Config, Owl3ForCausalLM, Owl3Processor
from owl_lab.models.owl3 import load_checkpoint as load_owl3_checkpoint

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
class TokenizerSpec:
    """The special tokens of a family's word-level lab tokenizer (:mod:`owl_lab.synth.tokenizer`).

    Attributes:
        specials: special tokens, in id order (ids 0, 1, ...).
        roles: ``PreTrainedTokenizerFast`` keyword arguments naming their roles (bos/eos/unk/pad ...).
        prepend_bos: a post-processor puts ``roles["bos_token"]`` in front of every text (LLaMA-like).
    """

    specials: tuple[str, ...]
    roles: dict[str, object]
    prepend_bos: bool = False


@dataclass(frozen=True)
class FamilySpec:
    """Everything the lab needs to know about one model family.

    Attributes:
        name: short family name used across the lab (``"owl2"``, ``"owl3"``).
        title: the name people know it by, for messages (``"mPLUG-Owl2"``).
        model_types: ``config.model_type`` values that belong to this family.
        key_markers: state-dict key prefixes that identify the family when ``config.json`` is
            silent (all must be present).
        config_class, model_class, processor_class: the family's transformers-style classes; a
            processor class has ``from_config(config, tokenizer)`` and ``from_pretrained(directory)``.
        loader: ``loader(directory, *, dtype, device_map, attn_implementation) -> (model, processor)``.
        image_token: how an image is marked in the prompt text (``"<|image|>"``).
        image_token_id: the id that marks an image in ``input_ids`` when it is a fixed sentinel
            (Owl2: ``-200``); None when the marker is an ordinary vocabulary id.
        expands_image_marker: each ``image_token_id`` in ``input_ids`` becomes
            ``config.tokens_per_image`` decoder rows inside the model (Owl2), so decoder positions
            differ from ``input_ids`` positions.
        images_in_sequence: image rows are decoder positions every layer attends to (Owl2, LLaVA);
            False when visual keys enter only at some layers (Owl3's hyper layers, see
            :attr:`image_layers`).
        image_layers: ``config -> [layer]`` the decoder layers whose attention can see the image.
        patch_features: ``(model, pixels [N, 3, S, S]) -> [N, G*G, W]`` per-patch features in raster
            order (no CLS), what the vision pre-training stage and the probes read.
        vision_pretrain: components the vision pre-training stage trains (objective ``patches``).
        vision_pretrain_board: ... and with the ``board`` objective (the whole visual path).
        tokenizer: special tokens of the lab's word-level tokenizer for this family.
        paths: component → module-path pattern (see the module docstring).
        sites: public site name pattern → module-path pattern of its writable hook point.
        prepare: ``prepare(model)`` run by ``hooks`` before looking for observation points — a stock
            transformers family installs them here (LLaVA: the attention observer registered in
            transformers' attention registry); None for the lab's own models, which have them built in.
        build_from_recipe: ``(recipe config, tokenizer, seed=) -> (model, processor)`` for a family whose
            config is not one flat dict (stock transformers); None = ``config_class(**config, **tokenizer
            ids)``.
    """

    name: str
    title: str
    model_types: tuple[str, ...]
    key_markers: tuple[str, ...]
    config_class: type
    model_class: type
    processor_class: type
    loader: Callable[..., tuple]
    image_token: str
    image_token_id: int | None
    expands_image_marker: bool
    images_in_sequence: bool
    image_layers: Callable[[object], list[int]]
    patch_features: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    vision_pretrain: tuple[str, ...]
    vision_pretrain_board: tuple[str, ...]
    tokenizer: TokenizerSpec
    paths: dict[str, str] = field(default_factory=dict)
    sites: dict[str, str] = field(default_factory=dict)
    prepare: Callable[[nn.Module], object] | None = None
    build_from_recipe: Callable[..., tuple] | None = None

    def has(self, component: str) -> bool:
        """True when the family has ``component`` (a key of :attr:`paths`)."""
        return component in self.paths

    def image_marker(self, config) -> int | None:
        """The id marking an image in ``input_ids``: the family's fixed sentinel (Owl2 ``-200``), else the
        config's image token id for families whose image rows are vocabulary tokens (LLaVA's
        ``image_token_id``); None when images are not marked in ``input_ids`` rows (Owl3)."""
        if self.image_token_id is not None:
            return self.image_token_id
        if not self.images_in_sequence:
            return None
        return getattr(config, "image_token_id", getattr(config, "image_token_index", None))

    def path(self, component: str, i: int | None = None, k: int | None = None) -> str:
        """The module path of ``component`` (``{i}`` / ``{k}`` filled); KeyError naming the known ones."""
        if component not in self.paths:
            raise KeyError(
                f"family {self.name!r} has no component {component!r}; it has {sorted(self.paths)}"
            )
        pattern = self.paths[component]
        return pattern.replace("{i}", str(i)).replace("{k}", str(k))


# ---- per-family facts that are code, not strings ---------------------------------------------------
def _all_layers(config) -> list[int]:
    return list(range(config.num_hidden_layers))


def _hyper_layers(config) -> list[int]:
    return list(config.hyper_layer_indices)


def _owl2_patch_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """ViT output without CLS: [N, 3, S, S] → [N, G*G, Wv]."""
    hidden = resolve_path(model, OWL2, "vision_tower")(pixel_values).last_hidden_state  # [N, (1+)G², Wv]
    return hidden[:, 1:] if model.config.vision_settings.use_cls_token else hidden


def _encoded_patch_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The visual tokens the decoder reads, one per patch: [N, 3, S, S] → [N, G*G, D]."""
    return resolve_path(model, family_of(model), "encode_images")(pixel_values)


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
    sites={**_block_sites("model.layers"), "hook_image_embeds": "model.hook_image_embeds"},
)

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
    patch_features=_encoded_patch_features,
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
        **_block_sites("language_model.model.layers"),
        "hook_image_embeds": "hook_image_embeds",
        # gated (240728) hyper layers only
        "blocks.{i}.attn.hook_gate": "language_model.model.layers.{i}.self_attn.hook_gate",
        "blocks.{i}.attn.hook_cross_z": "language_model.model.layers.{i}.self_attn.hook_cross_z",
    },
)


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

#: Every registered family, by name. Adding a family = adding an entry here.
FAMILIES: dict[str, FamilySpec] = {spec.name: spec for spec in (OWL2, OWL3, LLAVA)}


# ---- lookups -------------------------------------------------------------------------------------
def _supported() -> str:
    return ", ".join(
        f"{s.title} ({s.name!r}, model_type {'/'.join(s.model_types)})" for s in FAMILIES.values()
    )


def get_family(name: str | FamilySpec) -> FamilySpec:
    """The registered family called ``name`` (a spec is returned as is); ValueError naming the known ones."""
    if isinstance(name, FamilySpec):
        return name
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; registered families: {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_for_model_type(model_type: str | None) -> FamilySpec | None:
    """The family owning ``config.model_type`` (None when no registered family does)."""
    return next((s for s in FAMILIES.values() if model_type in s.model_types), None)


def family_of(model: nn.Module) -> FamilySpec:
    """The family of a loaded model, from ``model.config.model_type``.

    Raises:
        ValueError: naming the class and model_type of anything no registered family owns.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = family_for_model_type(model_type)
    if spec is None:
        raise ValueError(
            f"expected a model of a registered family ({_supported()}); "
            f"got {type(model).__name__} with model_type={model_type!r}."
        )
    return spec


def family_of_checkpoint(directory: str | os.PathLike) -> FamilySpec:
    """The family of a checkpoint directory: ``config.json``'s ``model_type``, else the key markers.

    Raises:
        ValueError: naming the model_type and first keys found when neither identifies a family.
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    model_type = json.loads(config_path.read_text()).get("model_type") if config_path.is_file() else None
    spec = family_for_model_type(model_type)
    if spec is not None:
        return spec
    try:
        keys = checkpoint_keys(directory)
    except FileNotFoundError:
        keys = []
    for spec in FAMILIES.values():
        if all(any(k.startswith(marker) for k in keys) for marker in spec.key_markers):
            return spec
    sample = ", ".join(keys[:5]) or "no weight files"
    raise ValueError(
        f"Unknown model family in {directory}: config model_type={model_type!r}, keys start with "
        f"[{sample}]. Registered families: {_supported()}."
    )


# ---- module paths ----------------------------------------------------------------------------------
def resolve_path(
    model: nn.Module, spec: FamilySpec | str, component: str, i: int | None = None, k: int | None = None
):
    """The object at ``component``'s path in ``model`` (a module, or a method such as ``encode_images``)."""
    return operator.attrgetter(get_family(spec).path(component, i, k))(model)


def _pattern_regex(pattern: str) -> re.Pattern:
    parts = re.split(r"(\{[a-z]\})", pattern)
    body = "".join(r"(\d+)" if re.fullmatch(r"\{[a-z]\}", p) else re.escape(p) for p in parts)
    return re.compile(rf"^{body}$")


@dataclass(frozen=True)
class HookSite:
    """One resolved module: its component, index (``{i}`` or ``{k}``; -1 if none), path and module."""

    component: str
    index: int
    path: str
    module: nn.Module


def find_sites(model: nn.Module, spec: FamilySpec | str, component: str) -> list[HookSite]:
    """All modules of ``model`` matching the family's pattern for ``component``, sorted by index.

    Returns [] when the family has no such component or the model has no matching module (e.g. the
    gate of a fused Owl3).
    """
    pattern = get_family(spec).paths.get(component)
    if pattern is None:
        return []
    regex = _pattern_regex(pattern)
    sites = []
    for path, module in model.named_modules():
        m = regex.match(path)
        if m:
            index = int(m.group(1)) if m.groups() else -1
            sites.append(HookSite(component, index, path, module))
    return sorted(sites, key=lambda s: s.index)
