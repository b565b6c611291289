"""While observed, the attention core's SDPA call also hands out the softmax's logsumexp — through the
op SDPA itself dispatches to on CPU, so the output must stay bitwise equal to an unobserved call."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from owl_lab.models.attention import Allowed, attention, sdpa_with_logsumexp
from owl_lab.models.observe import HookPoint


class Toy(nn.Module):
    """The minimum an attention module needs to call the core."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(_attn_implementation="sdpa")
        self.layer_idx = 0
        self.attention_edit = None
        self.hook_attn = HookPoint()


def describe(B, Lq, Lk):
    return lambda: dict(
        query_index=torch.arange(Lk - Lq, Lk),
        key_position=torch.arange(Lk).expand(B, -1),
        key_image=torch.full((B, Lk), -1),
    )


def masks(B, Lq, Lk, dtype, g):
    bool_mask = torch.rand(B, 1, Lq, Lk, generator=g) < 0.7
    bool_mask[..., 0] = True
    additive = torch.where(bool_mask, torch.zeros((), dtype=dtype), torch.finfo(dtype).min)
    per_head = torch.rand(B, 4, Lq, Lk, generator=g) < 0.7
    per_head[..., 0] = True
    return {"causal": None, "none": None, "bool": bool_mask, "additive": additive, "per_head": per_head}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("Hkv", [4, 2])
@pytest.mark.parametrize("kind", ["causal", "none", "bool", "additive", "per_head"])
def test_sdpa_with_logsumexp_is_bitwise_sdpa(dtype, Hkv, kind):
    g = torch.Generator().manual_seed(0)
    B, H, L, D = 2, 4, 70, 16
    q = torch.randn(B, H, L, D, generator=g).to(dtype)
    k, v = (torch.randn(B, Hkv, L, D, generator=g).to(dtype) for _ in range(2))
    mask = masks(B, L, L, dtype, g)[kind]
    args = dict(attn_mask=mask, is_causal=kind == "causal", scale=0.3, enable_gqa=Hkv != H)
    with torch.no_grad():
        want = F.scaled_dot_product_attention(q, k, v, **args)
        out, lse = sdpa_with_logsumexp(q, k, v, **args)
    assert torch.equal(out, want)
    assert lse is not None and lse.shape == (B, H, L)
    s = (q.double() @ k.double().repeat_interleave(H // Hkv, 1).transpose(-1, -2)) * 0.3
    if kind == "causal":
        s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    elif mask is not None:
        s = s + mask.double() if mask.dtype != torch.bool else s.masked_fill(~mask, float("-inf"))
    tol = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=0, atol=tol)


def test_no_logsumexp_under_autograd():
    q, k, v = (torch.randn(1, 2, 5, 8, requires_grad=True) for _ in range(3))
    out, lse = sdpa_with_logsumexp(q, k, v, is_causal=True)
    assert lse is None and torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


@pytest.mark.parametrize("edit", [None, "rows"])
def test_observed_attention_is_bitwise_unobserved_and_carries_the_logsumexp(edit):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 12, 8, generator=g)
    k, v = torch.randn(2, 2, 12, 8, generator=g), torch.randn(2, 2, 12, 8, generator=g)
    mod = Toy()
    if edit == "rows":  # a knockout of the last query's first keys: the row-split kernel path
        keep = torch.ones(2, 12, 12, dtype=torch.bool)
        keep[:, -1, :3] = False
        mod.attention_edit = lambda ev: keep
    mask = Allowed((2, 12, 12), fast="causal")
    with torch.no_grad():
        plain, _, _ = attention(mod, q, k, v, mask, 0.3, "self", describe(2, 12, 12))
        events = []
        handle = mod.hook_attn.register_forward_hook(lambda m, a, o: events.append(a[0]))
        try:
            seen, _, used = attention(mod, q, k, v, mask, 0.3, "self", describe(2, 12, 12))
        finally:
            handle.remove()
    assert torch.equal(seen, plain)
    (event,) = events
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.3
    s = s.masked_fill(~used.tensor()[:, None], float("-inf"))
    torch.testing.assert_close(event.logsumexp, torch.logsumexp(s, -1), rtol=0, atol=1e-5)
