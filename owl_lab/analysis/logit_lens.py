"""Logit lens and direct logit attribution (DLA) per layer, with a modality split.

Logit lens (nostalgebraist 2020): read the residual stream leaving block i through the model's own
final norm and unembedding, ``log_softmax(lm_head(norm(resid_post_i)))``. At the last block this
*is* the model's output, so the lens of the final layer equals ``log_softmax(logits)``.

Direct logit attribution: the final residual at position p is a sum of parts,
``resid = embed + Σ_i (attn_i + mlp_i)``. The final RMSNorm is linear once its scale ``1/rms`` is
frozen at the value the real forward used, so the logit of token t splits exactly into one term per
part, ``(part / rms) · (w ⊙ W_U[t])``, and the terms sum to the logit. The attention term splits
further by modality:

* Owl2 — image rows vs text rows: ``o_proj(Σ_{k ∈ image rows} P[h, p, k] v_k)`` is the part that
  read image rows (the probabilities come from the eager softmax of that forward, the values from
  ``v_proj``'s output); the rest read text rows.
* Owl3 gated (240728) — the vision part of the gated output, ``o_proj(g ⊙ cross_context)``, exactly
  as the model mixes it (the gate event hands it over); the rest is the self-attention part.
* Owl3 fused (241101) and non-hyper layers: no split (``part == "all"`` only; non-hyper Owl3 layers
  read text alone, so there the whole term is text).
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

import hooks
from hooks.sites import family_spec, n_layers
from owl_lab.analysis.causal import gather_positions, last_positions, layouts, token_strings
from owl_lab.models.observe import TOKEN_IMAGE


def _final_norm_and_head(model: nn.Module):
    spec = family_spec(model)
    return model.get_submodule(spec.paths["final_norm"]), model.get_submodule(spec.paths["lm_head"])


def _positions(layout, positions, length: int) -> list[list[int]]:
    """Per sample, the positions to report (``None`` = all real ones, ``"last"``, or a list)."""
    kind = layout.token_kind
    if positions is None:
        return [[p for p in range(length) if int(kind[b, p]) >= 0] for b in range(kind.shape[0])]
    if positions == "last":
        return [[int(p)] for p in last_positions(layout)]
    if isinstance(positions, int):
        positions = [positions]
    bad = [p for p in positions if not -length <= p < length]
    if bad:
        raise ValueError(f"positions {bad} outside the decoder sequence of length {length}")
    return [[p % length for p in positions] for _ in range(kind.shape[0])]


@torch.no_grad()
def logit_lens(model: nn.Module, batch: dict, top_k: int = 5, positions=None, tokenizer=None) -> pd.DataFrame:
    """Top-``top_k`` tokens of every layer's residual stream read through the final norm and unembedding.

    Args:
        model: an Owl model (any registered family).
        batch: the processor's output for one forward.
        top_k: tokens per (layer, batch, position).
        positions: ``None`` (every real position), ``"last"`` (each sample's last real token), an int
            or a list of ints (decoder-sequence positions; Owl2 counts image rows).
        tokenizer: for the ``token`` column (default: the lab vocabulary, see ``token_strings``).

    Returns:
        DataFrame with columns layer, batch, position, rank, token_id, token, logprob; ``layer`` i is
        the stream leaving block i (the last layer reproduces ``log_softmax(model(**batch).logits)``).
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    n = n_layers(model)
    names = [f"blocks.{i}.hook_resid_post" for i in range(n)]
    with layouts(model) as seen, hooks.record(model, names) as cache:
        model(**batch)
    norm, head = _final_norm_and_head(model)
    length = cache[names[0]].shape[1]
    wanted = _positions(seen[0], positions, length)
    strings = token_strings(model, tokenizer)
    rows = []
    for layer, name in enumerate(names):
        logp = torch.log_softmax(head(norm(cache[name])).float(), dim=-1)  # [B, L, V]
        values, ids = logp.topk(min(top_k, logp.shape[-1]), dim=-1)  # [B, L, k]
        for b, pos_list in enumerate(wanted):
            for p in pos_list:
                for rank, (v, t) in enumerate(zip(values[b, p].tolist(), ids[b, p].tolist(), strict=True)):
                    rows.append((layer, b, p, rank, t, strings[t], v))
    return pd.DataFrame(rows, columns=["layer", "batch", "position", "rank", "token_id", "token", "logprob"])


def _owl2_visual_attention(model, layer: int, probs: torch.Tensor, values: torch.Tensor, image_rows, pos):
    """[B, D] attention output at ``pos`` that read image rows (Owl2, one layer).

    probs [B, H, L, L] eager softmax; values [B, L, Hkv*hd] ``v_proj`` output; image_rows [B, L] bool.
    """
    attn = model.get_submodule(family_spec(model).paths["attention"].replace("{i}", str(layer)))
    B, H, L, _ = probs.shape
    v = values.view(B, L, attn.num_kv_heads, attn.head_dim).repeat_interleave(H // attn.num_kv_heads, dim=2)
    p = gather_positions(probs.transpose(1, 2), pos) * image_rows[:, None, :].to(probs.dtype)  # [B, H, L]
    z = torch.einsum("bhk,bkhd->bhd", p, v)  # [B, H, hd]
    return attn.o_proj(z.reshape(B, -1))


@torch.no_grad()
def direct_logit_attribution(
    model: nn.Module, batch: dict, token_ids: torch.Tensor, positions: torch.Tensor | None = None
) -> pd.DataFrame:
    """Each block's direct contribution to the logit of ``token_ids[b]`` at ``positions[b]``.

    Args:
        token_ids: [B] target token per sample (e.g. the correct answer's first token).
        positions: [B] decoder positions (default: each sample's last real token).

    Returns:
        DataFrame with columns batch, layer (-1 = embeddings), component (``embed``/``attn``/``mlp``),
        part (``all``; for ``attn`` also ``visual`` and ``text`` where the family splits it, see the
        module docstring), value (logit units). Per sample, the ``all`` rows sum to the logit.
    """
    spec = family_spec(model)
    n = n_layers(model)
    names = ["blocks.0.hook_resid_pre"] + [
        f"blocks.{i}.hook_{c}_out" for i in range(n) for c in ("attn", "mlp")
    ]
    names.append(f"blocks.{n - 1}.hook_resid_post")
    split = _split_kind(model)
    gate_events, values, handles = {}, {}, []
    for i in range(n):
        attn = model.get_submodule(spec.paths["attention"].replace("{i}", str(i)))
        if split == "owl2":
            handles.append(
                attn.v_proj.register_forward_hook(lambda m, a, out, i=i: values.__setitem__(i, out))
            )
        elif split == "gated" and hasattr(attn, "gate_proj"):
            point = model.get_submodule(spec.path("gate_event", i=i))
            handles.append(
                point.register_forward_hook(lambda m, a, out, i=i: gate_events.__setitem__(i, a[0]))
            )
    try:
        with layouts(model) as seen, hooks.record(model, names) as cache:
            out = model(**batch, output_attentions=split == "owl2")
    finally:
        for h in handles:
            h.remove()
    layout = seen[0]
    pos = last_positions(layout) if positions is None else positions
    norm, head = _final_norm_and_head(model)
    final = gather_positions(cache[f"blocks.{n - 1}.hook_resid_post"], pos).float()  # [B, D]
    inv_rms = torch.rsqrt(final.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)  # [B, 1]
    direction = norm.weight.float() * head.weight[token_ids].float()  # [B, D]

    def dla(part: torch.Tensor) -> list[float]:  # part [B, D] -> [B]
        return ((part.float() * inv_rms) * direction).sum(-1).tolist()

    rows = []

    def add(layer, component, part, vals):
        rows.extend((b, layer, component, part, v) for b, v in enumerate(vals))

    add(-1, "embed", "all", dla(gather_positions(cache["blocks.0.hook_resid_pre"], pos)))
    image_rows = layout.token_kind == TOKEN_IMAGE
    for i in range(n):
        attn_out = gather_positions(cache[f"blocks.{i}.hook_attn_out"], pos)
        add(i, "attn", "all", dla(attn_out))
        visual = None
        if split == "owl2":
            visual = _owl2_visual_attention(model, i, out.attentions[i], values[i], image_rows, pos)
        elif i in gate_events:
            ev = gate_events[i]
            attn = model.get_submodule(spec.paths["attention"].replace("{i}", str(i)))
            g_cross = gather_positions(ev.gate * ev.cross_context, pos)  # [B, H, hd]
            visual = attn.o_proj(g_cross.reshape(g_cross.shape[0], -1))
        elif spec.name == "owl3" and not hasattr(
            model.get_submodule(spec.paths["attention"].replace("{i}", str(i))), "v_kv_proj"
        ):
            visual = torch.zeros_like(attn_out)  # a plain Qwen2 layer reads text only
        if visual is not None:
            add(i, "attn", "visual", dla(visual))
            add(i, "attn", "text", dla(attn_out - visual))
        add(i, "mlp", "all", dla(gather_positions(cache[f"blocks.{i}.hook_mlp_out"], pos)))
    return pd.DataFrame(rows, columns=["batch", "layer", "component", "part", "value"])


def _split_kind(model: nn.Module) -> str:
    """How the attention term splits by modality: ``owl2`` (image rows), ``gated`` (Owl3 gate), or
    ``none``."""
    spec = family_spec(model)
    if spec.images_in_sequence:  # image rows are decoder positions: split their attention by key
        return "owl2"
    return "gated" if getattr(model.config, "hyper_attention", None) == "gated" else "none"


__all__ = ["direct_logit_attribution", "logit_lens"]
