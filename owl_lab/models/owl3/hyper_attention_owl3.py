"""Decoder attention of mPLUG-Owl3: plain Qwen2 GQA attention and the four hyper-attention variants.

Notation: B batch, L new positions of this call, P cached positions, Lk = P + L text keys,
nH query heads, nKV key/value heads, D head dim, N images per sample (padded), T tokens per image,
M real images in the batch (padding slots excluded; the official batch-global image list).

A hyper layer reuses the layer's own ``input_layernorm`` on the M real images (done by the decoder
layer), projects them with ``v_kv_proj`` into per-kv-head interleaved [K_j | V_j] channels, rotates
the image keys with MI-RoPE (fp32, one position per image) and lets the *post-RoPE self-attention
query* attend them:

* gated / static_gate / sum (240728 lineage): a separate cross softmax over the visible image keys
  (image n visible to token t iff s_n < t), mixed into the self-attention context before ``o_proj``:
  ``c*(1-g) + X*g`` (g from ``gate_proj`` on c, or sigmoid of the static ``gate``) or ``c + X`` (sum);
  rows that see no image keep c untouched.
* fused (241101): one softmax over [visible image keys (t >= s_n) ; causal text keys].

Image K/V are recomputed on every call and never enter the KV cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb, repeat_kv, rotate_half

from owl_lab.models.observe import AttentionEvent, GateEvent, HookPoint


@dataclass
class AttnContext:
    """Per-forward facts shared by all decoder layers (built once by the decoder, never stored)."""

    batch_size: int
    past_length: int
    query_index: torch.Tensor  # [L] raw sequence index of each new position
    key_valid: torch.Tensor | None  # [B, Lk] bool from attention_mask (None = no padding)
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # text RoPE cos/sin [B, L, D]
    cache: object | None  # transformers Cache (text K/V only)
    eager: bool  # materialise probabilities (eager path)
    image_embeds: torch.Tensor | None = None  # [M, T, H] pre-norm, the M real images (image_valid order)
    image_valid: torch.Tensor | None = None  # [B, N] bool, False for padding slots
    image_visible: torch.Tensor | None = None  # [B, L, N] bool, token t may see image n
    mi_positions: torch.Tensor | None = None  # [B, N] long MI-RoPE position of each image (None: off)
    mi_cos: torch.Tensor | None = None  # [B, N, D] fp32 MI-RoPE (None: mi_rope off)
    mi_sin: torch.Tensor | None = None

    @property
    def tokens_per_image(self) -> int:
        return self.image_embeds.shape[1]

    def text_allowed(self, q0: int, q1: int, lk: int) -> torch.Tensor:
        """[B, q1 - q0, Lk] bool: causal over raw indices, minus padded keys.

        A padding query always keeps its own key, so no softmax row is empty (no NaN reaches the
        padded K/V that real rows multiply by zero).
        """
        keys = torch.arange(lk, device=self.query_index.device)
        query = self.query_index[q0:q1, None]
        allowed = (keys[None, :] <= query)[None].expand(self.batch_size, -1, -1)  # [B, q, Lk]
        if self.key_valid is not None:
            allowed = allowed & (self.key_valid[:, None, :lk] | (keys[None, :] == query)[None])
        return allowed

    def image_allowed(self, q0: int, q1: int) -> torch.Tensor:
        """[B, q1 - q0, N*T] bool: image keys each query may see (expanded over the T tokens)."""
        return self.image_visible[:, q0:q1].repeat_interleave(self.tokens_per_image, dim=-1)

    def image_key_index(self) -> torch.Tensor:
        """[B, N*T] sample-relative image index of each image key (-1 for padding slots)."""
        b, n = self.image_valid.shape
        idx = torch.arange(n, device=self.image_valid.device)[None].expand(b, n)
        idx = torch.where(self.image_valid, idx, torch.full_like(idx, -1))
        return idx.repeat_interleave(self.tokens_per_image, dim=-1)


def attend(q, k, v, allowed, is_causal, eager, scale):
    """Softmax attention with GQA.

    Args:
        q: [B, nH, Lq, D]; k, v: [B, nKV, Lk, D].
        allowed: [B, Lq, Lk] bool (True = attend) or None (then ``is_causal`` or no mask).
    Returns:
        context [B, nH, Lq, D] and probabilities [B, nH, Lq, Lk] (eager only, else None).
    """
    groups = q.shape[1] // k.shape[1]
    if not eager:
        mask = None if allowed is None else allowed[:, None]  # [B, 1, Lq, Lk]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal and mask is None, scale=scale, enable_gqa=groups > 1
        )
        return out, None
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)  # [B, nH, Lk, D]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, nH, Lq, Lk]
    if allowed is None and is_causal:
        lq, lk = scores.shape[-2:]
        allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)[None]
    if allowed is not None:
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v), probs


class Owl3Attention(nn.Module):
    """Qwen2 GQA self-attention (q/k/v with bias, o without) with an observation point.

    Hyper layers subclass it (:class:`Owl3HyperAttention`). Returns the o_proj output plus, on the
    eager path, (text-key probabilities [B, nH, L, Lk], image-key probabilities [B, nH, L, N*T] or None).
    """

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        h, d = config.hidden_size, self.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=True)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=True)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=True)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)
        self.hook_attn = HookPoint()

    def text_qkv(self, x: torch.Tensor, ctx: AttnContext):
        """x [B, L, H] → q [B, nH, L, D] (after RoPE), k/v [B, nKV, Lk, D] (after RoPE, with cache)."""
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # [B, nH, L, D]
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, nKV, L, D]
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = ctx.position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if ctx.cache is not None:
            k, v = ctx.cache.update(k, v, self.layer_idx)  # text K/V only
        return q, k, v

    def self_attention(self, q, k, v, ctx: AttnContext):
        """Causal text attention → context [B, nH, L, D], probs (eager) or None."""
        lq, lk = q.shape[2], k.shape[2]
        if ctx.key_valid is None and (lq == 1 or ctx.past_length == 0):
            allowed, causal = None, lq > 1  # fast path: SDPA is_causal (no padding, no cache offset)
        else:
            allowed, causal = ctx.text_allowed(0, lq, lk), False
        return attend(q, k, v, allowed, causal, ctx.eager, self.scaling)

    def emit(self, kind: str, q, k, ctx: AttnContext, probs=None, image_keys: bool = False, text_keys: bool = True):
        """Hand the exact softmax inputs to ``hook_attn`` (only called when it is active)."""
        b, lk = q.shape[0], k.shape[2]
        device = q.device
        n_img = ctx.image_visible.shape[-1] * ctx.tokens_per_image if image_keys else 0
        n_txt = lk - n_img
        pos = [torch.full((b, n_img), -1, dtype=torch.long, device=device)] if image_keys else []
        img = [ctx.image_key_index()] if image_keys else []
        if text_keys:
            pos.append(torch.arange(n_txt, device=device)[None].expand(b, n_txt))
            img.append(torch.full((b, n_txt), -1, dtype=torch.long, device=device))

        def allowed(q0: int, q1: int) -> torch.Tensor:
            parts = [ctx.image_allowed(q0, q1)] if image_keys else []
            if text_keys:
                parts.append(ctx.text_allowed(q0, q1, n_txt))
            return torch.cat(parts, dim=-1)

        self.hook_attn(
            AttentionEvent(
                layer=self.layer_idx, kind=kind, query=q, key=k, scale=self.scaling,
                query_index=ctx.query_index, key_position=torch.cat(pos, -1), key_image=torch.cat(img, -1),
                allowed=allowed, probs=probs,
                extra={"image_rope_positions": ctx.mi_positions} if image_keys else {},
            )
        )

    def forward(self, x: torch.Tensor, ctx: AttnContext, image_normed: torch.Tensor | None = None):
        q, k, v = self.text_qkv(x, ctx)
        out, probs = self.self_attention(q, k, v, ctx)
        if self.hook_attn.active:
            self.emit("self", q, k, ctx, probs)
        b, _, n, _ = q.shape
        out = out.transpose(1, 2).reshape(b, n, -1)  # [B, L, nH*D]
        return self.o_proj(out), (probs, None)


class Owl3HyperAttention(Owl3Attention):
    """Hyper attention: self-attention plus image keys/values from ``v_kv_proj`` (see module doc)."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.kind = config.hyper_attention
        h, d = config.hidden_size, self.head_dim
        self.v_kv_proj = nn.Linear(h, 2 * self.num_kv_heads * d, bias=True)
        if self.kind == "gated":
            # one D x D Linear + sigmoid shared by all heads (key gate_proj.0.*)
            self.gate_proj = nn.Sequential(nn.Linear(d, d, bias=True), nn.Sigmoid())
        elif self.kind == "static_gate":
            self.gate = nn.Parameter(torch.zeros(h))  # g = sigmoid(gate), token-independent
        if self.kind in ("gated", "static_gate"):
            self.hook_gate = HookPoint()

    def image_kv(self, image_normed: torch.Tensor, ctx: AttnContext):
        """Shared-normed real images [M, T, H] → keys (MI-RoPE) and values [B, nKV, N*T, D].

        Projection and rotation run on the M real images only; padding slots get zero K/V (every
        softmax masks them out).
        """
        m, t, _ = image_normed.shape
        kv = self.v_kv_proj(image_normed).view(m, t, self.num_kv_heads, 2, self.head_dim)  # [K_j | V_j]
        k, v = kv[..., 0, :], kv[..., 1, :]  # [M, T, nKV, D]
        if ctx.mi_cos is not None:
            cos = ctx.mi_cos[ctx.image_valid][:, None, None, :]  # [M, 1, 1, D], one position per image, fp32
            sin = ctx.mi_sin[ctx.image_valid][:, None, None, :]
            kf = k.float()
            k = (kf * cos + rotate_half(kf) * sin).to(v.dtype)
        b, n = ctx.image_valid.shape
        padded = v.new_zeros(2, b, n, self.num_kv_heads, t, self.head_dim)  # [K|V, B, N, nKV, T, D]
        padded[:, ctx.image_valid] = torch.stack([k, v]).transpose(2, 3)  # [2, M, nKV, T, D]
        k, v = padded.transpose(2, 3).reshape(2, b, self.num_kv_heads, n * t, self.head_dim)  # [B, nKV, N*T, D]
        return k, v

    def forward(self, x: torch.Tensor, ctx: AttnContext, image_normed: torch.Tensor | None = None):
        if image_normed is None and self.kind != "fused":
            return super().forward(x, ctx)  # text-only batch: plain Qwen2 attention (gate never runs)
        q, k, v = self.text_qkv(x, ctx)
        b, _, n, _ = q.shape
        if self.kind == "fused":
            out, probs = self.joint(q, k, v, ctx, image_normed)
        else:
            out, probs = self.separate(q, k, v, ctx, image_normed)
        out = out.transpose(1, 2).reshape(b, n, -1)  # [B, L, nH*D]
        return self.o_proj(out), probs

    def joint(self, q, k, v, ctx: AttnContext, image_normed):
        """241101: one softmax over [image keys ; text keys] → context, (text probs, image probs)."""
        if image_normed is None:
            out, probs = self.self_attention(q, k, v, ctx)
            if self.hook_attn.active:
                self.emit("joint", q, k, ctx, probs)
            return out, (probs, None)
        k_img, v_img = self.image_kv(image_normed, ctx)
        k_all = torch.cat([k_img, k], dim=2)  # [B, nKV, N*T + Lk, D]
        v_all = torch.cat([v_img, v], dim=2)
        n_img, lk = k_img.shape[2], k.shape[2]
        allowed = torch.cat([ctx.image_allowed(0, q.shape[2]), ctx.text_allowed(0, q.shape[2], lk)], dim=-1)
        out, probs = attend(q, k_all, v_all, allowed, False, ctx.eager, self.scaling)
        if self.hook_attn.active:
            self.emit("joint", q, k_all, ctx, probs, image_keys=True)
        if probs is None:
            return out, (None, None)
        return out, (probs[..., n_img:], probs[..., :n_img])

    def separate(self, q, k, v, ctx: AttnContext, image_normed):
        """240728 lineage: self softmax, cross softmax over image keys, gate / sum mix before o_proj."""
        c, self_probs = self.self_attention(q, k, v, ctx)  # [B, nH, L, D]
        if self.hook_attn.active:
            self.emit("self", q, k, ctx, self_probs)
        k_img, v_img = self.image_kv(image_normed, ctx)
        applied = ctx.image_visible.any(-1)  # [B, L] rows that see >= 1 image
        # Rows that see nothing get a dummy all-keys mask (their result is discarded) to avoid NaN.
        allowed = ctx.image_allowed(0, q.shape[2]) | ~applied[..., None]
        x, cross_probs = attend(q, k_img, v_img, allowed, False, ctx.eager, self.scaling)
        keep = applied[:, None, :, None]  # [B, 1, L, 1]
        if cross_probs is not None:
            cross_probs = cross_probs * keep
        if self.hook_attn.active:
            self.emit("cross", q, k_img, ctx, cross_probs, image_keys=True, text_keys=False)
        if self.kind == "sum":
            fused = c + x
        else:
            if self.kind == "gated":
                g = self.gate_proj(c)  # [B, nH, L, D]: per token, head, channel
            else:
                g = torch.sigmoid(self.gate).view(1, self.num_heads, 1, self.head_dim).expand_as(c)
            fused = c * (1 - g) + x * g
            if self.hook_gate.active:
                self.hook_gate(
                    GateEvent(
                        layer=self.layer_idx, gate=g.transpose(1, 2), applied=applied,
                        self_context=c.transpose(1, 2), cross_context=(x * keep).transpose(1, 2),
                        o_proj=self.o_proj, query_index=ctx.query_index,
                    )
                )
        out = torch.where(keep, fused, c)
        return out, (self_probs, cross_probs)
