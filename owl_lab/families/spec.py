"""What a model family is, as data: :class:`FamilySpec` and the site names every decoder block has.

The entries themselves live one file per family (:mod:`owl_lab.families.owl2`, ``owl3``, ``llava``),
the lookups in :mod:`owl_lab.families.registry`; :mod:`owl_lab.families` re-exports all of it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

#: Public site names every decoder block has (``{i}`` = layer), and what each tensor is.
BLOCK_SITES = {
    "hook_resid_pre": "[B, L, D] residual stream entering block i",
    "hook_resid_mid": "[B, L, D] residual stream after the attention update",
    "hook_resid_post": "[B, L, D] residual stream leaving block i",
    "hook_attn_out": "[B, L, D] attention output added to the stream (after o_proj)",
    "hook_mlp_out": "[B, L, D] MLP output added to the stream",
}


def block_sites(layer_prefix: str) -> dict[str, str]:
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

    def resolve(self, model: nn.Module, component: str, i: int | None = None, k: int | None = None):
        """The object at ``component``'s path in ``model``: a module, or a method (``encode_images``)."""
        return operator.attrgetter(self.path(component, i, k))(model)
