"""mPLUG-Owl2 vision side: the CLIP-style ViT and the visual abstractor (owl2 SPEC §3.2, §3.3).

Shapes: N = images, T = ViT tokens per image (CLS + grid² patches), Dv = ViT width, Q = learnable
queries, Da = abstractor width, D = LLM width, h = heads, hd = head dim.

Key names follow the official checkpoint (``model.vision_model.*``, ``model.visual_abstractor.*``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from ..attention import Allowed, attention
from ..observe import HookPoint
from ..observe_vision import vision_key_facts
from .configuration_owl2 import Owl2Config

# ================================================================================================
# ViT
# ================================================================================================


class Owl2VisionEmbeddings(nn.Module):
    """Patchify (conv, no bias) → [CLS; patches] + learned positions → ``pre_layernorm``."""

    def __init__(self, config: Owl2Config):
        super().__init__()
        s = config.vision_settings
        self.settings = s
        if s.use_cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, s.hidden_size))
        self.patch_embed = nn.Conv2d(s.num_channels, s.hidden_size, s.patch_size, s.patch_size, bias=False)
        self.position_embedding = nn.Parameter(torch.zeros(1, s.num_positions, s.hidden_size))
        self.pre_layernorm = nn.LayerNorm(s.hidden_size, eps=s.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, C, S, S] → [N, T, Dv]. The size must match exactly (no interpolation)."""
        s = self.settings
        expected = (s.num_channels, s.image_size, s.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape [N, {expected[0]}, {expected[1]}, {expected[2]}] "
                f"(image_size {s.image_size}, no interpolation), got {list(pixel_values.shape)}."
            )
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # [N, Dv, g, g]
        x = x.flatten(2).transpose(1, 2)  # [N, g*g, Dv], row-major patches
        if s.use_cls_token:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # [N, T, Dv]
        x = x + self.position_embedding[:, : x.shape[1]]
        return self.pre_layernorm(x)


class Owl2VisionAttention(nn.Module):
    """Unmasked MHA with a fused QKV whose output is laid out [h, {q,k,v}, hd] (not [3, h, hd])."""

    def __init__(self, config: Owl2Config, layer_idx: int = 0):
        super().__init__()
        s = config.vision_settings
        self.config, self.layer_idx = config, layer_idx
        self.num_heads = s.num_attention_heads
        self.head_dim = s.hidden_size // s.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.query_key_value = nn.Linear(s.hidden_size, 3 * s.hidden_size)
        self.dense = nn.Linear(s.hidden_size, s.hidden_size)
        self.attention_edit = None  # knockout slot, see owl_lab.models.attention
        self.hook_attn = HookPoint()  # kind "vision" events (observe_vision), only read by hooks

    def forward(self, x: torch.Tensor, output_attentions: bool = False):
        N, T, _ = x.shape
        qkv = self.query_key_value(x).view(N, T, self.num_heads, 3, self.head_dim)  # [N, T, h, 3, hd]
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # 3 × [N, h, T, hd]
        allowed = Allowed((N, T, T), fast="all", device=x.device)

        def describe() -> dict:
            s = self.config.vision_settings
            grid = s.image_size // s.patch_size
            return vision_key_facts(N, T, (grid, grid), s.use_cls_token, x.device)

        # softmax in the model dtype like the official ViT (no fp32 upcast)
        ctx, probs, _ = attention(
            self,
            q,
            k,
            v,
            allowed,
            self.scale,
            "vision",
            describe,
            output_attentions=output_attentions,
            softmax_dtype=None,
        )
        ctx = ctx.transpose(1, 2).reshape(N, T, -1)  # [N, T, Dv]
        return self.dense(ctx), probs


