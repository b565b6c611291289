"""The Owl3 vision path: transformers' SigLIP tower with the lab's observation points, and the projector.

mPLUG-Owl3 reads SigLIP's penultimate hidden states (``hidden_states[-2]``: no last layer, no
post-norm, no head) and projects them to the decoder width with ``vision2text_model``: one Linear
(240728) or Linear-GELU-Linear (241101).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import SiglipVisionModel
from transformers.models.siglip.modeling_siglip import SiglipAttention

from owl_lab.models.attention import Allowed, attention
from owl_lab.models.observe import HookPoint
from owl_lab.models.observe_vision import vision_key_facts
from owl_lab.models.owl3.configuration_owl3 import Owl3Config


class Owl3VisionAttention(SiglipAttention):
    """transformers' SigLIP attention (same keys, same projections) run through the attention core.

    q/k/v come from SigLIP's own projections; the softmax is the core's (:func:`attention`, kind
    ``vision``): SDPA with no mask, or the eager kernel with an fp32 softmax, which are exactly the
    two kernels transformers' SigLIP calls. So the numbers are unchanged, while the event carries the
    q/k the kernel used (``hook_attn``) and a knockout can edit the encoder like any other attention.
    SigLIP has no CLS token. An attention mask (the Owl3 tower never passes one) or attention dropout
    in training falls back to transformers' own forward.
    """

    def __init__(self, config, layer_idx: int):
        super().__init__(config)
        self.layer_idx = layer_idx
        self.hook_attn = HookPoint()

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        if attention_mask is not None or (self.training and self.dropout > 0):
            return super().forward(hidden_states, attention_mask, **kwargs)
        n, t, _ = hidden_states.shape
        shape = (n, t, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)  # [N, h, T, hd]
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        grid = self.config.image_size // self.config.patch_size
        allowed = Allowed((n, t, t), fast="all", device=hidden_states.device)

        def describe() -> dict:
            return vision_key_facts(n, t, (grid, grid), False, hidden_states.device)

        ctx, probs, _ = attention(self, q, k, v, allowed, self.scale, "vision", describe)
        ctx = ctx.transpose(1, 2).reshape(n, t, -1)  # [N, T, h*hd]
        return self.out_proj(ctx), probs


def observed_siglip(vision_config) -> SiglipVisionModel:
    """transformers' SigLIP tower whose attentions are :class:`Owl3VisionAttention` (same keys)."""
    tower = SiglipVisionModel(vision_config)
    # observation points of kind vision (transformers' SigLIP attention has none)
    for k, vision_layer in enumerate(tower.encoder.layers):
        vision_layer.self_attn = Owl3VisionAttention(vision_config, k)
    return tower


def projector(config: Owl3Config) -> nn.Module:
    """``vision2text_model``: SigLIP width V → decoder width H (Linear, or Linear-GELU-Linear for "mlp")."""
    v, h = config.vision_config.hidden_size, config.hidden_size
    if config.projector == "mlp":
        return nn.Sequential(nn.Linear(v, h), nn.GELU(), nn.Linear(h, h))
    return nn.Linear(v, h)


def penultimate_hidden_states(tower: SiglipVisionModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """pixel_values [N, 3, S, S] → SigLIP ``hidden_states[-2]`` [N, T, V] (the last layer never runs)."""
    hidden = tower.embeddings(pixel_values.to(tower.embeddings.patch_embedding.weight.dtype))  # [N, T, V]
    for layer in tower.encoder.layers[:-1]:
        hidden = layer(hidden, None)
    return hidden
