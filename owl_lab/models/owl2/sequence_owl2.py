"""Building the decoder's multimodal sequence (owl2 SPEC §3.4) and its masks, positions and layout.

Each ``-200`` marker in ``input_ids`` becomes the Q+1 rows of the next image (abstractor queries,
then ``vit_eos``), all with modality 1. Unlike the official code:

* images are consumed per marker, so a text-only row in a multimodal batch consumes no image;
* rows that expand to different lengths are padded with zero rows (mask 0) on the side the batch is
  padded on: left when every row ends with a real token (what ``generate`` needs), else right;
* position ids come from the attention mask (``cumsum - 1``), so left, right or inner padding is
  harmless; pad rows keep their own index as position (equal to the official value for right pads);
* the expanded mask and per-position image index are remembered in the KV cache (:class:`Owl2Cache`),
  so decode steps keep the padding information (the official code resets the mask to all ones)
  and hooks can label cached image keys.

Shapes: B batch, Lt = input_ids length, L = expanded length of this call, P = cached positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicCache

from ..attention import Allowed
from ..observe import TOKEN_GENERATED, TOKEN_IMAGE, TOKEN_PAD, TOKEN_TEXT, SequenceLayout
from .configuration_owl2 import IGNORE_INDEX, IMAGE_TOKEN_INDEX


@dataclass
class Owl2Sequence:
    """What the decoder consumes in one forward call (one prefill or one decode step)."""

    inputs_embeds: torch.Tensor  # [B, L, D]
    modality_indicators: torch.Tensor  # [B, L] long, 0 text / 1 vision
    has_vision: bool  # any modality 1 in this call (else the text branch alone is run)
    attention_mask: torch.Tensor  # [B, P+L] long over the whole decoder sequence, 1 = real
    padded: bool  # any 0 in attention_mask
    position_ids: torch.Tensor  # [B, L]
    labels: torch.Tensor | None  # [B, L], -100 on image rows and expansion pads
    image_index: torch.Tensor  # [B, L] sample-relative image index of image rows, else -1
    key_image: torch.Tensor  # [B, P+L] same over the whole sequence (cache included)
    past_length: int
    _masks: dict = field(default_factory=dict, repr=False)

    @property
    def length(self) -> int:
        return self.inputs_embeds.shape[1]

    # ---- masks ----------------------------------------------------------------------------------
    def allowed(self, q0: int, q1: int) -> torch.Tensor:
        """bool [B, q1-q0, P+L]: key j is visible to query i iff j <= P+i and key j is not padding."""
        P, dev = self.past_length, self.attention_mask.device
        keys = torch.arange(self.attention_mask.shape[1], device=dev)
        queries = torch.arange(P + q0, P + q1, device=dev)
        causal = keys[None, :] <= queries[:, None]  # [q, P+L]
        return causal[None] & self.attention_mask[:, None, :].bool()

    def allowed_mask(self) -> Allowed:
        """The decoder's mask for this call, shared by every layer (no tensor when none is needed)."""
        if "allowed" not in self._masks:
            shape = (self.attention_mask.shape[0], self.length, self.attention_mask.shape[1])
            dev = self.attention_mask.device
            if not self.padded and self.length == 1:
                mask = Allowed(shape, fast="all", device=dev)  # one query sees the whole cache
            elif not self.padded and self.past_length == 0:
                mask = Allowed(shape, fast="causal", device=dev)  # plain causal prefill
            else:
                mask = Allowed(shape, rows=self.allowed)
            self._masks["allowed"] = mask
        return self._masks["allowed"]

    # ---- observation ----------------------------------------------------------------------------
    def layout(self) -> SequenceLayout:
        P = self.past_length
        new_mask = self.attention_mask[:, P:]
        kind = torch.full_like(self.image_index, TOKEN_GENERATED if P > 0 else TOKEN_TEXT)
        kind = kind.masked_fill(self.modality_indicators == 1, TOKEN_IMAGE)
        kind = kind.masked_fill(new_mask == 0, TOKEN_PAD)
        ki = self.key_image
        return SequenceLayout(
            past_length=P,
            token_kind=kind,
            image_index=self.image_index,
            attention_mask=self.attention_mask if self.padded else None,
            images_per_sample=(ki.max(dim=1).values + 1).clamp(min=0).tolist(),
        )


