"""Sub-batched losses (owl_lab/sub_batches.py): the same loss and gradient as the whole batch."""

from __future__ import annotations

import pytest
import torch

from owl_lab.evaluate import collate
from owl_lab.sub_batches import batch_loss, modality_groups
from owl_lab.synth.data import Mixture
from owl_lab.train import build, load_recipe

MIX = {"color": 1, "caption": 1, "dense_shape": 1, "add": 1, "parity": 1}


def _examples(n: int = 12):
    return [Mixture(MIX, seed="sub-batches", render_size=112).example(i) for i in range(n)]


def _loss_and_grad(model, processor, examples, mode):
    model.zero_grad(set_to_none=True)
    loss = batch_loss(model, lambda ex: collate(processor, ex), examples, mode)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return loss.detach(), grads


@pytest.mark.parametrize("name", ["smoke-owl2", "llava-tiny"])
def test_modality_sub_batches_give_the_whole_batch_loss_and_gradient(name):
    torch.manual_seed(0)
    model, processor = build(load_recipe(name))
    model.train()
    examples = _examples()
    assert len(modality_groups(examples)) == 2, "the test mix must hold image and text-only examples"
    whole, g_whole = _loss_and_grad(model, processor, examples, "none")
    split, g_split = _loss_and_grad(model, processor, examples, "modality")
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_split, g_whole, rtol=1e-4, atol=1e-6 * float(g_whole.abs().max()))


def test_modality_groups_keep_order_and_drop_empty_groups():
    examples = _examples()
    groups = modality_groups(examples)
    assert sorted(i for g in groups for i in g) == list(range(len(examples)))
    assert all(examples[i].images for i in groups[0]) and not any(examples[i].images for i in groups[1])
    text_only = [examples[i] for i in groups[1]]
    assert modality_groups(text_only) == [list(range(len(text_only)))]


def test_unknown_sub_batch_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="sub_batches must be one of"):
        batch_loss(None, None, _examples(2), "length")
