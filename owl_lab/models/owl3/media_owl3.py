"""Where the images of an Owl3 batch are: ``media_offset`` (both official formats) → per-sample layout.

The model works internally with one stateless, per-sample description of the images:

* ``image_starts`` [B, N] long: sequence index s_n of the first token of the n-th ``<|image|>``
  placeholder of sample b (images in order of appearance), -1 for padding slots (samples with
  fewer than N = max images per sample).
* ``image_embeds`` [B, N, T, H]: the projected image features of those images (zeros in padding slots).

Everything else (visibility masks, MI-RoPE positions, decode-step behaviour) is derived from
``image_starts`` and the query positions, so no module keeps state between calls, and beam search can
expand both tensors along the batch dimension like any other input.

Official ``media_offset`` formats accepted here (owl3 SPEC §3.5; §7 of the golden fixtures' README,
``tests/fixtures/reference/owl3/goldens/owl3-tiny-a/README.md``):

* dense ``[B, L, 2]`` (240728 / 241014): row t of sample b is ``(base_b, base_b + c_t)`` with
  c_t = #{n : s_n < t} and base_b the index of the sample's first image in the batch-global
  ``pixel_values``; a sample without images has every row ``(0, -1000000)``.
* list (241101): one 1-D LongTensor of placeholder starts per sample; images are consumed from the
  batch-global ``pixel_values`` in sample order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from owl_lab.models.observe import TOKEN_GENERATED, TOKEN_PAD, TOKEN_PLACEHOLDER, TOKEN_TEXT, SequenceLayout

NO_IMAGE_MARKER = -1000000


def _last_real_index(attention_mask: torch.Tensor | None, b: int, length: int) -> int:
    if attention_mask is None:
        return length - 1
    real = torch.nonzero(attention_mask[b, :length]).flatten()
    return int(real[-1]) if real.numel() else length - 1


def starts_from_dense(
    media_offset: torch.Tensor, num_images: int, attention_mask: torch.Tensor | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Decode the dense 240728 ``media_offset`` [B, L, 2] into per-sample starts and image indices.

    An image that no token of the prompt can see (its placeholder starts at the last real token, so
    the visible count never increments) is absent from the counts; it is recovered from the
    batch-global bases and placed at the last real token (the only position that hides it).

    Returns:
        (starts, image_index): two lists of length B of 1-D long tensors; ``image_index[b][n]`` is the
        row of ``pixel_values`` holding image n of sample b.

    Raises:
        ValueError: malformed offsets, per-sample bases (all 0) in a batch with several imaged
            samples, or counts that do not match ``num_images``.
    """
    if media_offset.dim() != 3 or media_offset.shape[-1] != 2:
        raise ValueError(f"dense media_offset must be [B, L, 2]; got shape {tuple(media_offset.shape)}.")
    mo = media_offset.detach().to("cpu", torch.long)
    batch, length, _ = mo.shape
    imaged, counts = [], {}
    for b in range(batch):
        rows = mo[b]
        negative = rows[:, 1] < 0
        if negative.all():
            continue  # (0, -1000000) rows: no images
        if negative.any():
            raise ValueError(f"media_offset sample {b}: mixes no-image rows (column 1 < 0) with image rows.")
        base = rows[0, 0]
        if (rows[:, 0] != base).any():
            raise ValueError(
                f"media_offset sample {b}: column 0 (first image of the sample) must be constant."
            )
        c = rows[:, 1] - base
        if (c < 0).any() or (c[1:] < c[:-1]).any():
            raise ValueError(
                f"media_offset sample {b}: visible-image counts must be >= 0 and non-decreasing."
            )
        imaged.append((b, int(base)))
        counts[b] = c
    starts = [torch.zeros(0, dtype=torch.long) for _ in range(batch)]
    index = [torch.zeros(0, dtype=torch.long) for _ in range(batch)]
    if not imaged:
        if num_images:
            raise ValueError(
                f"pixel_values holds {num_images} images but media_offset marks every sample as text-only."
            )
        return starts, index
    bases = [base for _, base in imaged]
    if bases[0] != 0 or any(b2 <= b1 for b1, b2 in zip(bases, bases[1:], strict=False)):
        raise ValueError(
            "media_offset column 0 must be the batch-global index of each sample's first image in "
            "pixel_values (0 for the first imaged sample, strictly increasing); "
            f"got bases {bases} for samples "
            f"{[b for b, _ in imaged]}. Per-sample offsets with base 0 cannot be concatenated into a batch: "
            "shift each sample's rows by the number of images before it (the processor does this)."
        )
    ends = bases[1:] + [num_images]
    for (b, base), end in zip(imaged, ends, strict=True):
        c = counts[b]
        n_images, n_seen = end - base, int(c[-1])
        if n_images < max(n_seen, 1):
            raise ValueError(
                f"media_offset sample {b} sees {n_seen} images from base {base}, but pixel_values only has "
                f"{end - base} images for it (pixel_values holds {num_images} images in total)."
            )
        if n_images - n_seen > 1:
            raise ValueError(
                f"media_offset sample {b}: {n_images - n_seen} of its {n_images} images "
                "are visible to no token; "
                "at most one (a placeholder starting at the last token) can be located."
            )
        s = [int(torch.nonzero(c > n)[0]) - 1 for n in range(n_seen)]
        if n_images > n_seen:
            s.append(_last_real_index(attention_mask, b, length))
        starts[b] = torch.tensor(s, dtype=torch.long)
        index[b] = torch.arange(base, end, dtype=torch.long)
    return starts, index


