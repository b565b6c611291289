"""Observation points and writable sites shared by every Owl model, read by the ``hooks`` package.

The models never compute interpretability statistics themselves. At a few named places they hand
the *exact* tensors they are about to use to a :class:`HookPoint` — an identity ``nn.Module`` that
does nothing unless someone registered a forward hook on it (TransformerLens style).

*Observation points* receive an event object. Building it is skipped entirely when no hook is
attached, so observation costs nothing when it is off, and hooks only read what they are given:

================================  ==========================  ========================================
module path (suffix)               receives                    when
================================  ==========================  ========================================
``<root>.hook_layout``             :class:`SequenceLayout`     once per top-level forward (one step)
``...self_attn.hook_attn``         :class:`AttentionEvent`     every decoder attention softmax (kind
                                                                ``self``, ``cross`` or ``joint``)
``...self_attn.hook_gate_event``   :class:`GateEvent`          Owl3 gated hyper layers only
``...attention.hook_attn``         :class:`AttentionEvent`     Owl2 abstractor (kind ``abstractor``)
================================  ==========================  ========================================

*Writable sites* receive a tensor the model is about to use; a forward hook that returns a tensor
replaces it (``hook_resid_pre`` … ``hook_z``, ``hook_image_embeds``, Owl3 ``hook_gate`` /
``hook_cross_z``). The events are built by the attention core (:mod:`owl_lab.models.attention`).
Which module paths a family has is data: ``FamilySpec.paths`` and ``.sites`` in
:mod:`owl_lab.families`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

# Codes for SequenceLayout.token_kind (per position of the sequence the decoder sees).
TOKEN_PAD = -1  # padding (attention_mask == 0)
TOKEN_TEXT = 0  # ordinary prompt text
TOKEN_IMAGE = 1  # an image row inside the sequence (Owl2: 65 rows per image, vit_eos included)
TOKEN_PLACEHOLDER = 2  # Owl3: a token of a `<|image|>` placeholder (text token standing for an image)
TOKEN_GENERATED = 3  # a token fed back during generate() (decode steps)


#: What one attention softmax is: decoder self-attention, Owl3 240728 cross attention over image
#: keys, Owl3 241101 joint softmax over [image keys ; text keys], Owl2 abstractor, or a ViT layer.
AttentionKind = Literal["self", "cross", "joint", "abstractor", "vision"]


class HookPoint(nn.Module):
    """Identity module marking a place to observe or edit (TransformerLens style).

    Observation points receive an event (``hook(module, (event,), event)``). Writable sites receive
    a tensor; a forward hook that returns a tensor replaces it, and the model uses the returned value.
    """

    def forward(self, x):  # noqa: D401 - identity
        return x

    @property
    def active(self) -> bool:
        """True when a forward (pre-)hook is registered; models build events only then."""
        return bool(self._forward_hooks or self._forward_pre_hooks)


@dataclass
class SequenceLayout:
    """What the decoder sees in one forward call (one prefill or one decode step).

    Shapes use B = batch, L = positions added by this call, P = ``past_length``.

    Attributes:
        past_length: number of sequence positions already in the KV cache before this call.
        token_kind: [B, L] long, one of the ``TOKEN_*`` codes for the new positions.
        image_index: [B, L] long, sample-relative image index of positions that belong to an image
            (Owl2 image rows; Owl3 placeholder tokens), else -1.
        attention_mask: [B, P + L] long/bool over the decoder's whole sequence, 1 = real token,
            or None when nothing is padded.
        images_per_sample: number of images of each sample (len B).
    """

    past_length: int
    token_kind: torch.Tensor
    image_index: torch.Tensor
    attention_mask: torch.Tensor | None
    images_per_sample: list[int]


@dataclass
class AttentionEvent:
    """The inputs of one attention softmax, exactly as the model uses them.

    The probabilities are ``softmax(scale * query @ key^T)`` over the keys that ``allowed`` permits
    (GQA: query head h uses key head ``h // (H // H_kv)``). Hooks reduce them in query chunks and
    never need the full [B, H, Lq, Lk] tensor.

    Attributes:
        layer: decoder layer index (0-based); abstractor layer index for kind ``abstractor``.
        kind: ``self`` (text/sequence keys), ``cross`` (Owl3 240728 image keys only),
            ``joint`` (Owl3 241101: [image keys ; sequence keys]), ``abstractor`` (Owl2) or
            ``vision`` (a ViT layer; no observation point today).
        query: [B, H, Lq, D] after RoPE.
        key: [B, H_kv, Lk, D] after (MI-)RoPE.
        scale: softmax scale (usually D ** -0.5).
        query_index: [Lq] long, absolute sequence index of each query (past_length + i).
        key_position: [B, Lk] long, sequence index of each key, -1 for keys that are image tokens
            outside the sequence (Owl3 cross/joint image keys; Owl2 abstractor keys).
        key_image: [B, Lk] long, sample-relative image index of image keys, -1 for text keys.
            Owl2's image rows are sequence keys (they have a ``key_position``) and still carry
            their image index here; Owl3's placeholder tokens are text keys (-1).
            For kind ``abstractor`` it is -1 for query keys, -2 for CLS, and the patch index
            (row-major) for patch keys.
        allowed: the mask the kernel used (:class:`owl_lab.models.attention.Allowed`), callable as
            ``(q0, q1) -> bool [B, q1 - q0, Lk]`` for queries q0..q1-1 (True = attend); under a
            per-head knockout ``[B, H, q1 - q0, Lk]`` (``allowed.per_head``). Rows with no allowed
            key (e.g. Owl3 tokens before the first image in a ``cross`` call) are not a softmax
            and must be skipped.
        probs: [B, H, Lq, Lk] when the model already materialised them (eager path), else None.
        logsumexp: [B, H, Lq] fp32 (fp64 for fp64 models) log of the softmax normaliser that the SDPA
            kernel computed along the way, when it could hand it out (CPU flash kernel), else None.
            With it, the mass of a few keys needs only their scores: ``exp(scale q·k - logsumexp)``.
        image_rope_positions: [B, N] MI-RoPE position of each image slot (-1 = padding slot) for
            Owl3 ``cross``/``joint`` events with image keys and MI-RoPE on; else None.
        grid: (rows, cols) of the patch grid for kind ``abstractor``; else None.
    """

    layer: int
    kind: AttentionKind
    query: torch.Tensor
    key: torch.Tensor
    scale: float
    query_index: torch.Tensor
    key_position: torch.Tensor
    key_image: torch.Tensor
    allowed: Callable[[int, int], torch.Tensor]
    probs: torch.Tensor | None = None
    logsumexp: torch.Tensor | None = None
    image_rope_positions: torch.Tensor | None = None
    grid: tuple[int, int] | None = None


@dataclass
class GateEvent:
    """Owl3 240728 adaptive gate of one hyper layer (fusion happens before ``o_proj``; the event is
    emitted after ``o_proj``, with its output).

    Attributes:
        layer: decoder layer index.
        gate: [B, L, H, D] post-sigmoid gate g for every token (computed for all rows).
        applied: [B, L] bool, rows where the fusion ``self*(1-g) + cross*g`` was applied (tokens
            that see at least one image); other rows keep the self-attention output unchanged.
            Under a per-head knockout ``[B, H, L]`` (per head; ``hooks.gates`` handles both).
        self_context: [B, L, H, D] self-attention context before fusion.
        cross_context: [B, L, H, D] cross-attention context (zeros where not applied).
        o_proj_weight: [hidden, H*D] weight of the layer's output projection (linear, no bias), so
            the exact text/vision split of the attention output is ``F.linear(self*(1-g), W)`` and
            ``F.linear(cross*g, W)``.
        query_index: [L] absolute sequence index of each row.
        output: [B, L, hidden] the layer's attention output ``o_proj(fused)`` (the event fires after
            ``o_proj``), so text part = output − vision part needs one product; None when ``hook_z``
            was hooked (it may have replaced the ``o_proj`` input) or the emitter has no output.
    """

    layer: int
    gate: torch.Tensor
    applied: torch.Tensor
    self_context: torch.Tensor
    cross_context: torch.Tensor
    o_proj_weight: torch.Tensor
    query_index: torch.Tensor
    output: torch.Tensor | None = None
