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
layers (see ``hyper_attention_owl3.py``; the blocks are in ``modeling_owl3_text.py``, the SigLIP tower
and projector in ``modeling_owl3_vision.py``). Nothing is stored between calls: decode steps get the
images and their placeholder starts again (``generate`` does this for you, also under beam search).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from owl_lab.models.attention import check_attn_implementation
from owl_lab.models.cache_compat import CACHE_FIELD
from owl_lab.models.generation_utils import left_align, prepare_cache, restore_prompt
from owl_lab.models.observe import (
    HookPoint,
)
from owl_lab.models.owl3.configuration_owl3 import Owl3Config, complete_config, load_config
from owl_lab.models.owl3.hyper_attention_owl3 import Owl3HyperAttention
from owl_lab.models.owl3.media_owl3 import owl3_layout, pad_per_sample, resolve_media
from owl_lab.models.owl3.modeling_owl3_text import Owl3LanguageModel
from owl_lab.models.owl3.modeling_owl3_vision import observed_siglip, penultimate_hidden_states, projector


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
        self.vision_model = observed_siglip(config.vision_config)
        self.vision2text_model = projector(config)
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
        hidden = penultimate_hidden_states(self.vision_model, pixel_values)  # [N, T, V]
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
            self.hook_layout(
                owl3_layout(batch, length, past, attention_mask, image_starts, input_ids, self.device)
            )

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
