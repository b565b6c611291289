"""The loss of one training batch computed as a few shorter sub-batches (a pure speed-up).

Batches are right-padded to their longest row, so the text-only examples of a mixed batch (≈13 tokens)
pay for the image rows' length (≈80 tokens on the first, 64-patch llava-tiny, whose patch tokens sit in the
decoder's sequence): 14–21 % of a language step's tokens were padding that way. Grouping the rows by modality
and running each group as its own forward pass gives the same loss and gradient as the whole batch
(the loss is a mean over label tokens, so each group's mean is weighted by its share of the label
tokens), on fewer tokens. Opt-in per stage (``"sub_batches": "modality"``), so recipes that do not set
it train bit-for-bit as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

SUB_BATCH_MODES = ("none", "modality")


def modality_groups(examples: Sequence) -> list[list[int]]:
    """Indices of the examples with images and of those without (empty groups dropped), in order."""
    with_images = [i for i, e in enumerate(examples) if e.images]
    text_only = [i for i, e in enumerate(examples) if not e.images]
    return [g for g in (with_images, text_only) if g]


def batch_loss(model, collate_fn: Callable, examples: Sequence, mode: str = "none") -> torch.Tensor:
    """Token-mean loss of ``examples`` (a scalar tensor with its autograd graph).

    ``mode="none"``: one forward pass over the whole padded batch. ``"modality"``: one pass per
    group of :func:`modality_groups`, each group's mean loss weighted by its label-token count /
    the batch's, which equals the whole batch's token mean (up to float rounding).
    ``collate_fn(examples)`` → the model's keyword arguments, with ``labels`` (-100 = no loss).
    """
    if mode not in SUB_BATCH_MODES:
        raise ValueError(f"sub_batches must be one of {SUB_BATCH_MODES}, got {mode!r}")
    groups = modality_groups(examples) if mode == "modality" else [list(range(len(examples)))]
    if len(groups) == 1:
        return model(**collate_fn(examples)).loss
    batches = [collate_fn([examples[i] for i in g]) for g in groups]
    counts = [int((b["labels"] != -100).sum()) for b in batches]
    total = sum(counts)
    if total == 0:
        raise ValueError("a training batch has no label tokens")
    loss = None
    for b, n in zip(batches, counts, strict=True):
        if n == 0:
            continue
        part = model(**b).loss * (n / total)
        loss = part if loss is None else loss + part
    return loss
