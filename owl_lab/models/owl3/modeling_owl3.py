"""mPLUG-Owl3, checkpoint-compatible: SigLIP tower → projector → Qwen2 decoder with hyper layers.

Module tree and state-dict keys follow the official ``mPLUGOwl3Model``:

    Owl3ForCausalLM
    ├── language_model                 language_model.model.* / language_model.lm_head.weight
    │   ├── model (Owl3TextModel)      embed_tokens, layers.{i}.{self_attn,mlp,*_layernorm}, norm
    │   └── lm_head
    ├── vision_model (SiglipVisionModel)  embeddings.*, encoder.layers.*, post_layernorm.*, head.*
    └── vision2text_model              Linear (240728) or Sequential(Linear, GELU, Linear) (241101)

Images never enter the token sequence: image features (SigLIP ``hidden_states[-2]``, no post-norm,
no head, projected to the LLM width) are handed to every decoder layer and used only by the hyper
layers (see ``hyper_attention_owl3.py``). Nothing is stored between calls: decode steps get the
images and their placeholder starts again (``generate`` does this for you, also under beam search).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, SiglipVisionModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm, Qwen2RotaryEmbedding
from transformers.models.siglip.modeling_siglip import SiglipAttention

from owl_lab.models.attention import Allowed, attention, check_attn_implementation
from owl_lab.models.cache_compat import CACHE_FIELD
from owl_lab.models.generation_utils import left_align, prepare_cache, restore_prompt
from owl_lab.models.observe import (
    TOKEN_GENERATED,
    TOKEN_PAD,
    TOKEN_PLACEHOLDER,
    TOKEN_TEXT,
    HookPoint,
    SequenceLayout,
)
from owl_lab.models.observe_vision import vision_key_facts
from owl_lab.models.owl3.configuration_owl3 import Owl3Config, complete_config, load_config
from owl_lab.models.owl3.hyper_attention_owl3 import AttnContext, Owl3Attention, Owl3HyperAttention
from owl_lab.models.owl3.media_owl3 import pad_per_sample, resolve_media


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


@dataclass
class Owl3CausalLMOutputWithPast(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus ``cross_attentions`` (eager path, per layer, None for plain layers).

    With ``output_attentions=True``: ``attentions[i]`` [B, nH, L, Lk] are the probabilities on the
    text keys for every layer; ``cross_attentions[i]`` [B, nH, L, N*T] those on the image keys of a
    hyper layer (images of the sample in order, T columns each, padding slots 0). For gated /
    static_gate / sum layers they are two separate softmaxes (cross rows of tokens that see no image
    are 0); for fused layers they are the two column blocks of ONE softmax (rows sum to 1 together).
    """

    cross_attentions: tuple | None = None


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
            image_normed = self.input_layernorm(
                ctx.image_embeds
            )  # shared input norm, [M, T, H] (real images)
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


class Owl3PreTrainedModel(PreTrainedModel):
    config: Owl3Config
    config_class = Owl3Config
    base_model_prefix = "owl3"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _no_split_modules = ["Owl3DecoderLayer", "SiglipEncoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]  # cache: its transformers >= 5.24 name

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, Owl3HyperAttention) and hasattr(module, "gate"):
            init.zeros_(module.gate)  # static gate starts at g = 0.5