class Owl2Cache(DynamicCache):
    """transformers' ``DynamicCache`` plus what the Owl2 decoder remembers about cached positions.

    Image rows exist only in the expanded sequence, so ``generate``'s input-space attention mask
    cannot describe the cache; the expanded mask and the image index of every cached position are
    kept here, so decode steps keep the padding information and hooks can label cached image keys.
    """

    attention_mask: torch.Tensor | None = None  # [B, P] long over the cached positions, 1 = real
    key_image: torch.Tensor | None = None  # [B, P] long image index of cached image rows, else -1

    @classmethod
    def adopt(cls, cache: Cache | None) -> Owl2Cache | None:
        """A plain ``DynamicCache`` (made by ``generate`` or the caller) becomes an Owl2Cache in place,
        so every reference to it stays valid."""
        if cache is None or isinstance(cache, cls):
            return cache
        if type(cache) is not DynamicCache:
            raise TypeError(f"Owl2 models need a DynamicCache (or Owl2Cache), got {type(cache).__name__}.")
        cache.__class__ = cls
        return cache

    def remember(self, attention_mask: torch.Tensor, key_image: torch.Tensor) -> None:
        """Store the expanded mask and image index [B, P+L] of every position after this call."""
        self.attention_mask, self.key_image = attention_mask, key_image

    def past(self, B: int, P: int, device) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(mask [B, P] or None when unknown, key_image [B, P]) of the cached positions."""
        mask, key_image = self.attention_mask, self.key_image
        if mask is None or mask.shape != (B, P):
            mask = None
        if key_image is None or key_image.shape != (B, P):
            key_image = torch.full((B, P), -1, dtype=torch.long, device=device)
        return mask, key_image


def _expand_images(model, input_ids, new_mask, labels, pixel_values):
    """Splice Q+1 image rows at every marker. Returns embeds, mask, modality, image_index, labels."""
    cfg = model.config
    Q1 = cfg.tokens_per_image
    B, Lt = input_ids.shape
    markers = input_ids == IMAGE_TOKEN_INDEX  # [B, Lt]
    n_images = int(markers.sum())
    if pixel_values is None or pixel_values.shape[0] != n_images:
        got = 0 if pixel_values is None else pixel_values.shape[0]
        raise ValueError(
            f"input_ids hold {n_images} image markers ({IMAGE_TOKEN_INDEX}) but {got} images were "
            f"given; pass pixel_values [N_img, 3, S, S] in order of appearance, one per marker."
        )
    feats = model.encode_images(pixel_values)  # [N, Q1, D]

    lens = torch.where(markers, Q1, 1)  # [B, Lt] rows each input token becomes
    starts = lens.cumsum(1) - lens  # [B, Lt] first expanded row of each input token
    row_len = lens.sum(1)  # [B]
    L = int(row_len.max())
    if bool(new_mask[:, -1].all()):  # left-padded or unpadded batch: pad short rows on the left
        starts = starts + (L - row_len)[:, None]

    text_embeds = model.embed_tokens(input_ids.masked_fill(markers, 0))  # [B, Lt, D]
    tb, tt = (~markers).nonzero(as_tuple=True)  # text tokens
    dest = starts[tb, tt]
    ib, it = markers.nonzero(as_tuple=True)  # row-major = order of appearance = image order
    rows = starts[ib, it][:, None] + torch.arange(Q1, device=input_ids.device)  # [N, Q1]
    rb = ib[:, None].expand_as(rows)

    embeds = text_embeds.new_zeros(B, L, text_embeds.shape[-1])  # [B, L, D]
    embeds[tb, dest] = text_embeds[tb, tt]
    embeds[rb, rows] = feats.to(embeds.dtype)
    mask = new_mask.new_zeros(B, L)
    mask[tb, dest] = new_mask[tb, tt]
    mask[rb, rows] = new_mask[ib, it][:, None].expand_as(rows)
    modality = torch.zeros(B, L, dtype=torch.long, device=input_ids.device)
    modality[rb, rows] = 1
    image_index = torch.full((B, L), -1, dtype=torch.long, device=input_ids.device)
    image_index[rb, rows] = (markers.cumsum(1) - 1)[ib, it][:, None].expand_as(rows)
    new_labels = None
    if labels is not None:
        new_labels = torch.full((B, L), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
        new_labels[tb, dest] = labels[tb, tt]
    return embeds, mask, modality, image_index, new_labels


def build_sequence(
    model,
    input_ids: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    modality_indicators: torch.Tensor | None = None,
    past_key_values=None,
) -> Owl2Sequence:
    """Turn one call's inputs into an :class:`Owl2Sequence` (``model`` is an ``Owl2Model``).

    Args:
        input_ids: [B, Lt] with -200 image markers; or inputs_embeds [B, L, D] (already expanded,
            modality_indicators [B, L] optional, default text).
        pixel_values: [N_img, 3, S, S], one image per marker in order of appearance over the batch.
        attention_mask: [B, Lt] for this call's tokens, or [B, P+Lt] (HF incremental convention), or
            already expanded [B, P+L]. Decode steps reuse the expanded mask remembered on the cache.
        labels: [B, Lt] (or expanded [B, L]); image rows get -100.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
    ref = input_ids if input_ids is not None else inputs_embeds
    B, Lt, dev = ref.shape[0], ref.shape[1], ref.device
    past_key_values = Owl2Cache.adopt(past_key_values)
    P = past_key_values.get_seq_length() if past_key_values is not None else 0
    if past_key_values is not None:
        past_mask, past_key_image = past_key_values.past(B, P, dev)
    else:
        past_mask, past_key_image = None, torch.full((B, 0), -1, dtype=torch.long, device=dev)

    # this call's mask in input space; an already-expanded full mask is only possible without markers
    full_given = None
    if attention_mask is None:
        new_mask = torch.ones(B, Lt, dtype=torch.long, device=dev)
    else:
        attention_mask = attention_mask.to(device=dev, dtype=torch.long)
        m = attention_mask.shape[1]
        if P > 0 and m == P + Lt:
            full_given = attention_mask
        elif not (m == Lt or (P > 0 and m > Lt and past_mask is not None)):
            # (the last case is generate's mask in input space; the cache remembers the expanded past)
            raise ValueError(
                f"attention_mask has length {m}; expected {Lt} (this call's tokens)"
                + (f" or {P + Lt} (cached + new positions)." if P > 0 else ".")
            )
        new_mask = attention_mask[:, -Lt:]

    has_markers = input_ids is not None and bool((input_ids == IMAGE_TOKEN_INDEX).any())
    if has_markers:
        embeds, new_mask, modality, image_index, labels = _expand_images(
            model, input_ids, new_mask, labels, pixel_values
        )
        full_given = None  # the given mask was in input space
        has_vision = True
    else:
        if P == 0 and pixel_values is not None and pixel_values.shape[0] > 0:
            raise ValueError(
                f"{pixel_values.shape[0]} images were given but input_ids hold no image markers "
                f"({IMAGE_TOKEN_INDEX}); add one `<|image|>` per image to the prompt."
            )  # (after prefill, images passed again by generate-style loops are ignored)
        embeds = model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if modality_indicators is None:
            modality = torch.zeros(B, Lt, dtype=torch.long, device=dev)
            has_vision = False
        else:
            modality = modality_indicators.to(device=dev, dtype=torch.long)
            has_vision = bool(modality.any())
        image_index = torch.full((B, Lt), -1, dtype=torch.long, device=dev)
    L = embeds.shape[1]

    if full_given is not None:
        full_mask = full_given
    else:
        if past_mask is None:
            past_mask = torch.ones(B, P, dtype=torch.long, device=dev)
        full_mask = torch.cat([past_mask, new_mask], dim=1)  # [B, P+L]
    padded = not bool(full_mask.all())

    if position_ids is not None:
        if position_ids.shape[-1] != L:
            raise ValueError(
                f"position_ids must cover the expanded sequence ({L}), got {position_ids.shape[-1]}."
            )
        position_ids = position_ids.to(dev).expand(B, -1)
    else:
        arange = torch.arange(P, P + L, device=dev)[None].expand(B, -1)  # [B, L]
        if padded:  # real tokens count only real predecessors; pads keep their own index
            from_mask = full_mask.cumsum(1)[:, P:] - 1
            position_ids = torch.where(full_mask[:, P:].bool(), from_mask, arange)
        else:
            position_ids = arange

    if labels is not None and labels.shape[1] != L:
        raise ValueError(
            f"labels must have length {Lt} (input ids) or {L} (expanded), got {labels.shape[1]}."
        )
    return Owl2Sequence(
        inputs_embeds=embeds,
        modality_indicators=modality,
        has_vision=has_vision,
        attention_mask=full_mask,
        padded=padded,
        position_ids=position_ids,
        labels=labels,
        image_index=image_index,
        key_image=torch.cat([past_key_image, image_index], dim=1),
        past_length=P,
    )
