"""Observe a stock transformers model's decoder attention through transformers' attention registry.

transformers dispatches every attention call to ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``
(``module, query, key, value, attention_mask, scaling, dropout, **kwargs``). :func:`install`
registers two functions of our own under the names in :data:`OBSERVED` — each runs the *stock*
SDPA or eager computation unchanged — switches the model's text decoder to the matching one
(``set_attn_implementation``; no modeling code is forked or patched) and adds the lab's hook points:

* ``hook_layout`` on the root: a :class:`SequenceLayout` built from ``input_ids`` (the image token
  id marks visual tokens), ``attention_mask`` and the cache length, once per forward
  (a forward pre-hook on the root emits it);
* ``<decoder layer>.self_attn.hook_attn``: the :class:`AttentionEvent` of every decoder softmax,
  with the boolean "allowed" mask derived from the 4-D mask transformers hands the kernel (or the
  causal rule when it hands none), so hooks see exactly the softmax the kernel computes.

The module sits with the models (like the Owl attention core, it *emits* events; ``hooks`` only
consumes them), so the registry can name :func:`install` as the llava family's ``prepare`` step.

When no hook is registered the functions only call the stock kernel, so installed and plain models
give bitwise equal logits. The knockout slot is the attention core's (:mod:`owl_lab.models.attention`):
``module.attention_edit(event) -> keep mask | None`` is ANDed into the kernel's mask (a row left empty
keeps its own key), and the observation event carries the edited mask, so capture inside a knockout
records the softmax actually used.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from owl_lab.models.attention import Allowed, sdpa_with_logsumexp
from owl_lab.models.attention import _apply_edit as apply_edit  # the core's knockout step, shared
from owl_lab.models.observe import (
    TOKEN_GENERATED,
    TOKEN_IMAGE,
    TOKEN_PAD,
    TOKEN_TEXT,
    AttentionEvent,
    HookPoint,
    SequenceLayout,
)

#: our registered implementation name → the stock implementation it runs
OBSERVED = {"owl_lab_sdpa": "sdpa", "owl_lab_eager": "eager"}
_WRAPPING = {stock: ours for ours, stock in OBSERVED.items()}
#: where the decoder layers live in the stock VLMs we know (model attribute path)
DECODER_LAYERS = {"llava": "model.language_model.layers"}


@dataclass
class SequenceState:
    """What the attention function needs beyond its arguments, refreshed once per forward."""

    key_image: torch.Tensor | None = None  # [B, P+L] image index of every sequence position, -1 text
    layout: SequenceLayout | None = None
    images_per_sample: list[int] = field(default_factory=list)


def _stock_kernel(module: nn.Module, stock: str):
    if stock == "sdpa":
        return sdpa_attention_forward
    # the eager reference lives in the module's own modeling file (transformers' convention)
    return sys.modules[type(module).__module__].eager_attention_forward


def _allowed(attention_mask: torch.Tensor | None, B: int, Lq: int, Lk: int, device) -> Allowed:
    """The kernel's mask as the lab's :class:`Allowed`: transformers' 4-D mask (bool or additive,
    [B|1, 1, Lq, >=Lk]) read in row chunks, or the causal rule when it hands the kernel none."""
    if attention_mask is None:  # is_causal (or one decode query, for which causal = every key)
        return Allowed((B, Lq, Lk), fast="causal", device=device)

    def rows(q0: int, q1: int) -> torch.Tensor:
        m = attention_mask[:, 0, q0:q1, :Lk]
        m = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
        return m.expand(B, -1, -1)

    return Allowed((B, Lq, Lk), rows=rows)


def _kernel_mask(allowed: Allowed, stock: str, dtype: torch.dtype) -> torch.Tensor:
    """An edited :class:`Allowed` in the form transformers' kernel takes: bool [B, 1|H, Lq, Lk] for
    SDPA, additive (0 / finfo.min) for eager."""
    if stock == "eager":
        return allowed.additive(dtype)
    mask = allowed.tensor()
    return mask if mask.dim() == 4 else mask[:, None]


def _observed(name: str):
    stock = OBSERVED[name]

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        edit = getattr(module, "attention_edit", None)  # the knockout slot (hooks.knockout)
        hook = getattr(module, "hook_attn", None)
        observe = hook is not None and hook.active
        event = None
        if edit is not None or observe:
            event = _event(module, query, key, attention_mask, scaling)
            if edit is not None:
                edited = apply_edit(edit, event)
                if edited is not None:  # None = the edit keeps every key: the stock call stays untouched
                    event.allowed = edited
                    attention_mask = _kernel_mask(edited, stock, query.dtype)
        kernel = _stock_kernel(module, stock)
        if observe and stock == "sdpa":  # the same kernel, its SDPA call also handing out the logsumexp
            with _LogsumexpMode() as mode:
                out, weights = kernel(
                    module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
                )
            lse = mode.logsumexp
            if lse is not None and tuple(lse.shape) == tuple(query.shape[:3]):
                event.logsumexp = lse
        else:
            out, weights = kernel(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        if observe:
            event.probs = weights
            hook(event)
        return out, weights

    attention.__name__ = f"{name}_attention"
    return attention


class _LogsumexpMode(TorchFunctionMode):
    """Routes the stock kernel's ``F.scaled_dot_product_attention`` call, arguments untouched, through
    :func:`sdpa_with_logsumexp` (the op SDPA dispatches to on CPU: bitwise the same output) and keeps
    the logsumexp it returns (None when SDPA would use another backend). Every other call passes through."""

    def __init__(self):
        super().__init__()
        self.logsumexp: torch.Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            out, self.logsumexp = sdpa_with_logsumexp(*args, **kwargs)
            return out
        return func(*args, **kwargs)


def _event(module, query, key, attention_mask, scaling) -> AttentionEvent:
    B, _, Lq, D = query.shape
    Lk = key.shape[2]
    state: SequenceState | None = getattr(module, "owl_sequence", None)
    key_image = state.key_image if state is not None else None
    if key_image is None or key_image.shape != (B, Lk):
        key_image = torch.full((B, Lk), -1, dtype=torch.long)
    return AttentionEvent(
        layer=int(module.layer_idx),
        kind="self",
        query=query,
        key=key,
        scale=float(scaling if scaling is not None else D**-0.5),
        query_index=torch.arange(Lk - Lq, Lk, device=query.device),
        key_position=torch.arange(Lk, device=query.device).expand(B, -1),
        key_image=key_image.to(query.device),
        allowed=_allowed(attention_mask, B, Lq, Lk, query.device),
    )


def register() -> None:
    """Register the observed attention functions (and their masks) with transformers; idempotent."""
    for name, stock in OBSERVED.items():
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, _observed(name))
            AttentionMaskInterface.register(name, sdpa_mask if stock == "sdpa" else eager_mask)


def _get(root: nn.Module, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layers of a supported stock model (ValueError otherwise)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DECODER_LAYERS:
        raise ValueError(
            f"no attention observer for model_type={model_type!r}; supported: {sorted(DECODER_LAYERS)}"
        )
    return _get(model, DECODER_LAYERS[model_type])


def install(model: nn.Module) -> nn.Module:
    """Make a stock transformers VLM observable by ``hooks`` (idempotent; returns the model).

    Switches the text decoder's attention to the observed twin of its current implementation
    (``sdpa`` → ``owl_lab_sdpa``, ``eager`` → ``owl_lab_eager``; anything else is a ValueError) and
    adds ``hook_layout`` / ``self_attn.hook_attn`` hook points (no parameters, no state-dict keys).
    """
    layers = decoder_layers(model)
    if getattr(model, "owl_sequence", None) is not None:
        return model
    register()
    text_config = model.config.get_text_config()
    current = text_config._attn_implementation
    if current not in _WRAPPING and current not in OBSERVED:
        raise ValueError(f"cannot observe attn_implementation={current!r}; supported: {sorted(_WRAPPING)}")
    model.set_attn_implementation({"text_config": _WRAPPING.get(current, current)})
    state = SequenceState()
    object.__setattr__(model, "owl_sequence", state)  # plain attribute, not a submodule
    model.hook_layout = HookPoint()
    for layer in layers:
        layer.self_attn.hook_attn = HookPoint()
        object.__setattr__(layer.self_attn, "owl_sequence", state)
        layer.self_attn.attention_edit = None  # the knockout slot
        layer.self_attn.num_heads = text_config.num_attention_heads  # read by hooks.knockout (heads=)
    model.register_forward_pre_hook(_layout_prehook, with_kwargs=True)
    return model


def _layout_prehook(model, args, kwargs):
    """Root forward pre-hook: refresh the sequence state; emit the layout when someone listens."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if input_ids is None:
        if model.hook_layout.active:
            raise ValueError("hooks need input_ids to find the image tokens (got inputs_embeds only)")
        return None
    layout = sequence_layout(
        model.config,
        input_ids,
        kwargs.get("attention_mask"),
        kwargs.get("past_key_values", kwargs.get("cache")),
        model.owl_sequence,
    )
    if model.hook_layout.active:
        model.hook_layout(layout)
    return None


