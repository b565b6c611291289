"""Activation patching between a clean and a corrupted run (denoising direction).

Clean and corrupt prompts come from :mod:`owl_lab.synth.counterfactual`: same text, same token
layout, one attribute of the asked object changed in the image. The metric is the logit difference
at the answer position, ``LD = logit[clean answer] - logit[corrupt answer]``. For every
(layer, site, position group) the corrupt run is repeated with the clean run's activation written
into that site at those positions, and

    recovered = (LD_patched - LD_corrupt) / (LD_clean - LD_corrupt)

per example: 1 = the patch alone restores the clean answer's margin, 0 = it does nothing.

Sites: ``resid`` = ``blocks.{i}.hook_resid_pre`` (the stream *entering* block i; patching it at
every position reproduces the clean run from there on in Owl2, whose image lives in the sequence),
``attn`` = ``hook_attn_out``, ``mlp`` = ``hook_mlp_out``. Position groups (see
:func:`owl_lab.analysis.causal.position_groups`): ``image`` (Owl2 image rows; Owl3 ``<|image|>``
placeholder), ``question`` (the other prompt tokens), ``last`` (where the answer is predicted).
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

import hooks
from hooks.sites import n_layers
from owl_lab.analysis.causal import (
    POSITION_GROUPS,
    gather_positions,
    last_positions,
    layouts,
    position_groups,
)

SITES = {"resid": "hook_resid_pre", "attn": "hook_attn_out", "mlp": "hook_mlp_out"}


def _logit_diff(
    logits: torch.Tensor, pos: torch.Tensor, good: torch.Tensor, bad: torch.Tensor
) -> torch.Tensor:
    at = gather_positions(logits, pos).float()  # [B, V]
    rows = torch.arange(at.shape[0])
    return at[rows, good] - at[rows, bad]


@torch.no_grad()
def patching_sweep(
    model: nn.Module,
    clean: dict,
    corrupt: dict,
    clean_ids: torch.Tensor,
    corrupt_ids: torch.Tensor,
    sites=tuple(SITES),
    groups=POSITION_GROUPS,
    layers=None,
    progress: bool = True,
) -> pd.DataFrame:
    """Patch clean activations into the corrupt run at every (layer, site, group).

    Args:
        clean, corrupt: processor batches with identical token layout (``collate_pairs``).
        clean_ids, corrupt_ids: [B] first token of each side's answer.
        sites: subset of ``resid``, ``attn``, ``mlp``.
        groups: subset of ``image``, ``question``, ``last`` (and ``all``: every position).
        layers: decoder layers to sweep (default: all).

    Returns:
        DataFrame with columns layer, site, group, batch, ld (patched logit difference),
        ld_clean, ld_corrupt, recovered.
    """
    unknown = sorted(set(sites) - set(SITES)) + sorted(set(groups) - set(POSITION_GROUPS) - {"all"})
    if unknown:
        raise ValueError(
            f"unknown site/group {unknown}; sites {list(SITES)}, groups {list(POSITION_GROUPS)} + all"
        )
    layers = list(range(n_layers(model))) if layers is None else list(layers)
    names = [f"blocks.{i}.{SITES[s]}" for i in layers for s in sites]
    with layouts(model) as seen, hooks.record(model, names) as cache:
        clean_logits = model(**clean).logits
    layout = seen[0]
    pos = last_positions(layout)
    masks = dict(position_groups(layout), all=layout.token_kind >= 0)
    ld_clean = _logit_diff(clean_logits, pos, clean_ids, corrupt_ids)
    with layouts(model) as seen_corrupt:
        ld_corrupt = _logit_diff(model(**corrupt).logits, pos, clean_ids, corrupt_ids)
    if not torch.equal(seen_corrupt[0].token_kind, layout.token_kind):
        raise ValueError(
            "clean and corrupt batches have different token layouts; build them with collate_pairs"
        )
    denom = ld_clean - ld_corrupt
    rows = []
    jobs = [(i, s, g) for i in layers for s in sites for g in groups]
    for i, s, g in tqdm(jobs, desc="patching", disable=not progress):
        name = f"blocks.{i}.{SITES[s]}"
        mask = masks[g].to(cache[name].device)[..., None]  # [B, L, 1]
        source = cache[name]
        with hooks.edit(model, {name: lambda v, src=source, m=mask: torch.where(m, src, v)}):
            ld = _logit_diff(model(**corrupt).logits, pos, clean_ids, corrupt_ids)
        rec = (ld - ld_corrupt) / denom
        rows.extend(
            (i, s, g, b, float(ld[b]), float(ld_clean[b]), float(ld_corrupt[b]), float(rec[b]))
            for b in range(ld.shape[0])
        )
    return pd.DataFrame(
        rows, columns=["layer", "site", "group", "batch", "ld", "ld_clean", "ld_corrupt", "recovered"]
    )


def summarize(df: pd.DataFrame, by=("layer", "site", "group")) -> pd.DataFrame:
    """Mean ``recovered`` with its per-example standard error (``se``) and ``n`` per cell."""
    g = df.groupby(list(by)).recovered
    out = g.agg(["mean", "std", "count"]).reset_index()
    out["se"] = out["std"] / out["count"].clip(lower=1) ** 0.5
    return out.rename(columns={"count": "n"}).drop(columns="std")


__all__ = ["SITES", "patching_sweep", "summarize"]
