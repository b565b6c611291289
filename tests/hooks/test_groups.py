"""Key → group assignment from SequenceLayout histories (both levels partition the keys)."""

from __future__ import annotations

import pytest
import torch

from hooks.groups import SequenceHistory, coarsen_to_modality, key_groups, token_groups
from owl_lab.models.observe import TOKEN_GENERATED as GEN
from owl_lab.models.observe import TOKEN_IMAGE as IMG
from owl_lab.models.observe import TOKEN_PAD as PAD
from owl_lab.models.observe import TOKEN_PLACEHOLDER as PH
from owl_lab.models.observe import TOKEN_TEXT as TXT
from owl_lab.models.observe import SequenceLayout


def layout(kind, image, past=0, mask=None, images=(1,)):
    kind, image = torch.tensor(kind), torch.tensor(image)
    return SequenceLayout(
        past_length=past,
        token_kind=kind,
        image_index=image,
        attention_mask=None if mask is None else torch.tensor(mask),
        images_per_sample=list(images),
    )


def names_of(group, n_images, level):
    """Group names of every key at one level (token ids from key_groups; modality by coarsening)."""
    tok = token_groups(n_images)
    coarse = coarsen_to_modality(n_images)
    assert torch.equal(coarse.sum(1), torch.ones(len(tok)))  # every token group has one modality
    modality = ["visual", "text", "pad"]
    if level == "token":
        return [[tok[g] if g >= 0 else None for g in row] for row in group.tolist()]
    return [[modality[int(coarse[g].argmax())] if g >= 0 else None for g in row] for row in group.tolist()]


def test_owl2_like_prefill_and_decode():
    h = SequenceHistory()
    # sample 0: bos, text, 2 image rows (image 0), text ; sample 1: bos, 2 image rows, text, pad
    h.update(
        layout(
            [[TXT, TXT, IMG, IMG, TXT], [TXT, IMG, IMG, TXT, PAD]],
            [[-1, -1, 0, 0, -1], [-1, 0, 0, -1, -1]],
            mask=[[1] * 5, [1, 1, 1, 1, 0]],
            images=(1, 1),
        )
    )
    h.update(layout([[GEN], [GEN]], [[-1], [-1]], past=5, mask=[[1] * 6, [1, 1, 1, 1, 0, 1]], images=(1, 1)))
    assert h.kind.shape == (2, 6)
    kp = torch.arange(6).expand(2, 6)
    member = key_groups(h, kp, torch.full((2, 6), -1), n_images=1)
    assert names_of(member, 1, "modality") == [
        ["text", "text", "visual", "visual", "text", "text"],
        ["text", "visual", "visual", "text", "pad", "text"],
    ]
    assert names_of(member, 1, "token") == [
        ["bos", "question", "image:0", "image:0", "question", "generated"],
        ["bos", "image:0", "image:0", "question", "pad", "generated"],
    ]
    assert h.valid_queries(torch.tensor([4, 5])).tolist() == [[True, True], [False, True]]


def test_owl3_like_image_keys_and_placeholders():
    h = SequenceHistory()
    h.update(layout([[TXT, TXT, PH, TXT, PH, TXT]], [[-1, -1, 0, -1, 1, -1]], images=(2,)))
    # cross keys: 2 images × 2 tokens, plus one padded slot
    kp = torch.tensor([[-1, -1, -1, -1, -1]])
    ki = torch.tensor([[0, 0, 1, 1, -1]])
    member = key_groups(h, kp, ki, n_images=2)
    assert names_of(member, 2, "token") == [["image:0", "image:0", "image:1", "image:1", None]]
    assert names_of(member, 2, "modality") == [["visual"] * 4 + [None]]
    seq = key_groups(h, torch.arange(6)[None], torch.full((1, 6), -1), n_images=2)
    assert names_of(seq, 2, "modality") == [["text"] * 6]
    assert names_of(seq, 2, "token") == [
        ["bos", "question", "placeholder", "question", "placeholder", "question"]
    ]


def test_left_padding_bos_is_first_real_token():
    h = SequenceHistory()
    h.update(layout([[PAD, PAD, TXT, TXT]], [[-1] * 4], mask=[[0, 0, 1, 1]]))
    member = key_groups(h, torch.arange(4)[None], torch.full((1, 4), -1), 0)
    assert names_of(member, 0, "token") == [["pad", "pad", "bos", "question"]]


def test_bad_inputs_are_clear_errors():
    h = SequenceHistory()
    with pytest.raises(ValueError, match="before any SequenceLayout"):
        key_groups(h, torch.zeros(1, 1, dtype=torch.long), torch.full((1, 1), -1), 0)
    h.update(layout([[TXT, 7]], [[-1, -1]]))
    with pytest.raises(ValueError, match="unknown token_kind"):
        key_groups(h, torch.arange(2)[None], torch.full((1, 2), -1), 0)
    with pytest.raises(ValueError, match="beyond"):
        key_groups(h, torch.tensor([[5]]), torch.tensor([[-1]]), 0)
    with pytest.raises(ValueError, match="past_length"):
        h.update(layout([[TXT]], [[-1]], past=9))
    with pytest.raises(ValueError, match="attention_mask"):
        h.update(layout([[TXT]], [[-1]], past=2, mask=[[1, 1]]))
