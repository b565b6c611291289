"""The one attention core of every Owl model (decoder, ViT, abstractor, hyper cross / joint).

Every attention module computes its query/key/value and an :class:`Allowed` mask, then calls
:func:`attention`. That single function

1. applies the module's optional ``attention_edit`` (the knockout slot: an extra boolean mask ANDed
   into ``allowed``),
2. runs one of the two kernels, shaped like transformers' ``AttentionInterface``
   (:func:`eager_attention_forward`, :func:`sdpa_attention_forward`), chosen by
   ``config._attn_implementation`` (``output_attentions`` forces eager),
3. hands the exact inputs to the module's ``hook_attn`` as an :class:`AttentionEvent` carrying the
   same ``allowed`` object the kernel used — so kernel and hooks agree by construction, also under
   a knockout.

Mask convention (:class:`Allowed` / :class:`RowKeep`, in :mod:`owl_lab.models.attention_mask`): ONE boolean
"allowed" mask, True = the query may attend the key. Kernels turn it
into an additive mask (0 / ``finfo.min``, never ``-inf``): a row with no allowed key is then a
near-uniform softmax instead of NaN, the same convention as transformers' LLaMA. A fast path needs
no tensor at all: ``Allowed.fast == "causal"`` (plain causal, SDPA ``is_causal``) or ``"all"``
(every key visible, e.g. one decode query). GQA: SDPA uses ``enable_gqa``, eager repeats K/V.

Knockout slot (used by ``hooks.knockout``)::

    module.attention_edit = fn            # on any module that calls attention()
    fn(event: AttentionEvent) -> Tensor | None
        # event: the facts of this call with event.allowed = the mask before the edit, probs None.
        # Return bool [B, Lq, Lk] or [B, H, Lq, Lk] (or broadcastable to it), True = keep;
        # or RowKeep(q0, keep [B, (H,) c, Lk]) for query rows q0..q0+c-1 only (no [B, Lq, Lk] tensor);
        # None or an all-True mask = no edit (the code path and the numbers stay exactly unedited).
        # Return the SAME object for every layer of one forward: the edited mask is then built once.

Rows the edit leaves with no allowed key: ``self``/``joint`` queries keep their own key (a token
always sees itself); ``cross`` (Owl3 240728) rows behave like tokens that saw no image (the model
keeps the self-attention context); ``abstractor``/``vision`` rows keep their unedited keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.attention
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import repeat_kv

from .attention_mask import Allowed, RowKeep
from .observe import AttentionEvent, AttentionKind

if TYPE_CHECKING:
    from transformers import PretrainedConfig

#: ``attn_implementation`` values the Owl models support.
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


def check_attn_implementation(config: PretrainedConfig) -> str:
    """The config's attention implementation ('sdpa' when unset); ValueError for anything else."""
    name = getattr(config, "_attn_implementation", None) or "sdpa"
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation={name!r} is not supported by the Owl models; "
            f"supported: {', '.join(repr(n) for n in ATTN_IMPLEMENTATIONS)}."
        )
    return name


# ---- kernels (transformers AttentionInterface shape: context [B, H, Lq, D], probs or None) --------


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: Allowed | None,
    scaling: float,
    softmax_dtype: torch.dtype | None = torch.float32,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit softmax attention. query [B, H, Lq, D]; key/value [B, H_kv, Lk, D].

    ``softmax_dtype`` None = softmax in the model dtype (Owl2 ViT and abstractor, as official);
    otherwise the softmax runs in the wider of ``softmax_dtype`` and the model dtype (fp16/bf16
    upcast to fp32 as in HF LLaMA; fp64 stays fp64). Returns context [B, H, Lq, D] and
    probabilities [B, H, Lq, Lk].
    """
    n_rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)  # [B, H, Lk, D]
    scores = (query @ key.transpose(-1, -2)) * scaling  # [B, H, Lq, Lk]
    if allowed is not None and allowed.fast != "all":
        scores = scores + allowed.additive(scores.dtype)
    if softmax_dtype is None:
        probs = torch.softmax(scores, dim=-1)
    else:
        softmax_dtype = torch.promote_types(softmax_dtype, scores.dtype)
        probs = torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(query.dtype)
    return probs @ value, probs


def sdpa_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: Allowed | None,
    scaling: float,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``F.scaled_dot_product_attention``; no mask tensor for ``fast`` masks. Same shapes as eager."""
    mask, is_causal = None, False
    if allowed is not None:
        if allowed.fast == "causal":
            is_causal = True
        elif allowed.fast != "all":
            mask = _edited_bool(allowed)
            if mask is None:
                mask = allowed.additive(query.dtype)  # [B, 1 | H, Lq, Lk]
    gqa = query.shape[1] != key.shape[1]
    if kwargs.get("want_logsumexp"):
        return sdpa_with_logsumexp(
            query, key, value, mask, is_causal=is_causal, scale=scaling, enable_gqa=gqa
        )
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=is_causal, scale=scaling, enable_gqa=gqa
    )
    return out, None


