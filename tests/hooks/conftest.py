"""A toy decoder that speaks the observation contract (no dependency on the real Owl models).

``ToyOwl`` mimics Owl2's bookkeeping: image rows inside the sequence, padding, a KV cache for
decode steps, SDPA attention, and an abstractor-style event. It lets the capture machinery be
tested in isolation; the real models are tested against the goldens in test_owl2.py/test_owl3.py.
"""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from owl_lab.models.observe import (
    TOKEN_GENERATED,
    TOKEN_IMAGE,
    TOKEN_PAD,
    TOKEN_TEXT,
    AttentionEvent,
    HookPoint,
    SequenceLayout,
)


class ToyAttention(nn.Module):
    def __init__(self, layer, hidden, heads, kv_heads):
        super().__init__()
        self.layer, self.h, self.hkv, self.d = layer, heads, kv_heads, hidden // heads
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * kv_heads * self.d)
        self.o = nn.Linear(hidden, hidden, bias=False)
        self.hook_attn = HookPoint()

    def forward(self, x, cache, key_valid, past):
        B, L, _ = x.shape
        q = self.q(x).view(B, L, self.h, self.d).transpose(1, 2)  # [B, H, L, D]
        k, v = self.kv(x).view(B, L, self.hkv, 2, self.d).permute(3, 0, 2, 1, 4)  # [B, Hkv, L, D] each
        if cache.get(self.layer) is not None:
            pk, pv = cache[self.layer]
            k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        cache[self.layer] = (k, v)
        Lk = k.shape[2]
        qidx = torch.arange(past, past + L)

        def allowed(q0, q1):
            a = torch.arange(Lk)[None, :] <= qidx[q0:q1, None]  # causal over absolute positions
            return a[None].expand(B, -1, -1) & key_valid[:, None, :]

        rep = self.h // self.hkv
        out = nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=allowed(0, L)[:, None]
        )
        if self.hook_attn.active:
            self.hook_attn(
                AttentionEvent(
                    layer=self.layer,
                    kind="self",
                    query=q,
                    key=k,
                    scale=self.d**-0.5,
                    query_index=qidx,
                    key_position=torch.arange(Lk)[None].expand(B, Lk),
                    key_image=torch.full((B, Lk), -1),
                    allowed=allowed,
                )
            )
        return self.o(out.transpose(1, 2).reshape(B, L, -1))


class ToyAbstractorAttention(nn.Module):
    """Abstractor-like: Q queries attend [queries; CLS; grid×grid patches] (kind 'abstractor')."""

    def __init__(self, layer, dim=8, heads=2, queries=3, grid=2):
        super().__init__()
        self.layer, self.heads, self.queries, self.grid = layer, heads, queries, grid
        self.hook_attn = HookPoint()
        self.w = nn.Linear(dim, dim)

    def forward(self, patches):  # patches [N, 1 + grid², dim]
        N = patches.shape[0]
        d = self.w.out_features // self.heads
        keys_in = torch.cat([self.w.weight[: self.queries][None].expand(N, -1, -1), patches], 1)
        q = self.w(keys_in[:, : self.queries]).view(N, self.queries, self.heads, d).transpose(1, 2)
        k = self.w(keys_in).view(N, -1, self.heads, d).transpose(1, 2)
        Lk = k.shape[2]
        kimg = torch.cat([torch.full((self.queries,), -1), torch.tensor([-2]), torch.arange(self.grid**2)])
        if self.hook_attn.active:
            self.hook_attn(
                AttentionEvent(
                    layer=self.layer,
                    kind="abstractor",
                    query=q,
                    key=k,
                    scale=d**-0.5,
                    query_index=torch.arange(self.queries),
                    key_position=torch.full((N, Lk), -1),
                    key_image=kimg[None].expand(N, Lk),
                    allowed=lambda a, b: torch.ones(N, b - a, Lk, dtype=torch.bool),
                )
            )
        return q


class ToyOwl(nn.Module):
    """Tiny Owl2-like decoder. ``forward(ids, images_at, attention_mask, cache)`` → logits [B, L, V].

    ``images_at``: per sample, list of (start, rows) image spans inside the sequence.
    """

    def __init__(self, layers=2, hidden=16, heads=4, kv_heads=2, vocab=11):
        super().__init__()
        self.config = types.SimpleNamespace(model_type="mplug_owl2")
        self.hook_layout = HookPoint()
        self.embed = nn.Embedding(vocab, hidden)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList()
        for i in range(layers):
            block = nn.Module()
            block.self_attn = ToyAttention(i, hidden, heads, kv_heads)
            self.model.layers.append(block)
        self.model.visual_abstractor = nn.Module()
        self.model.visual_abstractor.encoder = nn.Module()
        self.model.visual_abstractor.encoder.layers = nn.ModuleList()
        for k in range(2):
            layer = nn.Module()
            layer.crossattention = nn.Module()
            layer.crossattention.attention = ToyAbstractorAttention(k)
            self.model.visual_abstractor.encoder.layers.append(layer)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids, images_at=None, attention_mask=None, cache=None, n_abstractor_images=0):
        cache = {} if cache is None else cache
        B, L = ids.shape
        past = cache["_len"] if "_len" in cache else 0
        full_mask = torch.ones(B, past + L, dtype=torch.long) if attention_mask is None else attention_mask
        kind = torch.full((B, L), TOKEN_GENERATED if past else TOKEN_TEXT)
        image = torch.full((B, L), -1)
        for b, spans in enumerate(images_at or []):
            for i, (s, n) in enumerate(spans):
                kind[b, s : s + n], image[b, s : s + n] = TOKEN_IMAGE, i
        kind[full_mask[:, past:] == 0] = TOKEN_PAD
        for layer in self.model.visual_abstractor.encoder.layers[: 2 if n_abstractor_images else 0]:
            layer.crossattention.attention(torch.randn(n_abstractor_images, 5, 8))
        if self.hook_layout.active:
            self.hook_layout(
                SequenceLayout(
                    past_length=past,
                    token_kind=kind,
                    image_index=image,
                    attention_mask=full_mask,
                    images_per_sample=[len(s) for s in (images_at or [[]] * B)],
                )
            )
        x = self.embed(ids)
        for block in self.model.layers:
            x = x + block.self_attn(x, cache, full_mask.bool(), past)
        cache["_len"] = past + L
        return self.head(x)


@pytest.fixture
def toy():
    torch.manual_seed(0)
    return ToyOwl().eval()


@pytest.fixture(autouse=True, scope="module")
def _single_thread(single_thread):
    """Every test here runs on one intra-op thread (tests/conftest.py)."""
