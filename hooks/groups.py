"""Token groups: which group every attention key belongs to, from the model's own bookkeeping.

Two *levels* of groups, each a partition of the keys a softmax can use (so the masses of one level
sum to 1 for every query):

* ``modality``: ``visual`` (Owl2 image rows incl. ``vit_eos``; Owl3 image keys of cross/joint
  attention) · ``text`` (every other real token, Owl3 ``<|image|>`` placeholder tokens included,
  because they are text tokens in the sequence) · ``pad`` (padding; only reported when a model
  actually lets a query attend a pad key).
* ``token``: ``bos`` (the first real token of the sample — the attention sink; for Owl3, which has
  no BOS, that is ``<|im_start|>`` of the system turn) · ``question`` (the rest of the prompt text:
  template, system turn, user text) · ``placeholder`` (Owl3 placeholder tokens, kept apart from
  ``question`` because they stand for images; Owl2 has none — its markers become image rows) ·
  ``image:i`` (sample-relative image i: Owl2 rows, Owl3 image keys) · ``generated`` (tokens fed
  back during ``generate`` decode steps) · ``pad``.

The token level is the finest partition; the modality level is computed from it (image:i → visual,
pad → pad, everything else → text), so the two levels always agree. Owl3 placeholders: only the
*first* token of each ``<|image|>`` placeholder is known to the model (``s_n``), so only that token
is ``placeholder``; further BPE pieces of a multi-token placeholder count as ``question``.

The group of a sequence position comes from the :class:`SequenceLayout` history (token kind, image
index, first real token); keys outside the sequence (``key_position == -1``) are image keys whose
image is ``key_image``.
"""

from __future__ import annotations

import warnings

import torch

from owl_lab.models.observe import (
    TOKEN_GENERATED,
    TOKEN_IMAGE,
    TOKEN_PAD,
    TOKEN_PLACEHOLDER,
    TOKEN_TEXT,
    SequenceLayout,
)

# The token level is the finest partition of the keys; the modality level is a coarsening of it.
TOKEN_GROUPS = ("bos", "question", "placeholder", "generated", "pad")  # then image:0 .. image:n-1
BOS, QUESTION, PLACEHOLDER, GENERATED, TPAD = range(len(TOKEN_GROUPS))
N_TOKEN_FIXED = len(TOKEN_GROUPS)
MODALITY_GROUPS = ("visual", "text", "pad")
_MODALITY_OF = {"bos": "text", "question": "text", "placeholder": "text", "generated": "text", "pad": "pad"}


def token_groups(n_images: int) -> list[str]:
    """Names of the token-level groups (the ids :func:`key_groups` returns)."""
    return list(TOKEN_GROUPS) + [f"image:{i}" for i in range(n_images)]


def group_vocabulary(n_images: int) -> tuple[list[str], list[str]]:
    """(levels, names) of all reported groups: the 3 modality groups, then the token groups."""
    names = list(MODALITY_GROUPS) + token_groups(n_images)
    levels = ["modality"] * len(MODALITY_GROUPS) + ["token"] * (len(names) - len(MODALITY_GROUPS))
    return levels, names


def coarsen_to_modality(n_images: int) -> torch.Tensor:
    """[G_token, 3] 0/1 matrix: token group → modality group (image:i → visual, pad → pad, else text)."""
    names = token_groups(n_images)
    out = torch.zeros(len(names), len(MODALITY_GROUPS))
    for i, name in enumerate(names):
        out[i, MODALITY_GROUPS.index(_MODALITY_OF.get(name, "visual"))] = 1.0
    return out


