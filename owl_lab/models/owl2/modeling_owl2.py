"""mPLUG-Owl2: LLaMA decoder with the modality-adaptive module (MAM), plus the vision side.

Per token t with modality m_t (0 text, 1 vision), one pre-norm LLaMA block (owl2 SPEC §3.5):

    a = RMSNorm_in^{m}(h);  q = W_q a;  k = W_k^{m} a;  v = W_v^{m} a;  RoPE(q, k)
    h = h + W_o · softmax(q kᵀ/√hd + mask) v          (one causal softmax over both modalities)
    h = h + MLP(RMSNorm_post^{m}(h))                 (MLP, W_q, W_o shared)

Per-modality modules hold two copies under ``.multiway.{0,1}`` (official key names); a token uses
copy m_t (per-token select). With ``config.modality_adaptive=False`` they are single stock modules.
The block itself is in ``modality_adaptive_owl2.py``, the ViT and abstractor in ``modeling_owl2_vision.py``.

Every softmax (decoder, ViT, abstractor) runs through the attention core
(:mod:`owl_lab.models.attention`). Writable sites per block: ``hook_resid_pre`` → ``hook_attn_out`` →
``hook_resid_mid`` → ``hook_mlp_out`` → ``hook_resid_post`` ([B, L, D]) and ``self_attn.hook_z``
([B, L, H, hd], context before ``W_o``); ``model.hook_image_embeds`` carries the image rows.

Shapes: B batch, L positions in this call, P cached positions, H heads, Hkv KV heads, hd head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from ..attention import check_attn_implementation
from ..cache_compat import CACHE_FIELD
from ..generation_utils import left_align, prepare_cache, restore_prompt
from ..observe import HookPoint
from .configuration_owl2 import IGNORE_INDEX, IMAGE_TOKEN_INDEX, Owl2Config
from .modality_adaptive_owl2 import Owl2DecoderLayer
from .modeling_owl2_vision import (
    Owl2AbstractorAttention,
    Owl2VisionEmbeddings,
    Owl2VisionModel,
    Owl2VisualAbstractor,
)
from .sequence_owl2 import Owl2Cache, Owl2Sequence, build_sequence


class Owl2PreTrainedModel(PreTrainedModel):
    config_class = Owl2Config
    config: Owl2Config
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _no_split_modules = ["Owl2DecoderLayer", "Owl2VisionLayer", "Owl2AbstractorLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]  # cache: its transformers >= 5.24 name

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, Owl2VisionEmbeddings):
            init.normal_(module.position_embedding, std=std)
            if hasattr(module, "cls_token"):
                init.normal_(module.cls_token, std=std)
        elif isinstance(module, Owl2VisualAbstractor):
            init.normal_(module.query_embeds, std=std)
            init.normal_(module.vit_eos, std=std)
        elif isinstance(module, Owl2AbstractorAttention):  # deterministic tables, not weights
            q_pos, k_pos = module.position_tables()
            init.copy_(module.q_pos_embed, q_pos)
            init.copy_(module.k_pos_embed, k_pos)

    def rebuild_buffers(self, device=None) -> None:
        """Recompute every non-persistent buffer (RoPE inv_freq, abstractor sin-cos tables) on
        ``device`` — needed after building on the meta device and loading weights with assign."""
        for module in self.modules():
            if isinstance(module, Owl2AbstractorAttention):
                q_pos, k_pos = module.position_tables()
                module.register_buffer("q_pos_embed", q_pos.to(device), persistent=False)
                module.register_buffer("k_pos_embed", k_pos.to(device), persistent=False)
            elif isinstance(module, LlamaRotaryEmbedding):
                init_fn = (
                    module.compute_default_rope_parameters
                    if module.rope_type == "default"
                    else ROPE_INIT_FUNCTIONS[module.rope_type]
                )
                inv_freq, module.attention_scaling = init_fn(module.config)
                module.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
                module.register_buffer("original_inv_freq", inv_freq.clone().to(device), persistent=False)


class Owl2Model(Owl2PreTrainedModel):
    """``model.*``: embeddings, MAM decoder, final norm, and the vision tower + abstractor."""

    def __init__(self, config: Owl2Config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([Owl2DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)  # shared, not multiway
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.vision_model = Owl2VisionModel(config)
        self.visual_abstractor = Owl2VisualAbstractor(config)
        self.hook_image_embeds = HookPoint()  # [N, Q+1, D] image rows the decoder consumes
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, S, S] → [N, Q+1, D]: ViT → abstractor → visual_fc, then vit_eos."""
        image_embeds = self.vision_model(pixel_values).last_hidden_state  # [N, T, Dv]
        return self.hook_image_embeds(self.visual_abstractor(image_embeds).features)

    def build_sequence(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        labels=None,
        position_ids=None,
        inputs_embeds=None,
        modality_indicators=None,
        past_key_values=None,
    ) -> Owl2Sequence:
        """The expanded decoder input (embeds, modality indicators, mask, positions); see sequence_owl2."""
        return build_sequence(
            self,
            input_ids,
            pixel_values,
            attention_mask,
            labels,
            position_ids,
            inputs_embeds,
            modality_indicators,
            past_key_values,
        )

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        modality_indicators=None,
        use_cache=None,
        output_attentions=False,
        output_hidden_states=False,
        images=None,
        sequence: Owl2Sequence | None = None,
        cache=None,
    ) -> BaseModelOutputWithPast:
        """Decoder forward. Returns last_hidden_state [B, L, D] (after ``norm``) over the expanded
        sequence; hidden_states follow the official (transformers 4.31) convention: the input of every
        layer, then the final normed output. ``cache=`` is the transformers >= 5.24 name of
        ``past_key_values=`` (see cache_compat)."""
        past_key_values, use_cache = prepare_cache(self.config, use_cache, past_key_values, cache, Owl2Cache)
        if sequence is None:
            sequence = self.build_sequence(
                input_ids,
                _pixels(pixel_values, images),
                attention_mask,
                None,
                position_ids,
                inputs_embeds,
                modality_indicators,
                past_key_values,
            )
        cache = Owl2Cache.adopt(past_key_values) if use_cache else None
        if cache is not None:
            cache.remember(sequence.attention_mask, sequence.key_image)

        h = sequence.inputs_embeds
        modality = sequence.modality_indicators if sequence.has_vision else None
        cos_sin = self.rotary_emb(h, position_ids=sequence.position_ids)  # 2 × [B, L, hd]
        hidden, attns = [], []
        for layer in self.layers:
            hidden.append(h)
            h, probs = layer(h, modality, cos_sin, sequence, cache, output_attentions)
            attns.append(probs)
        h = self.norm(h)
        hidden.append(h)  # official convention: layer inputs, then the final normed output
        return BaseModelOutputWithPast(
            last_hidden_state=h,
            **{CACHE_FIELD: cache},
            hidden_states=tuple(hidden) if output_hidden_states else None,
            attentions=tuple(attns) if output_attentions else None,
        )


