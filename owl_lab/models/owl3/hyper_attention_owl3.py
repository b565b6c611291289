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

Every softmax runs through the attention core (:func:`owl_lab.models.attention.attention`), which
applies a knockout (``attention_edit``) and emits ``hook_attn``. Writable sites, [B, L, nH, D] each:
``hook_z`` (context before ``o_proj``), ``hook_cross_z`` (cross context X), ``hook_gate`` (g);
``hook_gate_event`` observes the fusion (:class:`~owl_lab.models.observe.GateEvent`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb, rotate_half

from owl_lab.models.attention import Allowed, attention
from owl_lab.models.observe import AttentionKind, GateEvent, HookPoint


@dataclass
class AttnContext:
    """Per-forward facts shared by all decoder layers (built once by the decoder, never stored)."""

    batch_size: int
    past_length: int
    query_index: torch.Tensor  # [L] raw sequence index of each new position
    key_valid: torch.Tensor | None  # [B, Lk] bool from attention_mask (None = no padding)
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # text RoPE cos/sin [B, L, D]
    cache: object | None  # transformers Cache (text K/V only)
    output_attentions: bool  # materialise probabilities (forces the eager kernel)
    image_embeds: torch.Tensor | None = None  # [M, T, H] pre-norm, the M real images (image_valid order)
    image_valid: torch.Tensor | None = None  # [B, N] bool, False for padding slots
    image_visible: torch.Tensor | None = None  # [B, L, N] bool, token t may see image n
    mi_positions: torch.Tensor | None = None  # [B, N] long MI-RoPE position of each image (None: off)
    mi_cos: torch.Tensor | None = None  # [B, N, D] fp32 MI-RoPE (None: mi_rope off)
    mi_sin: torch.Tensor | None = None
    _masks: dict = field(default_factory=dict, repr=False)

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

    def text_mask(self, lq: int, lk: int) -> Allowed:
        """Causal text mask of this call (shared by all layers; no tensor on the fast paths)."""
        if ("text", lk) not in self._masks:
            shape, dev = (self.batch_size, lq, lk), self.query_index.device
            if self.key_valid is None and lq == 1:
                mask = Allowed(shape, fast="all", device=dev)  # one query sees the whole cache
            elif self.key_valid is None and self.past_length == 0:
                mask = Allowed(shape, fast="causal", device=dev)  # plain causal prefill
            else:
                mask = Allowed(shape, rows=lambda q0, q1: self.text_allowed(q0, q1, lk))
            self._masks[("text", lk)] = mask
        return self._masks[("text", lk)]

    def image_mask(self, lq: int) -> Allowed:
        """[B, Lq, N*T] image keys each query may see (cross attention)."""
        if "image" not in self._masks:
            shape = (self.batch_size, lq, self.image_visible.shape[-1] * self.tokens_per_image)
            self._masks["image"] = Allowed(shape, rows=self.image_allowed)
        return self._masks["image"]

    def joint_mask(self, lq: int, lk: int) -> Allowed:
        """[B, Lq, N*T + Lk]: [image keys ; causal text keys] of the fused 241101 softmax."""
        if ("joint", lk) not in self._masks:
            shape = (self.batch_size, lq, self.image_visible.shape[-1] * self.tokens_per_image + lk)

            def rows(q0: int, q1: int) -> torch.Tensor:
                return torch.cat([self.image_allowed(q0, q1), self.text_allowed(q0, q1, lk)], dim=-1)

            self._masks[("joint", lk)] = Allowed(shape, rows=rows)
        return self._masks[("joint", lk)]

    def image_key_index(self) -> torch.Tensor:
        """[B, N*T] sample-relative image index of each image key (-1 for padding slots)."""
        b, n = self.image_valid.shape
        idx = torch.arange(n, device=self.image_valid.device)[None].expand(b, n)
        idx = torch.where(self.image_valid, idx, torch.full_like(idx, -1))
        return idx.repeat_interleave(self.tokens_per_image, dim=-1)


class Owl3Attention(nn.Module):
    """Qwen2 GQA self-attention (q/k/v with bias, o without) with an observation point.

    Hyper layers subclass it (:class:`Owl3HyperAttention`). Returns the o_proj output plus, on the
    eager path, (text-key probabilities [B, nH, L, Lk], image-key probabilities [B, nH, L, N*T] or None).
    """

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        h, d = config.hidden_size, self.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=True)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=True)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=True)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)
        self.attention_edit = None  # knockout slot, see owl_lab.models.attention
        self.hook_attn = HookPoint()  # AttentionEvent
        self.hook_z = HookPoint()  # [B, L, nH, D] context before o_proj

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

    def attend(
        self,
        q,
        k,
        v,
        ctx: AttnContext,
        kind: AttentionKind,
        allowed: Allowed,
        image_keys: bool = False,
        text_keys: bool = True,
    ):
        """The attention core on [image keys ;] text keys → (context [B, nH, L, D], probs, mask used)."""

        def describe() -> dict:
            b, lk, device = q.shape[0], k.shape[2], q.device
            n_img = ctx.image_visible.shape[-1] * ctx.tokens_per_image if image_keys else 0
            n_txt = lk - n_img
            pos = [torch.full((b, n_img), -1, dtype=torch.long, device=device)] if image_keys else []
            img = [ctx.image_key_index()] if image_keys else []
            if text_keys:
                pos.append(torch.arange(n_txt, device=device)[None].expand(b, n_txt))
                img.append(torch.full((b, n_txt), -1, dtype=torch.long, device=device))
            return dict(
                query_index=ctx.query_index,
                key_position=torch.cat(pos, -1),
                key_image=torch.cat(img, -1),
                image_rope_positions=ctx.mi_positions if image_keys else None,
            )

        return attention(
            self, q, k, v, allowed, self.scaling, kind, describe, output_attentions=ctx.output_attentions
        )

    def self_attention(self, q, k, v, ctx: AttnContext, kind: AttentionKind = "self"):
        """Causal text attention → context [B, nH, L, D], probs (eager) or None."""
        out, probs, _ = self.attend(q, k, v, ctx, kind, ctx.text_mask(q.shape[2], k.shape[2]))
        return out, probs

    def project_out(self, out: torch.Tensor) -> torch.Tensor:
        """Context [B, nH, L, D] → ``hook_z`` [B, L, nH, D] → o_proj [B, L, H]."""
        b, _, n, _ = out.shape
        z = self.hook_z(out.transpose(1, 2))  # [B, L, nH, D]
        return self.o_proj(z.reshape(b, n, -1))

    def forward(self, x: torch.Tensor, ctx: AttnContext, image_normed: torch.Tensor | None = None):
        q, k, v = self.text_qkv(x, ctx)
        out, probs = self.self_attention(q, k, v, ctx)
        return self.project_out(out), (probs, None)


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
        if self.kind != "fused":
            self.hook_cross_z = HookPoint()  # [B, L, nH, D] cross-attention context
        if self.kind in ("gated", "static_gate"):
            self.hook_gate = HookPoint()  # [B, L, nH, D] gate g
            self.hook_gate_event = HookPoint()  # GateEvent

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
        k, v = padded.transpose(2, 3).reshape(
            2, b, self.num_kv_heads, n * t, self.head_dim
        )  # [B, nKV, N*T, D]
        return k, v

    def forward(self, x: torch.Tensor, ctx: AttnContext, image_normed: torch.Tensor | None = None):
        if image_normed is None and self.kind != "fused":
            return super().forward(x, ctx)  # text-only batch: plain Qwen2 attention (gate never runs)
        q, k, v = self.text_qkv(x, ctx)
        gate_event = None
        if self.kind == "fused":
            out, probs = self.joint(q, k, v, ctx, image_normed)
        else:
            out, probs, gate_event = self.separate(q, k, v, ctx, image_normed)
        attn_out = self.project_out(out)
        if gate_event is not None:
            # Fired after o_proj so an observer can split the output with one product (the other part
            # is the output minus it); only when nothing could have edited hook_z between the two.
            gate_event.output = None if self.hook_z.active else attn_out
            self.hook_gate_event(gate_event)
        return attn_out, probs

    def joint(self, q, k, v, ctx: AttnContext, image_normed):
        """241101: one softmax over [image keys ; text keys] → context, (text probs, image probs)."""
        if image_normed is None:
            out, probs = self.self_attention(q, k, v, ctx, kind="joint")
            return out, (probs, None)
        k_img, v_img = self.image_kv(image_normed, ctx)
        k_all = torch.cat([k_img, k], dim=2)  # [B, nKV, N*T + Lk, D]
        v_all = torch.cat([v_img, v], dim=2)
        n_img, lq, lk = k_img.shape[2], q.shape[2], k.shape[2]
        out, probs, _ = self.attend(q, k_all, v_all, ctx, "joint", ctx.joint_mask(lq, lk), image_keys=True)
        if probs is None:
            return out, (None, None)
        return out, (probs[..., n_img:], probs[..., :n_img])

    def separate(self, q, k, v, ctx: AttnContext, image_normed):
        """240728 lineage: self softmax, cross softmax over image keys, gate / sum mix before o_proj.

        Returns (context [B, nH, L, D], (self probs, cross probs), the :class:`GateEvent` to emit
        after ``o_proj`` or None when nobody observes the gate)."""
        c, self_probs = self.self_attention(q, k, v, ctx)  # [B, nH, L, D]
        k_img, v_img = self.image_kv(image_normed, ctx)
        # rows that see no image get a discarded dummy softmax in the core (no NaN)
        x, cross_probs, used = self.attend(
            q, k_img, v_img, ctx, "cross", ctx.image_mask(q.shape[2]), image_keys=True, text_keys=False
        )
        applied = used.tensor().any(-1)  # [B, L] rows that see >= 1 image ([B, nH, L] per-head knockout)
        keep = applied[..., None] if applied.dim() == 3 else applied[:, None, :, None]  # [B, 1 | nH, L, 1]
        x = self.hook_cross_z(x.transpose(1, 2)).transpose(1, 2)  # site [B, L, nH, D]
        event = None
        if self.kind == "sum":
            fused = c + x
        else:
            if self.kind == "gated":
                g = self.gate_proj(c)  # [B, nH, L, D]: per token, head, channel
            else:
                g = torch.sigmoid(self.gate).view(1, self.num_heads, 1, self.head_dim).expand_as(c)
            g = self.hook_gate(g.transpose(1, 2)).transpose(1, 2)  # site [B, L, nH, D]
            fused = c * (1 - g) + x * g
            if self.hook_gate_event.active:
                event = GateEvent(
                    layer=self.layer_idx,
                    gate=g.transpose(1, 2),
                    applied=applied,
                    self_context=c.transpose(1, 2),
                    cross_context=(x * keep).transpose(1, 2),
                    o_proj_weight=self.o_proj.weight,
                    query_index=ctx.query_index,
                )
        out = torch.where(keep, fused, c)
        return out, (self_probs, cross_probs), event