def sdpa_with_logsumexp(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``F.scaled_dot_product_attention`` (same arguments, same output) plus the logsumexp [B, H, Lq] or None.

    When SDPA would pick its CPU flash kernel, that kernel is called directly (the op SDPA itself
    dispatches to), which also returns the log of each row's softmax normaliser — so capture can get
    a group's mass from that group's scores alone. Anything else (other devices or backends, autograd)
    goes through SDPA unchanged and yields no logsumexp. ``tests/owl_lab/models/test_attention_lse.py``
    checks that both calls give bitwise equal outputs.
    """
    args = dict(
        attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
    )
    flash = (
        query.device.type == "cpu"
        and dropout_p == 0.0
        and not torch.is_grad_enabled()
        and torch._fused_sdp_choice(query, key, value, **args) == _FLASH_BACKEND
    )
    if not flash:
        return F.scaled_dot_product_attention(query, key, value, **args), None
    mask = attn_mask
    if mask is not None and mask.dtype == torch.bool:  # what SDPA does with a boolean mask
        mask = torch.where(mask, torch.zeros((), dtype=query.dtype), float("-inf"))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, is_causal, attn_mask=mask, scale=scale
    )
    return out, lse


def _edited_bool(allowed: Allowed) -> torch.Tensor | None:
    """A knockout-edited mask as SDPA's boolean mask [B, 1 | H, Lq, Lk] (no float copy), when every row
    keeps a key (an empty row would be NaN in SDPA, not the additive convention's uniform row); else None."""
    if allowed.unedited is None:
        return None
    mask = allowed.tensor()
    mask = mask if mask.dim() == 4 else mask[:, None]
    return mask if bool(mask.any(-1).all()) else None


_FLASH_BACKEND = int(torch.nn.attention.SDPBackend.FLASH_ATTENTION)

ATTENTION_FUNCTIONS = {"eager": eager_attention_forward, "sdpa": sdpa_attention_forward}


# ---- the one call site ----------------------------------------------------------------------------


def _own_key(event: AttentionEvent, q0: int, q1: int) -> torch.Tensor:
    """bool [B, q1 - q0, Lk]: the key at the query's own sequence position, for query rows q0..q1-1."""
    index = event.query_index[q0:q1].to(event.key_position.device)
    return event.key_position[:, None, :] == index[None, :, None]


def _apply_edit(edit: Callable, event: AttentionEvent) -> Allowed | None:
    """The edited mask, or None when the edit keeps every key (then nothing changes at all).

    The result is memoised on the unedited mask, which is shared by every layer of one forward:
    an edit that returns the same tensor object for consecutive layers pays for the mask once.
    """
    keep = edit(event)
    if keep is None:
        return None
    base_mask = event.allowed
    memo = base_mask._last_edit
    if memo is not None and memo[0] is keep and memo[1] == event.kind:
        return memo[2]
    edited = _restrict(base_mask, keep, event)
    base_mask._last_edit = (keep, event.kind, edited)  # one slot: older edit masks can be freed
    return edited


def _restrict(base_mask: Allowed, keep, event: AttentionEvent) -> Allowed | None:
    B, Lq, Lk = base_mask.shape
    if isinstance(keep, RowKeep):
        r0, r1, keep = keep.q0, keep.q1, keep.keep
        if not 0 <= r0 <= r1 <= Lq:
            raise ValueError(f"RowKeep rows [{r0}, {r1}) outside the {Lq} query rows")
    else:
        r0, r1 = 0, Lq
    base = base_mask(r0, r1)  # [B, c, Lk]: only the edited rows are built
    keep = keep.to(device=base.device, dtype=torch.bool)
    if bool(keep.all()):
        return None
    if keep.dim() == 4:  # per head: [B, H, c, Lk]
        edited = base[:, None] & keep
        base = base[:, None]
    else:
        edited = base & keep
    empty = ~edited.any(-1, keepdim=True)  # rows the edit emptied (rows empty before stay empty)
    empty &= base.any(-1, keepdim=True)
    if bool(empty.any()):
        if event.kind in ("self", "joint"):
            own = _own_key(event, r0, r1)
            edited = edited | (empty & (own[:, None] if edited.dim() == 4 else own))
        elif event.kind in ("abstractor", "vision"):
            edited = torch.where(empty, base, edited)
    edited = edited.expand(*edited.shape[:-2], r1 - r0, Lk)
    changed = (edited != base).flatten(0, -3).any(0).any(-1).nonzero()  # query rows the edit touched
    if changed.numel() == 0:
        return None
    c0, c1 = r0 + int(changed[0]), r0 + int(changed[-1]) + 1
    heads = edited.shape[1] if edited.dim() == 4 else None
    if (r0, r1) == (0, Lq):
        result = Allowed.from_tensor(edited)
    else:
        edited_rows = edited[..., c0 - r0 : c1 - r0, :]  # [B, (H,) c1 - c0, Lk]

        def rows(a: int, b: int) -> torch.Tensor:
            out = base_mask(a, b)  # [B, b - a, Lk]
            if heads is not None:
                out = out[:, None].expand(B, heads, b - a, Lk)
            lo, hi = max(a, c0), min(b, c1)
            if lo >= hi:
                return out
            out = out.clone()
            out[..., lo - a : hi - a, :] = edited_rows[..., lo - c0 : hi - c0, :]
            return out

        result = Allowed(base_mask.shape, rows=rows, heads=heads)
    result.unedited, result.changed_rows = base_mask, (c0, c1)
    return result


def attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: Allowed,
    scaling: float,
    kind: AttentionKind,
    describe: Callable[[], dict],
    *,
    output_attentions: bool = False,
    softmax_dtype: torch.dtype | None = torch.float32,
    implementation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, Allowed]:
    """Masked softmax attention of one module: knockout edit, kernel, observation event.

    Args:
        module: the attention module; reads ``module.config`` (implementation), ``module.layer_idx``,
            optional ``module.attention_edit`` and ``module.hook_attn``.
        query: [B, H, Lq, D] (after RoPE); key/value: [B, H_kv, Lk, D].
        allowed: the module's mask (see :class:`Allowed`).
        scaling: softmax scale.
        kind: event kind (``self``, ``cross``, ``joint``, ``abstractor``, ``vision``).
        describe: ``() -> dict`` of the event's key facts (``query_index``, ``key_position``,
            ``key_image`` and optional fields); called only when an edit or a hook needs them.
        output_attentions: force the eager kernel and return probabilities.
        softmax_dtype: eager softmax dtype (None = model dtype).
        implementation: force a kernel (``"eager"``) regardless of the config.

    Returns:
        (context [B, H, Lq, D], probabilities [B, H, Lq, Lk] on the eager path else None, the mask
        actually used). For ``cross``, rows with no allowed key get an all-keys dummy softmax in the
        kernel (their result must be discarded by the caller) and zero probabilities.
    """
    name = implementation or check_attn_implementation(module.config)
    kernel = ATTENTION_FUNCTIONS["eager" if output_attentions else name]
    edit = getattr(module, "attention_edit", None)
    hook = getattr(module, "hook_attn", None)
    observe = hook is not None and hook.active
    event = None
    if edit is not None or observe:
        event = AttentionEvent(
            layer=module.layer_idx,
            kind=kind,
            query=query,
            key=key,
            scale=scaling,
            allowed=allowed,
            **describe(),
        )
        if edit is not None:
            edited = _apply_edit(edit, event)
            if edited is not None:
                allowed = event.allowed = edited
    kernel_allowed, no_keys = allowed, None
    if kind == "cross":  # rows that see no image: dummy all-keys softmax, discarded by the caller
        no_keys = ~allowed.tensor().any(-1, keepdim=True)  # [B, (H,) Lq, 1]
        kernel_allowed = Allowed.from_tensor(allowed.tensor() | no_keys)
    rows = allowed.changed_rows
    if (
        kernel is sdpa_attention_forward
        and rows is not None
        and kind != "cross"
        and rows[1] - rows[0] <= query.shape[2] // 2
    ):
        # A knockout of a few query rows: the fast (often mask-free) kernel for all rows, the edited
        # mask only for rows r0..r1-1, so a typical knockout (e.g. the last query) costs little.
        r0, r1 = rows
        ctx, lse = kernel(module, query, key, value, allowed.unedited, scaling, want_logsumexp=observe)
        edited_rows = Allowed.from_tensor(allowed(r0, r1))
        ctx_rows, lse_rows = kernel(
            module, query[:, :, r0:r1], key, value, edited_rows, scaling, want_logsumexp=observe
        )
        if ctx.requires_grad:  # autograd: SDPA's backward may need its own output unchanged
            ctx = torch.cat([ctx[:, :, :r0], ctx_rows, ctx[:, :, r1:]], dim=2)
        else:  # no second [B, H, Lq, D] buffer
            ctx[:, :, r0:r1] = ctx_rows
        if lse is not None and lse_rows is not None:
            lse[:, :, r0:r1] = lse_rows
        else:
            lse = None
        probs = None
    else:
        # While observed, the SDPA kernel also hands out its softmax normaliser (same output, see
        # sdpa_with_logsumexp); the eager kernel returns probabilities instead.
        extra = {"want_logsumexp": True} if observe and kernel is sdpa_attention_forward else {}
        ctx, probs = kernel(
            module, query, key, value, kernel_allowed, scaling, softmax_dtype=softmax_dtype, **extra
        )
        lse = None
        if extra:
            probs, lse = None, probs
    if probs is not None and no_keys is not None:
        probs = probs * ~(no_keys if no_keys.dim() == 4 else no_keys[:, None])
    if observe:
        event.probs, event.logsumexp = probs, lse
        hook(event)
    return ctx, probs, allowed