def _pixels(pixel_values, images):
    """``images=`` is the official name of ``pixel_values=``."""
    if images is not None and pixel_values is not None:
        raise ValueError("Pass images either as pixel_values= or as images=, not both.")
    return pixel_values if pixel_values is not None else images


class Owl2ForCausalLM(Owl2PreTrainedModel, GenerationMixin):
    """mPLUG-Owl2 (``MPLUGOwl2LlamaForCausalLM``): logits over the expanded sequence, image rows included."""

    def __init__(self, config: Owl2Config):
        super().__init__(config)
        self.model = Owl2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.hook_layout = HookPoint()
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

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
        images=None,
        modality_indicators=None,
        logits_to_keep=0,
        cache=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """input_ids [B, Lt] with -200 markers; pixel_values (alias images) [N_img, 3, S, S];
        attention_mask [B, Lt]; labels [B, Lt] → logits [B, L, V] over the expanded sequence.
        ``cache=`` is the transformers >= 5.24 name of ``past_key_values=`` (generate passes it)."""
        if kwargs:
            raise TypeError(f"Unexpected arguments for Owl2ForCausalLM.forward: {sorted(kwargs)}")
        check_attn_implementation(self.config)
        past_key_values, use_cache = prepare_cache(self.config, use_cache, past_key_values, cache, Owl2Cache)
        output_attentions = bool(
            output_attentions if output_attentions is not None else self.config.output_attentions
        )
        output_hidden_states = bool(
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )

        seq = self.model.build_sequence(
            input_ids,
            _pixels(pixel_values, images),
            attention_mask,
            labels,
            position_ids,
            inputs_embeds,
            modality_indicators,
            past_key_values,
        )
        if self.hook_layout.active:
            self.hook_layout(seq.layout())
        out = self.model(
            past_key_values=past_key_values,
            use_cache=use_cache,
            sequence=seq,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:] if isinstance(logits_to_keep, int) else h[:, logits_to_keep]
        logits = self.lm_head(h)  # [B, L, V]

        loss = None
        if seq.labels is not None:  # next-token CE over the expanded sequence (image rows are -100)
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(
                shift_logits, seq.labels[:, 1:].reshape(-1).to(logits.device), ignore_index=IGNORE_INDEX
            )
        result = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_FIELD: getattr(out, CACHE_FIELD)},
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )
        return result if return_dict is None or return_dict else result.to_tuple()

    # ---- generation ---------------------------------------------------------------------------
    def generate(self, input_ids=None, attention_mask=None, pixel_values=None, images=None, **kwargs):
        """HF generate with the image alias and right padding handled: right-padded prompts are
        moved to left padding for decoding (the returned prompt part is the caller's input_ids)."""
        pixel_values = _pixels(pixel_values, images)
        if pixel_values is not None:
            kwargs["pixel_values"] = pixel_values
        if input_ids is None:
            return super().generate(attention_mask=attention_mask, **kwargs)
        ids, mask, order = left_align(input_ids, attention_mask)
        out = super().generate(input_ids=ids, attention_mask=mask, **kwargs)
        return out if order is None else restore_prompt(out, input_ids)

    def prepare_inputs_for_generation(self, *args, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        # generate derives position ids in *input* space (-200 counted once); ours come from the
        # expanded mask remembered on the cache, so drop them
        inputs.pop("position_ids", None)
        return inputs

    def _expand_inputs_for_generation(
        self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs
    ):
        """Beams / num_return_sequences: repeat each *sample's* block of images, not each image."""
        pixel_values = model_kwargs.pop("pixel_values", None)
        if pixel_values is not None and expand_size > 1 and input_ids is not None:
            counts = (input_ids == IMAGE_TOKEN_INDEX).sum(1).tolist()
            blocks = pixel_values.split(counts)
            pixel_values = torch.cat([b for b in blocks for _ in range(expand_size)])
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        if pixel_values is not None:
            model_kwargs["pixel_values"] = pixel_values
        return input_ids, model_kwargs


__all__ = ["Owl2ForCausalLM", "Owl2Model", "Owl2PreTrainedModel"]
