"""The logsumexp paths of ``grouped_mass`` against a materialised float64 softmax and against the
full-softmax path they replace: the dominant-group path (scores of the small groups only, big group =
1 - rest) and the tiled path (every key, exp against the logsumexp, each row divided by its total)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hooks.attention as ha
import hooks.attention_lse as hl
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


def spy(monkeypatch, module, name):
    """Count the calls of ``module.name`` (still running it)."""
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    return calls


def test_each_logsumexp_path_is_taken_for_its_kind_of_groups(monkeypatch):
    """64 equal image groups (Owl3 cross): the tiled path; a dominant text group: the dominant-group path
    (its matmul sees only the explicit keys); no logsumexp: the full softmax."""
    dominant = spy(monkeypatch, hl, "lse_chunk")  # lse_fast's calls
    dominant_rows = spy(monkeypatch, ha, "lse_chunk")  # grouped_mass's own calls (mask tensors)
    tiles = spy(monkeypatch, ha, "lse_tiles")
    q, k = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 64, 4)
    allowed = Allowed((1, 8, 64), fast="all")
    lse = lse_of(q, k, 0.5, torch.ones(1, 8, 64, dtype=torch.bool))
    grouped_mass(q, k, 0.5, allowed, torch.arange(64)[None] // 4, 16, logsumexp=lse)
    assert tiles and not dominant and not dominant_rows
    tiles.clear()
    grouped_mass(q, k, 0.5, allowed, (torch.arange(64)[None] < 4).long(), 2, logsumexp=lse)
    assert dominant and not tiles
    grouped_mass(
        q, k, 0.5, lambda a, b: torch.ones(1, b - a, 64, dtype=torch.bool), torch.arange(64)[None] // 4, 16
    )
    assert not tiles


@st.composite
def equal_groups_case(draw):
    """Keys in groups of equal size (Owl3's images) or scattered at random, no group holding most keys."""
    B, Hkv = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    H = Hkv * draw(st.integers(1, 3))
    G, T = draw(st.integers(3, 6)), draw(st.integers(1, 7))  # 3+ equal groups: none holds half the keys
    layout = draw(st.sampled_from(["in_order", "padded", "random"]))
    mask = draw(st.sampled_from(["image_causal", "random", "none_rows", "per_head", "all"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    tile = draw(st.sampled_from([1, 3, 1 << 20]))  # tile widths from one key up (exercises tile edges)
    big = draw(st.booleans())  # large logits
    return B, H, Hkv, G, T, layout, mask, dtype, tile, big, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(equal_groups_case())
def test_tiled_logsumexp_path_equals_materialised_softmax(c):
    B, H, Hkv, G, T, layout, mask, dtype, tile, big, seed = c
    g = torch.Generator().manual_seed(seed)
    Lk, Lq = G * T, int(torch.randint(1, 12, (1,), generator=g))
    q = torch.randn(B, H, Lq, 8, generator=g, dtype=dtype) * (6.0 if big else 1.0)
    k = torch.randn(B, Hkv, Lk, 8, generator=g, dtype=dtype)
    group = (torch.arange(Lk) // T)[None].repeat(B, 1)  # image n = keys nT..nT+T-1
    if layout == "padded":  # the last image slot of sample 0 is padding: keys in no group, never seen
        group[0, (G - 1) * T :] = -1
    elif layout == "random":
        group = torch.randint(-1, G, (B, Lk), generator=g)
    image_causal = (torch.arange(Lq)[:, None] >= torch.arange(Lk)[None] // T).expand(B, Lq, Lk)
    if mask == "image_causal":  # query t sees image n iff n <= t (Owl3 cross, in image units)
        allow = image_causal.clone()
    elif mask == "random":
        allow = torch.rand(B, Lq, Lk, generator=g) < 0.6
    elif mask == "none_rows":
        allow = image_causal.clone()
        allow[:, : Lq // 2] = False
    elif mask == "per_head":
        allow = torch.rand(B, H, Lq, Lk, generator=g) < 0.5
    else:
        allow = torch.ones(B, Lq, Lk, dtype=torch.bool)
    if layout == "padded":
        allow = allow & (group >= 0)[:, None, None] if allow.dim() == 4 else allow & (group >= 0)[:, None]
    lse = lse_of(q, k, 0.4, allow)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(hl, "_TILE_BYTES", tile)
        m.setattr(hl, "_MIN_TILE_KEYS", 1)
        tiles = spy(m, ha, "lse_tiles")
        fast = grouped_mass(
            q, k, 0.4, lambda a, b: allow[..., a:b, :], group, G, logsumexp=lse, chunk_bytes=64
        )
    full = grouped_mass(q, k, 0.4, lambda a, b: allow[..., a:b, :], group, G, use_logsumexp=False)
    grouped = group[group >= 0]
    big = int(torch.bincount(grouped).argmax()) if grouped.numel() else -1
    if int((group != big).any(0).sum()) > Lk * ha._LSE_MAX_EXPLICIT:  # no dominant group
        assert tiles, "the tiled path was not taken"
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(fast.mass.double(), reference(q, k, 0.4, allow, group, G), rtol=0, atol=tol)
    torch.testing.assert_close(fast.mass, full.mass, rtol=0, atol=tol)
    assert torch.equal(fast.has_keys, full.has_keys) and torch.equal(fast.seen, full.seen)
    a = allow if allow.dim() == 4 else allow[:, None].expand(-1, H, -1, -1)
    for gi in range(G):  # exact zeros where a row sees no key of a group
        none = ~(a & (group == gi)[:, None, None]).any(-1)
        assert float(fast.mass[..., gi][none].abs().sum()) == 0.0


def test_tiled_path_ignores_a_wrong_logsumexp_shift():
    """The tiled path divides each row by its own total: a logsumexp that is off by a constant (e.g. a
    kernel's rounding) does not change the masses beyond rounding."""
    q, k = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 32, 4)
    allow = torch.ones(1, 6, 32, dtype=torch.bool)
    group = torch.arange(32)[None] // 8
    lse = lse_of(q, k, 0.5, allow)
    exact = grouped_mass(q, k, 0.5, lambda a, b: allow[:, a:b], group, 4, logsumexp=lse).mass
    shifted = grouped_mass(q, k, 0.5, lambda a, b: allow[:, a:b], group, 4, logsumexp=lse + 3.0).mass
    torch.testing.assert_close(shifted, exact, rtol=0, atol=1e-6)
    torch.testing.assert_close(exact.double(), reference(q, k, 0.5, allow, group, 4), rtol=0, atol=1e-6)


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