def starts_from_list(
    media_offset: Sequence, num_images: int, batch_size: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Decode the 241101 list format (one 1-D tensor/list of placeholder starts per sample)."""
    if len(media_offset) != batch_size:
        raise ValueError(f"media_offset list has {len(media_offset)} entries for a batch of {batch_size}.")
    starts, index, used = [], [], 0
    for b, entry in enumerate(media_offset):
        s = torch.as_tensor([] if entry is None else entry, dtype=torch.long).flatten().cpu()
        if (s < 0).any() or (s[1:] < s[:-1]).any():
            raise ValueError(
                f"media_offset[{b}] must hold non-negative, non-decreasing starts; got {s.tolist()}."
            )
        starts.append(s)
        index.append(torch.arange(used, used + s.numel(), dtype=torch.long))
        used += s.numel()
    if used != num_images:
        raise ValueError(
            f"media_offset lists {used} image placeholders but pixel_values holds {num_images} images."
        )
    return starts, index


def resolve_media(
    media_offset, num_images: int, batch_size: int, attention_mask: torch.Tensor | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Either official format → (per-sample starts, per-sample rows of pixel_values)."""
    if media_offset is None:
        if num_images:
            raise ValueError(
                f"pixel_values holds {num_images} images but no media_offset says where they go."
            )
        empty = [torch.zeros(0, dtype=torch.long) for _ in range(batch_size)]
        return empty, list(empty)
    if isinstance(media_offset, torch.Tensor) and media_offset.dim() == 3:
        if media_offset.shape[0] != batch_size:
            raise ValueError(f"media_offset has batch {media_offset.shape[0]}, input_ids has {batch_size}.")
        return starts_from_dense(media_offset, num_images, attention_mask)
    if isinstance(media_offset, (list, tuple)):
        return starts_from_list(media_offset, num_images, batch_size)
    raise ValueError(
        "media_offset must be a dense [B, L, 2] tensor (240728 format) or a list of per-sample start "
        f"tensors (241101 format); got {type(media_offset).__name__} "
        f"{tuple(media_offset.shape) if isinstance(media_offset, torch.Tensor) else ''}."
    )


def pad_per_sample(
    features: torch.Tensor, starts: list[torch.Tensor], index: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-global image features [N_img, T, H] → ``image_embeds`` [B, N, T, H], ``image_starts`` [B, N]."""
    batch = len(starts)
    n_max = max((s.numel() for s in starts), default=0)
    _, tokens, hidden = features.shape
    embeds = features.new_zeros(batch, n_max, tokens, hidden)
    padded = torch.full((batch, n_max), -1, dtype=torch.long, device=features.device)
    for b in range(batch):
        n = starts[b].numel()
        if n:
            embeds[b, :n] = features[index[b].to(features.device)]
            padded[b, :n] = starts[b].to(features.device)
    return embeds, padded


def owl3_layout(
    batch: int,
    length: int,
    past: int,
    attention_mask: torch.Tensor | None,
    image_starts: torch.Tensor | None,
    input_ids: torch.Tensor | None,
    device: torch.device,
) -> SequenceLayout:
    """The :class:`SequenceLayout` of ``length`` new positions after ``past`` cached ones.

    ``image_starts`` [B, N] (-1 = no image) marks each ``<|image|>`` placeholder row; padding comes
    from ``attention_mask`` [B, past + length]. Images are not rows of an Owl3 sequence, so
    ``image_index`` [B, length] names the image a placeholder row stands for (-1 elsewhere).
    """
    device = device if input_ids is None else input_ids.device
    kind = torch.full(
        (batch, length), TOKEN_GENERATED if past > 0 else TOKEN_TEXT, dtype=torch.long, device=device
    )
    image_index = torch.full((batch, length), -1, dtype=torch.long, device=device)
    counts = []
    for b in range(batch):
        s = (
            image_starts[b][image_starts[b] >= 0]
            if image_starts is not None
            else torch.zeros(0, dtype=torch.long)
        )
        counts.append(int(s.numel()))
        for n, pos in enumerate(s.tolist()):
            if past <= pos < past + length:
                kind[b, pos - past] = TOKEN_PLACEHOLDER
                image_index[b, pos - past] = n
    if attention_mask is not None:
        kind = torch.where(attention_mask[:, past:].to(device) == 0, TOKEN_PAD, kind)
    return SequenceLayout(
        past_length=past,
        token_kind=kind,
        image_index=image_index,
        attention_mask=attention_mask,
        images_per_sample=counts,
    )
