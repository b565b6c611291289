"""Owl2's modality-adaptive module (MAM): the decoder block with per-modality K/V projections and norms.

Per token t with modality m_t (0 text, 1 vision), one pre-norm LLaMA block (owl2 SPEC §3.5):

    a = RMSNorm_in^{m}(h);  q = W_q a;  k = W_k^{m} a;  v = W_v^{m} a;  RoPE(q, k)
    h = h + W_o · softmax(q kᵀ/√hd + mask) v          (one causal softmax over both modalities)
    h = h + MLP(RMSNorm_post^{m}(h))                 (MLP, W_q, W_o shared)

Shapes: B batch, L positions in this call, P cached positions, H heads, Hkv KV heads, hd head dim.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    apply_rotary_pos_emb,
)

from ..attention import attention
from ..observe import HookPoint
from .configuration_owl2 import Owl2Config
from .sequence_owl2 import Owl2Sequence


class Owl2Multiway(nn.Module):
    """Two copies of a module; ``multiway.0`` serves text tokens, ``multiway.1`` image rows."""

    def __init__(self, make):
        super().__init__()
        self.multiway = nn.ModuleList([make(), make()])

    def forward(self, x: torch.Tensor, modality: torch.Tensor | None) -> torch.Tensor:
        if modality is None:  # no image row in this call: the text branch alone
            return self.multiway[0](x)
        # per-token select: exactly equal to the official gather/scatter routing
        return torch.where(modality[..., None].bool(), self.multiway[1](x), self.multiway[0](x))


def _route(module: nn.Module, x: torch.Tensor, modality: torch.Tensor | None) -> torch.Tensor:
    return module(x, modality) if isinstance(module, Owl2Multiway) else module(x)


def _per_modality(config: Owl2Config, make):
    return Owl2Multiway(make) if config.modality_adaptive else make()


class Owl2Attention(nn.Module):
    """Causal self-attention; K/V projections per modality, Q/O shared, GQA supported."""

    def __init__(self, config: Owl2Config, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        D, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(D, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = _per_modality(
            config, lambda: nn.Linear(D, self.num_kv_heads * self.head_dim, bias=bias)
        )
        self.v_proj = _per_modality(
            config, lambda: nn.Linear(D, self.num_kv_heads * self.head_dim, bias=bias)
        )
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, D, bias=bias)
        self.attention_edit = None  # knockout slot, see owl_lab.models.attention
        self.hook_attn = HookPoint()  # AttentionEvent
        self.hook_z = HookPoint()  # [B, L, H, hd] context before o_proj

    def forward(self, x, modality, cos_sin, seq: Owl2Sequence, cache=None, output_attentions=False):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, L, hd]
        k = _route(self.k_proj, x, modality).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = _route(self.v_proj, x, modality).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *cos_sin)  # rotate-half RoPE; k: [B, Hkv, L, hd]
        if cache is not None:  # cached K/V are already modality-specific (image rows: vision branch)
            k, v = cache.update(k, v, self.layer_idx)  # [B, Hkv, P+L, hd]

        def describe() -> dict:
            P, Lk, dev = seq.past_length, k.shape[2], q.device
            return dict(
                query_index=torch.arange(P, P + L, device=dev),
                key_position=torch.arange(Lk, device=dev).expand(B, -1),
                key_image=seq.key_image,
            )

        # softmax upcast to fp32 as in HF LLaMA
        ctx, probs, _ = attention(
            self,
            q,
            k,
            v,
            seq.allowed_mask(),
            self.scale,
            "self",
            describe,
            output_attentions=output_attentions,
        )  # ctx [B, H, L, hd]
        z = self.hook_z(ctx.transpose(1, 2))  # [B, L, H, hd]
        return self.o_proj(z.reshape(B, L, self.num_heads * self.head_dim)), probs


class Owl2DecoderLayer(nn.Module):
    """Pre-norm block with the writable sites ``hook_resid_pre/mid/post``, ``hook_attn_out``,
    ``hook_mlp_out``."""

    def __init__(self, config: Owl2Config, layer_idx: int):
        super().__init__()
        norm = lambda: LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)  # noqa: E731
        self.self_attn = Owl2Attention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = _per_modality(config, norm)
        self.post_attention_layernorm = _per_modality(config, norm)
        # writable sites, [B, L, D] each
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, h, modality, cos_sin, seq, cache=None, output_attentions=False):
        h = self.hook_resid_pre(h)
        attn, probs = self.self_attn(
            _route(self.input_layernorm, h, modality), modality, cos_sin, seq, cache, output_attentions
        )
        h = self.hook_resid_mid(h + self.hook_attn_out(attn))
        h = h + self.hook_mlp_out(self.mlp(_route(self.post_attention_layernorm, h, modality)))
        return self.hook_resid_post(h), probs