class Owl3ForCausalLM(Owl3PreTrainedModel, GenerationMixin):
    """mPLUG-Owl3 (all four released variants plus the lab's ablations), see module docstring.

    ``forward`` takes the processor's batch: ``input_ids`` [B, L], ``attention_mask`` [B, L] (right or
    left padding), ``pixel_values`` [N_img, 3, S, S] (batch-global, order of appearance) and
    ``media_offset`` (dense [B, L, 2] with batch-global bases, or the 241101 list of start tensors).
    Alternatively pass ``image_embeds`` [B, N, T, H] with ``image_starts`` [B, N] (-1 = no image),
    the stateless per-sample form ``generate`` uses for decode steps.
    """

    _tied_weights_keys = {"language_model.lm_head.weight": "language_model.model.embed_tokens.weight"}

    def __init__(self, config: Owl3Config):
        super().__init__(config)
        missing = [f for f in ("hyper_attention", "projector") if getattr(config, f) is None]
        if missing:
            raise ValueError(
                f"Owl3Config.{' and '.join(missing)} is unset "
                "(official configs do not say which hyper-attention "
                "variant / projector they use). "
                "Load official checkpoints with owl_lab.models.owl3.load_checkpoint "
                "or Owl3ForCausalLM.from_pretrained, which detect them from the weight names, or set them."
            )
        self.language_model = Owl3LanguageModel(config)
        self.vision_model = SiglipVisionModel(config.vision_config)
        # observation points of kind vision (transformers' SigLIP attention has none)
        for k, vision_layer in enumerate(self.vision_model.encoder.layers):
            vision_layer.self_attn = Owl3VisionAttention(config.vision_config, k)
        v, h = config.vision_config.hidden_size, config.hidden_size
        if config.projector == "mlp":
            self.vision2text_model = nn.Sequential(nn.Linear(v, h), nn.GELU(), nn.Linear(h, h))
        else:
            self.vision2text_model = nn.Linear(v, h)
        self.hook_image_embeds = HookPoint()  # [N, T, H] projected patch features
        self.hook_layout = HookPoint()
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        """transformers ``from_pretrained``; for official configs the variant is detected from the keys."""
        if config is None:
            config = load_config(pretrained_model_name_or_path)
        elif isinstance(config, Owl3Config) and Path(pretrained_model_name_or_path).is_dir():
            config = complete_config(config, pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)

    def get_input_embeddings(self):
        return self.language_model.model.embed_tokens

    def set_input_embeddings(self, value):
        self.language_model.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.language_model.lm_head

    def set_output_embeddings(self, value):
        self.language_model.lm_head = value

    # ---- images ---------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, S, S] → projected features [N, T, H] (SigLIP hidden_states[-2])."""
        size = self.config.vision_config.image_size
        if (
            pixel_values.dim() != 4
            or pixel_values.shape[1] != 3
            or tuple(pixel_values.shape[-2:]) != (size, size)
        ):
            raise ValueError(
                f"pixel_values must be [N_images, 3, {size}, {size}] for this checkpoint; got "
                f"{tuple(pixel_values.shape)}. Use the Owl3Processor (it resizes to {size} px)."
            )
        tower = self.vision_model
        hidden = tower.embeddings(pixel_values.to(tower.embeddings.patch_embedding.weight.dtype))  # [N, T, V]
        for layer in tower.encoder.layers[:-1]:  # hidden_states[-2]: skip the last layer, post-norm, head
            hidden = layer(hidden, None)
        return self.hook_image_embeds(self.vision2text_model(hidden))  # [N, T, H]

    def prepare_images(self, pixel_values, media_offset, input_ids_shape, attention_mask=None):
        """Processor inputs → (image_embeds [B, N, T, H], image_starts [B, N]) or (None, None)."""
        batch = input_ids_shape[0]
        n_img = 0 if pixel_values is None else pixel_values.shape[0]
        starts, index = resolve_media(media_offset, n_img, batch, attention_mask)
        if n_img == 0:
            return None, None
        return pad_per_sample(self.encode_images(pixel_values), starts, index)

    # ---- forward ----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        pixel_values=None,
        media_offset=None,
        image_embeds=None,
        image_starts=None,
        logits_to_keep=0,
        cache=None,
        **kwargs,
    ):
        """One decoder pass (prefill or decode step) → :class:`Owl3CausalLMOutputWithPast`.

        Shapes: input_ids [B, L]; attention_mask [B, P + L] (P cached positions); pixel_values
        [N_img, 3, S, S]; labels [B, L] (-100 = ignored; shifted inside) → ``loss``; logits [B, L, V]
        in fp32. ``position_ids`` default to the real-token coordinate (raw index minus left padding),
        which is also where MI-RoPE puts the images. Decode steps need the images again (pixel_values +
        the prompt's media_offset, or image_embeds + image_starts): nothing is kept between calls.
        ``cache=`` is the transformers >= 5.24 name of ``past_key_values=`` (generate passes it; without
        the explicit parameter it would vanish into ``**kwargs``).
        """
        check_attn_implementation(self.config)  # before the SigLIP tower, which would run anything
        past_key_values, use_cache = prepare_cache(self.config, use_cache, past_key_values, cache)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.language_model.model.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        self._check_attention_mask(attention_mask, batch, past + length)
        if image_embeds is None and (pixel_values is not None or media_offset is not None):
            image_embeds, image_starts = self.prepare_images(
                pixel_values, media_offset, (batch, length), attention_mask
            )
        elif image_embeds is not None and (
            image_starts is None or image_starts.shape != image_embeds.shape[:2]
        ):
            raise ValueError("image_embeds [B, N, T, H] needs image_starts [B, N] (-1 for padding slots).")
        if self.hook_layout.active:
            self.hook_layout(self._layout(batch, length, past, attention_mask, image_starts, input_ids))

        output_attentions = bool(
            self.config.output_attentions if output_attentions is None else output_attentions
        )
        hidden, all_hidden, self_probs, image_probs = self.language_model.model(
            inputs_embeds,
            attention_mask,
            position_ids,
            past_key_values,
            image_embeds,
            image_starts,
            output_attentions=output_attentions,
            output_hidden_states=bool(output_hidden_states),
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.language_model.lm_head(hidden[:, keep, :]).float()
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        out = Owl3CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_FIELD: past_key_values if use_cache else None},
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(self_probs) if output_attentions else None,
            cross_attentions=tuple(image_probs) if output_attentions else None,
        )
        return out if return_dict is not False else out.to_tuple()

    @staticmethod
    def _check_attention_mask(attention_mask, batch, total):
        if attention_mask is not None and (
            attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, total)
        ):
            raise ValueError(
                f"attention_mask must be 2-D [batch, past + new] = [{batch}, {total}]; "
                f"got {tuple(attention_mask.shape)}."
            )

    def _layout(self, batch, length, past, attention_mask, image_starts, input_ids) -> SequenceLayout:
        device = self.device if input_ids is None else input_ids.device
        kind = torch.full(
            (batch, length), TOKEN_GENERATED if past > 0 else TOKEN_TEXT, dtype=torch.long, device=device
        )
        image_index = torch.full((batch, length), -1, dtype=torch.long, device=device)
        counts = []
        for b in range(batch):
            s = (
                image_starts[b][image_starts[b] >= 0]
                if image_starts is not None
                else torch.zeros(0, dtype=torch.long)
            )
            counts.append(int(s.numel()))
            for n, pos in enumerate(s.tolist()):
                if past <= pos < past + length:
                    kind[b, pos - past] = TOKEN_PLACEHOLDER
                    image_index[b, pos - past] = n
        if attention_mask is not None:
            kind = torch.where(attention_mask[:, past:].to(device) == 0, TOKEN_PAD, kind)
        return SequenceLayout(
            past_length=past,
            token_kind=kind,
            image_index=image_index,
            attention_mask=attention_mask,
            images_per_sample=counts,
        )

    # ---- generation -------------------------------------------------------------------------------
    def generate(
        self,
        input_ids=None,
        attention_mask=None,
        pixel_values=None,
        media_offset=None,
        image_embeds=None,
        image_starts=None,
        **kwargs,
    ):
        """HF ``generate`` with the images converted once into the per-sample form.

        * ``image_embeds``/``image_starts`` carry a batch dimension, so beam search and
          num_return_sequences expand them per row: every beam attends its own sample's images in order.
        * A missing attention_mask means "no padding" (token id 0 is never treated as padding).
        * Padded prompts (the processor pads on the right) are left-aligned internally so that every
          row continues from its own last token; the returned sequences start with the caller's
          ``input_ids`` unchanged, followed by the new tokens.
        """
        if input_ids is None:
            return super().generate(
                attention_mask=attention_mask, image_embeds=image_embeds, image_starts=image_starts, **kwargs
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self._check_attention_mask(attention_mask, *input_ids.shape)
        if image_embeds is None and pixel_values is not None:
            image_embeds, image_starts = self.prepare_images(
                pixel_values, media_offset, input_ids.shape, attention_mask
            )
        elif image_embeds is None and media_offset is not None:
            resolve_media(media_offset, 0, input_ids.shape[0], attention_mask)  # validates: text-only
        ids, mask, order = left_align(input_ids, attention_mask)
        if order is not None and image_starts is not None:
            new_index = torch.argsort(order, dim=1)  # old position → new position
            moved = new_index.gather(1, image_starts.clamp(min=0).to(order.device))
            image_starts = torch.where(image_starts >= 0, moved.to(image_starts.device), -1)
        out = super().generate(
            input_ids=ids, attention_mask=mask, image_embeds=image_embeds, image_starts=image_starts, **kwargs
        )
        return out if order is None else restore_prompt(out, input_ids)
