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

Adding a family is one more file like :mod:`owl_lab.families.owl2` and one more entry in
:data:`FAMILIES`. A stock transformers VLM such as LLaVA would
set its classes and loader, ``image_token_id=None`` (its image rows are vocabulary tokens:
:meth:`FamilySpec.image_marker` reads ``config.image_token_id``), ``images_in_sequence=True``,
``expands_image_marker=False`` (the processor already wrote one token per row), and observation
points on the modules where the lab's attention function (registered in transformers' attention
registry) emits its events.

``sites`` maps the public, TransformerLens-style site names of the causal toolkit
(``blocks.{i}.hook_resid_pre`` ...) to the module path of the writable hook point that carries
that tensor (a forward hook on it may return a replacement).
"""

from owl_lab.families.llava import LLAVA
from owl_lab.families.owl2 import OWL2
from owl_lab.families.owl3 import OWL3
from owl_lab.families.registry import (
    FAMILIES,
    HookSite,
    family_for_model_type,
    family_of,
    family_of_checkpoint,
    find_sites,
    get_family,
    resolve_path,
)
from owl_lab.families.spec import BLOCK_SITES, FamilySpec, TokenizerSpec, block_sites

__all__ = [
    "BLOCK_SITES",
    "FAMILIES",
    "LLAVA",
    "OWL2",
    "OWL3",
    "FamilySpec",
    "HookSite",
    "TokenizerSpec",
    "block_sites",
    "family_for_model_type",
    "family_of",
    "family_of_checkpoint",
    "find_sites",
    "get_family",
    "resolve_path",
]