class Owl2VisionMLP(nn.Module):
    def __init__(self, config: Owl2Config):
        super().__init__()
        s = config.vision_settings
        self.fc1 = nn.Linear(s.hidden_size, s.intermediate_size)
        self.fc2 = nn.Linear(s.intermediate_size, s.hidden_size)
        self.act = ACT2FN[s.hidden_act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Owl2VisionLayer(nn.Module):
    """Pre-LN block: x += Attn(LN(x)); x += MLP(LN(x))."""

    def __init__(self, config: Owl2Config, layer_idx: int = 0):
        super().__init__()
        s = config.vision_settings
        self.input_layernorm = nn.LayerNorm(s.hidden_size, eps=s.layer_norm_eps)
        self.self_attn = Owl2VisionAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(s.hidden_size, eps=s.layer_norm_eps)
        self.mlp = Owl2VisionMLP(config)

    def forward(self, x, output_attentions: bool = False):
        attn, probs = self.self_attn(self.input_layernorm(x), output_attentions)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, probs


class Owl2VisionEncoder(nn.Module):
    def __init__(self, config: Owl2Config):
        super().__init__()
        self.layers = nn.ModuleList(
            [Owl2VisionLayer(config, k) for k in range(config.vision_settings.num_hidden_layers)]
        )


@dataclass
class Owl2VisionOutput:
    last_hidden_state: torch.Tensor  # [N, T, Dv] post_layernorm on every token (CLS first)
    pooler_output: torch.Tensor  # [N, Dv] post_layernorm applied again to CLS (official quirk; unused)
    hidden_states: tuple | None = None  # (embeddings after pre_layernorm, layer 0 out, ...)
    attentions: tuple | None = None  # per layer [N, h, T, T]


class Owl2VisionModel(nn.Module):
    """``model.vision_model``: the whole last layer, post-LN on all tokens, goes to the abstractor."""

    def __init__(self, config: Owl2Config):
        super().__init__()
        s = config.vision_settings
        self.embeddings = Owl2VisionEmbeddings(config)
        self.encoder = Owl2VisionEncoder(config)
        if s.use_post_layernorm:
            self.post_layernorm = nn.LayerNorm(s.hidden_size, eps=s.layer_norm_eps)

    def forward(self, pixel_values, output_attentions=False, output_hidden_states=False) -> Owl2VisionOutput:
        x = self.embeddings(pixel_values)  # [N, T, Dv]
        hidden, attns = [x], []
        for layer in self.encoder.layers:
            x, probs = layer(x, output_attentions)
            hidden.append(x)
            attns.append(probs)
        post = getattr(self, "post_layernorm", nn.Identity())
        last = post(x)
        return Owl2VisionOutput(
            last_hidden_state=last,
            pooler_output=post(last[:, 0]),
            hidden_states=tuple(hidden) if output_hidden_states else None,
            attentions=tuple(attns) if output_attentions else None,
        )


# ================================================================================================
# Visual abstractor
# ================================================================================================


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """[len(positions), dim]: all sines then all cosines, ω_i = 10000^(-i/(dim/2)).

    Computed in numpy float32 throughout: that reproduces the official tables bit for bit
    (float64 differs in the last ulp)."""
    omega = np.arange(dim // 2, dtype=np.float32) / np.float32(dim / 2.0)
    omega = np.float32(1.0) / np.float32(10000) ** omega  # [dim/2]
    angles = np.outer(positions.astype(np.float32), omega)  # [P, dim/2]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def abstractor_position_tables(width: int, num_queries: int, grid: int, cls: bool):
    """Deterministic sin-cos tables (float32).

    Returns:
        q_pos [Q, Da]: the 1-D table at 0..Q-1.
        k_pos [cls + grid², Da]: a zero row for CLS, then patch (r, c) at 1 + grid*r + c =
            [1-D(Da/2) at c ; 1-D(Da/2) at r] (column first, MAE style).
    """
    q_pos = sincos_1d(width, np.arange(num_queries))
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")  # [g, g] each
    k_pos = np.concatenate(
        [sincos_1d(width // 2, cols.reshape(-1)), sincos_1d(width // 2, rows.reshape(-1))], axis=1
    )  # [g*g, Da]
    if cls:
        k_pos = np.concatenate([np.zeros((1, width), dtype=np.float32), k_pos], axis=0)
    return torch.from_numpy(q_pos).float(), torch.from_numpy(k_pos).float()


class Owl2AbstractorAttention(nn.Module):
    """Queries attend [queries ; CLS ; patches] in ONE softmax; positions on Q and K, not on V."""

    def __init__(self, config: Owl2Config, layer_idx: int):
        super().__init__()
        a = config.abstractor_settings
        self.config, self.layer_idx, self.settings = config, layer_idx, a
        self.num_heads = a.num_attention_heads
        self.head_dim = a.hidden_size // a.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.query = nn.Linear(a.hidden_size, a.hidden_size)
        self.key = nn.Linear(a.encoder_hidden_size, a.hidden_size)
        self.value = nn.Linear(a.encoder_hidden_size, a.hidden_size)
        # absent from the real checkpoints → non-persistent, rebuilt at construction / load
        q_pos, k_pos = self.position_tables()
        self.register_buffer("q_pos_embed", q_pos, persistent=False)
        self.register_buffer("k_pos_embed", k_pos, persistent=False)
        self.attention_edit = None  # knockout slot, see owl_lab.models.attention
        self.hook_attn = HookPoint()

    def position_tables(self):
        a = self.settings
        return abstractor_position_tables(
            a.hidden_size, a.num_learnable_queries, a.grid_size, a.use_cls_token
        )

    def forward(self, x: torch.Tensor, e: torch.Tensor, output_attentions: bool = False):
        """x [N, Q, Da] normed queries, e [N, T, Dv] normed image tokens → (context [N, Q, Da], probs)."""
        N, Q, _ = x.shape
        T = e.shape[1]
        if T != self.k_pos_embed.shape[0]:
            raise ValueError(
                f"The abstractor expects {self.k_pos_embed.shape[0]} image tokens per image "
                f"(grid {self.settings.grid_size}), got {T}."
            )
        s = torch.cat([x, e], dim=1)  # [N, Q+T, Da]
        pos = torch.cat([self.q_pos_embed, self.k_pos_embed], dim=0).to(x.dtype)  # [Q+T, Da]
        split = (N, -1, self.num_heads, self.head_dim)
        q = self.query(x + pos[:Q]).view(split).transpose(1, 2)  # [N, h, Q, hd]
        k = self.key(s + pos).view(split).transpose(1, 2)  # [N, h, Q+T, hd]
        v = self.value(s).view(split).transpose(1, 2)  # [N, h, Q+T, hd]
        # Always the explicit (eager) kernel, softmax in the model dtype, as official: the map is
        # small (Q × (Q+T) per head) and observers get the exact probabilities used.
        allowed = Allowed((N, Q, Q + T), fast="all", device=x.device)
        ctx, probs, _ = attention(
            self,
            q,
            k,
            v,
            allowed,
            self.scale,
            "abstractor",
            lambda: self._describe(N, Q, T),
            softmax_dtype=None,
            implementation="eager",
        )  # ctx [N, h, Q, hd]
        ctx = ctx.transpose(1, 2).reshape(N, Q, -1)  # [N, Q, Da]
        return ctx, (probs if output_attentions else None)

    def _describe(self, N: int, Q: int, T: int) -> dict:
        g, cls = self.settings.grid_size, int(self.settings.use_cls_token)
        dev = self.q_pos_embed.device
        key_image = torch.cat(
            [
                torch.full((Q,), -1, device=dev),  # query keys
                torch.full((cls,), -2, device=dev),  # CLS
                torch.arange(T - cls, device=dev),  # patches, row-major
            ]
        ).expand(N, -1)  # [N, Q+T]
        return dict(
            query_index=torch.arange(Q, device=dev),
            key_position=torch.full((N, Q + T), -1, device=dev),
            key_image=key_image,
            grid=(g, g),
        )


class Owl2AbstractorMLP(nn.Module):
    """SwiGLU with a LayerNorm on the product: w2(ffn_ln(silu(w1 z) * w3 z))."""

    def __init__(self, config: Owl2Config):
        super().__init__()
        a = config.abstractor_settings
        self.w1 = nn.Linear(a.hidden_size, a.intermediate_size)
        self.w2 = nn.Linear(a.intermediate_size, a.hidden_size)
        self.w3 = nn.Linear(a.hidden_size, a.intermediate_size)
        self.ffn_ln = nn.LayerNorm(a.intermediate_size, eps=a.layer_norm_eps)

    def forward(self, z):
        return self.w2(self.ffn_ln(F.silu(self.w1(z)) * self.w3(z)))


class Owl2AbstractorResidualMLP(nn.Module):
    """y = x + out_proj(ctx) (residual from the NORMED query); h = y + mlp(norm2(y))."""

    def __init__(self, config: Owl2Config):
        super().__init__()
        a = config.abstractor_settings
        self.out_proj = nn.Linear(a.hidden_size, a.hidden_size)
        self.norm2 = nn.LayerNorm(a.hidden_size)  # eps 1e-5 (PyTorch default), as official
        self.mlp = Owl2AbstractorMLP(config)

    def forward(self, ctx, x):
        y = x + self.out_proj(ctx)
        return y + self.mlp(self.norm2(y))


class Owl2AbstractorCrossAttention(nn.Module):
    def __init__(self, config: Owl2Config, layer_idx: int):
        super().__init__()
        a = config.abstractor_settings
        self.norm1 = nn.LayerNorm(a.hidden_size)  # queries, eps 1e-5
        self.normk = nn.LayerNorm(a.encoder_hidden_size)  # image tokens, eps 1e-5
        self.attention = Owl2AbstractorAttention(config, layer_idx)
        self.output = Owl2AbstractorResidualMLP(config)

    def forward(self, h, image_embeds, output_attentions=False):
        x = self.norm1(h)
        ctx, probs = self.attention(x, self.normk(image_embeds), output_attentions)
        return self.output(ctx, x), probs


class Owl2AbstractorLayer(nn.Module):
    def __init__(self, config: Owl2Config, layer_idx: int):
        super().__init__()
        self.crossattention = Owl2AbstractorCrossAttention(config, layer_idx)

    def forward(self, h, image_embeds, output_attentions=False):
        return self.crossattention(h, image_embeds, output_attentions)


class Owl2AbstractorEncoder(nn.Module):
    def __init__(self, config: Owl2Config):
        super().__init__()
        n = config.abstractor_settings.num_hidden_layers
        self.layers = nn.ModuleList([Owl2AbstractorLayer(config, k) for k in range(n)])


@dataclass
class Owl2AbstractorOutputs:
    features: torch.Tensor  # [N, Q+1, D]: visual_fc(queries) then vit_eos
    layer_outputs: tuple  # query stream after each layer, [N, Q, Da] (before visual_fc)
    attentions: tuple | None = None  # per layer [N, h, Q, Q+T]


class Owl2VisualAbstractor(nn.Module):
    """``model.visual_abstractor``: Q learnable queries → Q+1 LLM rows per image (no final norm)."""

    def __init__(self, config: Owl2Config):
        super().__init__()
        a = config.abstractor_settings
        if a.add_v2t_pos_emb:
            raise ValueError(
                "visual_abstractor.add_v2t_pos_emb=True is a dead option of the official "
                "code (it cannot run there either) and is not supported."
            )
        if a.encoder_hidden_size != config.vision_settings.hidden_size:
            raise ValueError(
                f"visual_abstractor.encoder_hidden_size ({a.encoder_hidden_size}) must equal the ViT "
                f"hidden_size ({config.vision_settings.hidden_size})."
            )
        self.query_embeds = nn.Parameter(torch.zeros(1, a.num_learnable_queries, a.hidden_size))
        self.vit_eos = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.visual_fc = nn.Linear(a.hidden_size, config.hidden_size)
        self.encoder = Owl2AbstractorEncoder(config)

    def forward(self, image_embeds: torch.Tensor, output_attentions: bool = False) -> Owl2AbstractorOutputs:
        """image_embeds [N, T, Dv] (ViT output, CLS first) → features [N, Q+1, D]."""
        N = image_embeds.shape[0]
        h = self.query_embeds.expand(N, -1, -1)  # [N, Q, Da]
        outs, attns = [], []
        for layer in self.encoder.layers:
            h, probs = layer(h, image_embeds, output_attentions)
            outs.append(h)
            attns.append(probs)
        feats = torch.cat([self.visual_fc(h), self.vit_eos.expand(N, -1, -1)], dim=1)  # [N, Q+1, D]
        return Owl2AbstractorOutputs(feats, tuple(outs), tuple(attns) if output_attentions else None)
