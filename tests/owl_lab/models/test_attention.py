"""The attention core (owl_lab/models/attention.py) on its own: masks, kernels, edit semantics."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from owl_lab.models.attention import (
    ATTN_IMPLEMENTATIONS,
    Allowed,
    attention,
    check_attn_implementation,
    eager_attention_forward,
    sdpa_attention_forward,
)
from owl_lab.models.observe import HookPoint


class Toy(nn.Module):
    """The minimum an attention module needs to call the core."""

    def __init__(self, impl: str = "sdpa"):
        super().__init__()
        self.config = SimpleNamespace(_attn_implementation=impl)
        self.layer_idx = 3
        self.attention_edit = None
        self.hook_attn = HookPoint()


def qkv(B=2, H=4, Hkv=2, Lq=6, Lk=6, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64),
        torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64),
        torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64),
    )


def describe(B, Lq, Lk):
    return lambda: dict(
        query_index=torch.arange(Lk - Lq, Lk),
        key_position=torch.arange(Lk).expand(B, -1),
        key_image=torch.full((B, Lk), -1),
    )


def test_fast_causal_rows_are_the_causal_mask():
    mask = Allowed((2, 3, 5), fast="causal")
    want = torch.ones(3, 5, dtype=torch.bool).tril(2)
    assert torch.equal(mask.tensor(), want.expand(2, -1, -1))
    assert torch.equal(mask(1, 3), want[1:3].expand(2, -1, -1))
    assert torch.equal(Allowed((2, 3, 5), fast="all")(0, 2), torch.ones(2, 2, 5, dtype=torch.bool))


@pytest.mark.parametrize("fast", ["causal", "all", None])
def test_eager_and_sdpa_kernels_agree(fast):
    q, k, v = qkv(Lq=6, Lk=6)
    if fast is None:
        dense = torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(1)) > 0.4
        dense[..., 0] = True
        mask = Allowed.from_tensor(dense)
    else:
        mask = Allowed((2, 6, 6), fast=fast)
    a, probs = eager_attention_forward(None, q, k, v, mask, 0.3)
    b, none = sdpa_attention_forward(None, q, k, v, mask, 0.3)
    assert none is None and (a - b).abs().max() < 1e-12
    blocked = ~mask.tensor()[:, None].expand_as(probs)
    assert probs[blocked].abs().max() == 0 if blocked.any() else True


def test_unknown_implementation_is_a_clear_error():
    with pytest.raises(ValueError, match="supported: 'eager', 'sdpa'"):
        check_attn_implementation(SimpleNamespace(_attn_implementation="flash_attention_2"))
    assert check_attn_implementation(SimpleNamespace(_attn_implementation=None)) == "sdpa"
    assert ATTN_IMPLEMENTATIONS == ("eager", "sdpa")
    q, k, v = qkv()
    with pytest.raises(ValueError, match="flex_attention"):
        attention(
            Toy("flex_attention"), q, k, v, Allowed((2, 6, 6), fast="causal"), 0.3, "self", describe(2, 6, 6)
        )


@pytest.mark.parametrize("impl", ATTN_IMPLEMENTATIONS)
def test_no_edit_and_all_true_edit_are_bitwise_no_ops(impl):
    q, k, v = qkv()
    mod = Toy(impl)
    mask = Allowed((2, 6, 6), fast="causal")
    plain, _, used = attention(mod, q, k, v, mask, 0.3, "self", describe(2, 6, 6))
    assert used is mask
    for edit in (lambda ev: None, lambda ev: torch.ones(1, 1, 1, dtype=torch.bool)):
        mod.attention_edit = edit
        out, _, used = attention(mod, q, k, v, mask, 0.3, "self", describe(2, 6, 6))
        assert used is mask and torch.equal(out, plain)


@pytest.mark.parametrize("per_head", [False, True])
def test_edit_reaches_kernel_and_event_and_eager_equals_sdpa(per_head):
    q, k, v = qkv()
    B, H, Lq, Lk = 2, 4, 6, 6
    keep = torch.ones(B, H, Lq, Lk, dtype=torch.bool) if per_head else torch.ones(B, Lq, Lk, dtype=torch.bool)
    keep[..., 4:, 1:3] = False  # queries 4, 5 may not see keys 1, 2
    if per_head:
        keep[:, 0] = True  # head 0 untouched
    seen = {}
    outs = {}
    for impl in ATTN_IMPLEMENTATIONS:
        mod = Toy(impl)
        mod.attention_edit = lambda ev: (seen.setdefault("base", ev.allowed), keep)[1]
        events = []
        mod.hook_attn.register_forward_hook(lambda m, a, o, events=events: events.append(a[0]))
        out, _, used = attention(
            mod,
            q,
            k,
            v,
            Allowed((B, Lq, Lk), fast="causal"),
            0.3,
            "self",
            describe(B, Lq, Lk),
            output_attentions=impl == "eager",
        )
        outs[impl] = out
        assert events[0].allowed is used and used.per_head == per_head
        if impl == "eager":
            probs = events[0].probs  # the softmax actually used: knocked-out mass is 0
            assert probs[..., 4:, 1:3][:, 1:].abs().max() == 0
            assert probs[..., 4:, 1:3][:, 0].abs().min() > 0 if per_head else True
    assert seen["base"].fast == "causal"
    assert (outs["eager"] - outs["sdpa"]).abs().max() < 1e-12


def test_emptied_rows_keep_own_key_for_self_and_dummy_for_cross():
    q, k, v = qkv(Hkv=4)
    mod = Toy("eager")
    mod.attention_edit = lambda ev: torch.zeros(2, 6, 6, dtype=torch.bool)  # block everything
    out, probs, used = attention(
        mod,
        q,
        k,
        v,
        Allowed((2, 6, 6), fast="causal"),
        0.3,
        "self",
        describe(2, 6, 6),
        output_attentions=True,
    )
    assert torch.equal(used.tensor(), torch.eye(6, dtype=torch.bool).expand(2, -1, -1))
    torch.testing.assert_close(out, v, rtol=0, atol=1e-12)  # each token sees only itself
    out, probs, used = attention(
        mod, q, k, v, Allowed((2, 6, 6), fast="all"), 0.3, "cross", describe(2, 6, 6), output_attentions=True
    )
    assert not used.tensor().any() and not torch.isnan(out).any() and probs.abs().max() == 0