def sequence_layout(
    config, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache, state: SequenceState
) -> SequenceLayout:
    """SequenceLayout of one forward from ``input_ids`` [B, L], ``attention_mask`` [B, P+L] and the cache."""
    B, L = input_ids.shape
    P = int(cache.get_seq_length()) if cache is not None else 0
    ids = input_ids.detach().cpu()
    per_image = int(config.image_seq_length)
    is_image = ids == config.image_token_id  # [B, L]
    image_index = torch.where(is_image, (is_image.cumsum(1) - 1) // per_image, torch.full_like(ids, -1))
    if P and (state.key_image is None or state.key_image.shape != (B, P)):
        previous = torch.full((B, P), -1, dtype=torch.long)
    else:
        previous = state.key_image[:, :P] if P else torch.empty(B, 0, dtype=torch.long)
    if P:  # images arrive in the prefill; later positions are generated tokens
        image_index = torch.full_like(ids, -1)
    state.key_image = torch.cat([previous, image_index], dim=1)  # [B, P+L]
    mask = attention_mask.detach().cpu() if attention_mask is not None else None
    padded = mask is not None and bool((mask == 0).any())
    kind = torch.full_like(ids, TOKEN_GENERATED if P else TOKEN_TEXT).masked_fill(
        is_image & (P == 0), TOKEN_IMAGE
    )
    if mask is not None:
        kind = kind.masked_fill(mask[:, -L:] == 0, TOKEN_PAD)
    if P == 0:
        state.images_per_sample = (is_image.sum(1) // per_image).tolist()
    counts = list(getattr(state, "images_per_sample", [0] * B))  # decode steps keep the prefill's images
    layout = SequenceLayout(
        past_length=P,
        token_kind=kind,
        image_index=image_index,
        attention_mask=mask if padded else None,
        images_per_sample=counts,
    )
    state.layout = layout
    return layout
