"""The Owl3 language model: Qwen2 blocks whose hyper layers also cross-attend to the images.

``Owl3TextModel`` builds one :class:`AttnContext` per forward (masks, rotary and MI-RoPE tables,
image keys) and runs the blocks; ``Owl3LanguageModel`` only gives the official key names
``language_model.model.*`` / ``language_model.lm_head``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm, Qwen2RotaryEmbedding

from owl_lab.models.observe import (
    HookPoint,
)
from owl_lab.models.owl3.configuration_owl3 import Owl3Config
from owl_lab.models.owl3.hyper_attention_owl3 import AttnContext, Owl3Attention, Owl3HyperAttention


class Owl3DecoderLayer(nn.Module):
    """Pre-norm Qwen2 block; in hyper layers the same ``input_layernorm`` also normalises the images."""

    def __init__(self, config: Owl3Config, layer_idx: int):
        super().__init__()
        self.is_hyper = layer_idx in config.hyper_layer_indices
        attn_cls = Owl3HyperAttention if self.is_hyper else Owl3Attention
        self.self_attn = attn_cls(config, layer_idx)
        self.mlp = Qwen2MLP(config)
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        # writable sites, [B, L, H] each
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, hidden: torch.Tensor, ctx: AttnContext):
        """hidden [B, L, H] → (hidden [B, L, H], (text probs, image probs))."""
        hidden = self.hook_resid_pre(hidden)
        image_normed = None
        if self.is_hyper and ctx.image_embeds is not None:
            # the shared input norm also normalises the images: [M, T, H] (real images)
            image_normed = self.input_layernorm(ctx.image_embeds)
        attn_out, probs = self.self_attn(self.input_layernorm(hidden), ctx, image_normed)
        hidden = self.hook_resid_mid(hidden + self.hook_attn_out(attn_out))
        hidden = hidden + self.hook_mlp_out(self.mlp(self.post_attention_layernorm(hidden)))
        return self.hook_resid_post(hidden), probs


class Owl3TextModel(nn.Module):
    """The Qwen2 decoder with hyper layers (``language_model.model``)."""

    def __init__(self, config: Owl3Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Owl3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=config)

    def mi_rope(self, positions: torch.Tensor):
        """MI-RoPE cos/sin in fp32 for one position per image: positions [B, N] → [B, N, D] each."""
        d = self.config.hidden_size // self.config.num_attention_heads
        theta = self.config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / (
            theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=positions.device).float() / d)
        )
        freqs = positions.float()[..., None] * inv_freq  # [B, N, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # half-split rotation layout
        return emb.cos(), emb.sin()

    def build_context(
        self, embeds, attention_mask, position_ids, cache, image_embeds, image_starts, output_attentions
    ):
        b, n, _ = embeds.shape
        past = cache.get_seq_length() if cache is not None else 0
        query_index = torch.arange(past, past + n, device=embeds.device)  # raw sequence indices
        key_valid, lead = None, torch.zeros(b, dtype=torch.long, device=embeds.device)
        if attention_mask is not None and not bool(attention_mask.all()):
            key_valid = attention_mask.to(embeds.device).bool()
            lead = key_valid.int().argmax(dim=1)  # left padding per row
        # Rotary positions live in the "real token" coordinate (raw index - left padding), the one HF
        # generate builds as cumsum(mask) - 1; MI-RoPE below uses the same coordinate.
        if position_ids is None:
            position_ids = (query_index[None] - lead[:, None]).clamp(min=0)
        ctx = AttnContext(
            batch_size=b,
            past_length=past,
            query_index=query_index,
            key_valid=key_valid,
            position_embeddings=self.rotary_emb(embeds, position_ids),
            cache=cache,
            output_attentions=output_attentions,
        )
        if image_embeds is not None and image_starts.shape[1] > 0:
            starts = image_starts.to(embeds.device)
            valid = starts >= 0  # [B, N]
            t = query_index[None, :, None]  # [1, L, 1]
            s = starts[:, None, :]  # [B, 1, N]
            if self.config.hyper_attention == "fused":
                visible, offset = t >= s, 0  # 241101: the placeholder token itself sees its image
            else:
                visible, offset = s < t, 1  # 240728: strict, MI-RoPE at s_n + 1
            # Only real images enter the hyper layers ([M, T, H], batch-global order): padding slots
            # are masked out of every softmax, and with up to N images per sample they would
            # otherwise multiply the image-side work of a mostly single-image batch by N.
            ctx.image_embeds = image_embeds[valid].to(embeds.dtype)
            ctx.image_valid = valid
            ctx.image_visible = visible & valid[:, None, :]  # [B, L, N]
            if self.config.mi_rope:
                ctx.mi_positions = torch.where(valid, starts + offset - lead[:, None], -1)
                ctx.mi_cos, ctx.mi_sin = self.mi_rope(ctx.mi_positions.clamp(min=0))
        return ctx

    def forward(
        self,
        inputs_embeds,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        image_embeds=None,
        image_starts=None,
        output_attentions=False,
        output_hidden_states=False,
    ):
        """inputs_embeds [B, L, H] → final-normed hidden [B, L, H], hidden-state tuple, probs per layer."""
        ctx = self.build_context(
            inputs_embeds,
            attention_mask,
            position_ids,
            past_key_values,
            image_embeds,
            image_starts,
            output_attentions,
        )
        hidden = inputs_embeds
        all_hidden = [hidden] if output_hidden_states else None
        self_probs, image_probs = [], []
        for i, layer in enumerate(self.layers):
            hidden, (p_text, p_img) = layer(hidden, ctx)
            self_probs.append(p_text)
            image_probs.append(p_img)
            if output_hidden_states and i < len(self.layers) - 1:
                all_hidden.append(hidden)  # official tuple: input of layer i+1
        hidden = self.norm(hidden)
        if output_hidden_states:
            all_hidden.append(hidden)  # official tuple ends with the final-norm output
        return hidden, all_hidden, self_probs, image_probs


class Owl3LanguageModel(nn.Module):
    """Container giving the official ``language_model.model`` / ``language_model.lm_head`` key names."""

    def __init__(self, config: Owl3Config):
        super().__init__()
        self.model = Owl3TextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