class SequenceHistory:
    """Token kinds and image indices of the whole sequence the decoder has seen so far.

    Each :class:`SequenceLayout` describes the positions one forward call adds after
    ``past_length`` cached ones; this class concatenates them (prefill, then decode steps).

    Attributes:
        kind: [B, S] long ``TOKEN_*`` code per sequence position.
        image: [B, S] long sample-relative image index (-1 when none).
        attention_mask: [B, S] bool or None (latest layout's mask; None = nothing padded).
    """

    def __init__(self):
        self.kind: torch.Tensor | None = None
        self.image: torch.Tensor | None = None
        self.attention_mask: torch.Tensor | None = None
        self.images_per_sample: list[int] = []

    @property
    def length(self) -> int:
        return 0 if self.kind is None else self.kind.shape[1]

    def update(self, layout: SequenceLayout) -> None:
        kind = layout.token_kind.detach().to("cpu", torch.long)  # [B, L]
        image = layout.image_index.detach().to("cpu", torch.long)  # [B, L]
        past = int(layout.past_length)
        if self.kind is None or past == 0 or self.kind.shape[0] != kind.shape[0]:
            if past:
                # capture began after the prefill: the cached positions' kinds are unknown.
                warnings.warn(
                    f"hooks.capture saw a decode step (past_length={past}) without its prefill; "
                    "the cached positions are grouped as 'question'.",
                    stacklevel=2,
                )
            prev_kind = torch.full((kind.shape[0], past), TOKEN_TEXT, dtype=torch.long)
            prev_image = torch.full((kind.shape[0], past), -1, dtype=torch.long)
        else:
            if past > self.length:
                raise ValueError(
                    f"SequenceLayout.past_length={past} but only {self.length} positions were seen."
                )
            prev_kind, prev_image = self.kind[:, :past], self.image[:, :past]
        self.kind = torch.cat([prev_kind, kind], dim=1)  # [B, P + L]
        self.image = torch.cat([prev_image, image], dim=1)  # [B, P + L]
        mask = layout.attention_mask
        if mask is not None:
            mask = mask.detach().to("cpu").bool()
            if mask.shape != self.kind.shape:
                raise ValueError(
                    f"SequenceLayout.attention_mask has shape {tuple(mask.shape)}, expected "
                    f"[B, past_length + L] = {tuple(self.kind.shape)}."
                )
        self.attention_mask = mask
        self.images_per_sample = list(layout.images_per_sample)

    def first_real(self) -> torch.Tensor:
        """[B] long index of each sample's first non-pad position (the ``bos`` group)."""
        real = self.kind != TOKEN_PAD  # [B, S]
        return torch.where(
            real.any(1), real.int().argmax(1), torch.full_like(real[:, 0], -1, dtype=torch.long)
        )

    def valid_queries(self, query_index: torch.Tensor) -> torch.Tensor:
        """[B, Lq] bool: queries that are real tokens (pads are dropped from the results)."""
        qi = query_index.to("cpu", torch.long)
        if qi.numel() and int(qi.max()) >= self.length:
            raise ValueError(f"query index {int(qi.max())} beyond the {self.length} positions seen")
        valid = self.kind[:, qi] != TOKEN_PAD  # [B, Lq]
        if self.attention_mask is not None:
            valid &= self.attention_mask[:, qi]
        return valid


def key_groups(
    history: SequenceHistory, key_position: torch.Tensor, key_image: torch.Tensor, n_images: int
) -> torch.Tensor:
    """Token-level group id of every key (the modality level follows by :func:`coarsen_to_modality`).

    Args:
        history: the sequence seen so far (from the layouts).
        key_position: [B, Lk] sequence index of each key, -1 for image keys outside the sequence.
        key_image: [B, Lk] image index of image keys, -1 for sequence keys (and padded key slots).
            For sequence keys the image comes from the layout history, so a model may also put the
            image index of Owl2 image rows here.
        n_images: number of ``image:i`` groups (> every image index that occurs).

    Returns:
        [B, Lk] long ids into :func:`token_groups`; -1 for padded key slots (position -1, image -1).
    """
    kp = key_position.detach().to("cpu", torch.long)  # [B, Lk]
    ki = key_image.detach().to("cpu", torch.long)  # [B, Lk]
    B, Lk = kp.shape
    if history.kind is None:
        raise ValueError(
            "an attention event arrived before any SequenceLayout (the model must emit hook_layout first)"
        )
    if history.kind.shape[0] != B:
        raise ValueError(f"attention event has batch {B}, the layout has batch {history.kind.shape[0]}")
    if kp.numel() and int(kp.max()) >= history.length:
        raise ValueError(f"key position {int(kp.max())} beyond the {history.length} positions seen")
    in_seq = kp >= 0
    pos = kp.clamp(min=0)
    kind = torch.where(in_seq, history.kind.gather(1, pos), torch.full_like(kp, -9))  # [B, Lk]
    img = torch.where(in_seq, history.image.gather(1, pos), ki)  # [B, Lk]
    is_image = (kind == TOKEN_IMAGE) | (~in_seq & (ki >= 0))
    if is_image.any() and int(img[is_image].max()) >= n_images:
        raise ValueError(f"image index {int(img[is_image].max())} but only {n_images} image groups")

    group = torch.full_like(kp, -1)
    group[kind == TOKEN_TEXT] = QUESTION
    group[kind == TOKEN_PLACEHOLDER] = PLACEHOLDER
    group[kind == TOKEN_GENERATED] = GENERATED
    group[kind == TOKEN_PAD] = TPAD
    group[is_image] = N_TOKEN_FIXED + img[is_image]
    group[in_seq & (kp == history.first_real()[:, None])] = BOS
    unknown = in_seq & (group < 0)
    if unknown.any():
        raise ValueError(f"unknown token_kind codes {sorted(set(kind[unknown].tolist()))} in SequenceLayout")
    return group
