"""The logsumexp path of ``grouped_mass`` (scores of the small groups only, big group = 1 - rest)
against a materialised float64 softmax and against the full-softmax path it replaces."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hooks.attention as ha
from hooks.attention import grouped_mass
from owl_lab.models.attention import Allowed


def lse_of(q, k, scale, allow):
    """[B, H, Lq] log of the masked softmax normaliser (what the SDPA kernel hands out)."""
    rep = q.shape[1] // k.shape[1]
    s = (q @ k.repeat_interleave(rep, dim=1).transpose(-1, -2)) * scale
    a = allow if allow.dim() == 4 else allow[:, None]
    return torch.logsumexp(s.masked_fill(~a, float("-inf")), -1)


def reference(q, k, scale, allow, group, G):
    rep = q.shape[1] // k.shape[1]
    s = (q.double() @ k.double().repeat_interleave(rep, dim=1).transpose(-1, -2)) * scale
    a = allow if allow.dim() == 4 else allow[:, None]
    p = torch.softmax(s.masked_fill(~a, float("-inf")), -1).nan_to_num(0.0)
    onehot = torch.nn.functional.one_hot(group.clamp(min=0), G).double() * (group >= 0).unsqueeze(-1)
    return p @ onehot[:, None]


@st.composite
def case(draw):
    B, Hkv = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    H = Hkv * draw(st.integers(1, 3))
    Lq, Lk = draw(st.integers(1, 10)), draw(st.integers(1, 40))
    G = draw(st.integers(1, 4))
    mask = draw(st.sampled_from(["causal", "all", "random", "none_rows", "per_head", "no_big"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return (
        B,
        H,
        Hkv,
        Lq,
        Lk,
        G,
        mask,
        dtype,
        draw(st.integers(0, 2**31 - 1)),
        draw(st.sampled_from([1, None])),
    )


def build(c):
    B, H, Hkv, Lq, Lk, G, mask, dtype, seed, chunk = c
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, 8, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, Lk, 8, generator=g, dtype=dtype)
    # a big group (most keys, like text) plus a few small ones and some keys in no group
    group = torch.zeros(B, Lk, dtype=torch.long)
    small = torch.rand(B, Lk, generator=g) < 0.3
    group[small] = torch.randint(1, G + 1, (int(small.sum()),), generator=g) % G
    group[torch.rand(B, Lk, generator=g) < 0.1] = -1
    past = max(0, Lk - Lq)
    causal = (torch.arange(Lk)[None] <= torch.arange(Lq)[:, None] + past).expand(B, Lq, Lk)
    fast = None
    if mask == "causal":
        allow, fast = causal.clone(), "causal" if Lk >= Lq else None
    elif mask == "all":
        allow, fast = torch.ones(B, Lq, Lk, dtype=torch.bool), "all"
    elif mask == "random":
        allow = torch.rand(B, Lq, Lk, generator=g) < 0.6
    elif mask == "none_rows":
        allow = causal.clone()
        allow[:, : Lq // 2] = False  # rows without keys
    elif mask == "per_head":
        allow = torch.rand(B, H, Lq, Lk, generator=g) < 0.5
    else:  # the big group knocked out for some rows: its mass must be an exact 0 there
        allow = causal & (group[:, None] != 0)
        allow[:, ::2] = causal[:, ::2]
    allowed = Allowed((B, Lq, Lk), fast=fast) if fast else (lambda a, b: allow[..., a:b, :])
    return q, k, allow, allowed, group, G, chunk


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case())
def test_logsumexp_path_equals_materialised_softmax_and_the_full_path(c):
    q, k, allow, allowed, group, G, chunk = build(c)
    lse = lse_of(q, k, 0.4, allow)
    fast = grouped_mass(q, k, 0.4, allowed, group, G, logsumexp=lse, chunk_bytes=chunk)
    full = grouped_mass(q, k, 0.4, allowed, group, G, logsumexp=lse, chunk_bytes=chunk, use_logsumexp=False)
    tol = 1e-6 if q.dtype == torch.float32 else 1e-12
    torch.testing.assert_close(fast.mass.double(), reference(q, k, 0.4, allow, group, G), rtol=0, atol=tol)
    torch.testing.assert_close(fast.mass, full.mass.nan_to_num(0.0), rtol=0, atol=tol)
    assert torch.equal(fast.has_keys, full.has_keys) and torch.equal(fast.seen, full.seen)
    # exact zeros where a row may see no key of a group (e.g. a knocked-out group), as on the full path
    a = allow if allow.dim() == 4 else allow[:, None].expand(-1, q.shape[1], -1, -1)
    for gi in range(G):
        none = ~(a & (group == gi)[:, None, None]).any(-1)  # [B, H, Lq]
        assert float(fast.mass[..., gi][none].abs().sum()) == 0.0


def test_logsumexp_path_is_taken_only_with_a_dominant_group(monkeypatch):
    """64 equal image groups (Owl3 cross): the full softmax path; a dominant text group: the logsumexp
    path (its matmul sees only the explicit keys)."""
    calls = []
    monkeypatch.setattr(ha, "_lse_chunk", lambda *a, **kw: calls.append(1))
    q, k = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 64, 4)
    allowed = Allowed((1, 8, 64), fast="all")
    lse = lse_of(q, k, 0.5, torch.ones(1, 8, 64, dtype=torch.bool))
    grouped_mass(q, k, 0.5, allowed, torch.arange(64)[None] // 4, 16, logsumexp=lse)
    assert not calls
    grouped_mass(q, k, 0.5, allowed, (torch.arange(64)[None] < 4).long(), 2, logsumexp=lse)
    assert calls


def test_logsumexp_shape_is_checked():
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="logsumexp"):
        grouped_mass(
            q,
            k,
            1.0,
            Allowed((1, 3, 5), fast="all"),
            torch.zeros(1, 5, dtype=torch.long),
            1,
            logsumexp=torch.zeros(1, 3),
        )
