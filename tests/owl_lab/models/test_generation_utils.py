"""Shared generation plumbing (owl_lab/models/generation_utils.py)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers.cache_utils import DynamicCache

from owl_lab.models.generation_utils import left_align, prepare_cache, restore_prompt


def test_left_align_moves_pads_first_and_keeps_token_order():
    ids = torch.tensor([[5, 6, 7, 0], [8, 0, 0, 0], [0, 9, 4, 3]])
    mask = (ids != 0).long()
    new_ids, new_mask, order = left_align(ids, mask)
    assert new_ids.tolist() == [[0, 5, 6, 7], [0, 0, 0, 8], [0, 9, 4, 3]]
    assert new_mask.tolist() == (new_ids != 0).long().tolist()
    assert torch.equal(ids.gather(1, order), new_ids)


def test_left_align_is_a_no_op_without_padding_or_with_left_padding():
    ids = torch.tensor([[0, 5, 6], [1, 2, 3]])
    for mask in (None, torch.ones_like(ids), (ids != 0).long()):
        out_ids, out_mask, order = left_align(ids, mask)
        assert out_ids is ids and out_mask is mask and order is None


def test_restore_prompt_repeats_rows_for_several_return_sequences():
    prompt = torch.tensor([[5, 6, 0], [7, 0, 0]])
    generated = torch.tensor([[0, 5, 6, 1], [0, 5, 6, 2], [0, 0, 7, 3], [0, 0, 7, 4]])
    out = restore_prompt(SimpleNamespace(sequences=generated.clone()), prompt)
    assert out.sequences.tolist() == [[5, 6, 0, 1], [5, 6, 0, 2], [7, 0, 0, 3], [7, 0, 0, 4]]


def test_prepare_cache_makes_one_only_when_needed():
    config = SimpleNamespace(use_cache=True)

    class Made(DynamicCache):
        def __init__(self, config):
            super().__init__()

    cache, use = prepare_cache(config, None, cache_class=Made)
    assert use and isinstance(cache, Made)
    given = DynamicCache()
    assert prepare_cache(config, None, cache=given)[0] is given
    assert prepare_cache(config, False) == (None, False)
