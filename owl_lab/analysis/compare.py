"""Attention next to attribution: does the attention view rank inputs the way gradients do?

    cmp = attention_vs_attribution(model, batch, attr)          # image patches
    cmp.spearman                                                # one rank correlation over all patches
    tok = attention_vs_token_attribution(model, batch, attr)    # prompt tokens (+ a per-group table)
    tok.spearman, tok.table, tok.groups

Attention side: the attention of the **last prompt position** (the one that predicts the answer's
first token, i.e. the attributed token), mean over heads and the chosen layers, read from
``hooks.capture(full_maps=...)``. Attribution side: an :class:`~owl_lab.analysis.attribution.Attribution`
(Integrated Gradients), absolute values by default (importance regardless of sign). Rank
correlation (Spearman) because the two live on unrelated scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from hooks.capture import capture
from owl_lab.analysis.attribution import Attribution, _Adapter, attribute
from owl_lab.families import family_of


def spearman(a, b) -> float:
    """Spearman rank correlation of two equally long sequences (average ranks for ties; NaN when
    either side is constant). Implemented with pandas ranks, so scipy is not needed."""
    x = pd.Series(np.asarray(a, dtype=np.float64).ravel()).rank(method="average").to_numpy()
    y = pd.Series(np.asarray(b, dtype=np.float64).ravel()).rank(method="average").to_numpy()
    if x.shape != y.shape:
        raise ValueError(f"spearman needs equally long inputs; got {x.size} and {y.size}.")
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


@dataclass
class AttentionComparison:
    """Per-patch attention mass next to per-patch attribution, for every image of one sample.

    Attributes:
        attention: [N_img, grid_h, grid_w] attention mass the answer position routes to each patch
            (see ``source``).
        attribution: [N_img, grid_h, grid_w] the IG patch map (absolute values if ``absolute``).
        spearman: rank correlation over all patches of all images (one number to print).
        per_image: rank correlation per image.
        source: how ``attention`` was computed.
        result: the underlying :class:`Attribution`.
    """

    attention: torch.Tensor
    attribution: torch.Tensor
    spearman: float
    per_image: list[float]
    source: str
    result: Attribution


def _last_query_maps(rec, kinds: tuple[str, ...], layers) -> list:
    # keys end in (..., layer, kind): (step, layer, kind) or (call, step, layer, kind) — one forward here
    maps = [fm for key, fm in sorted(rec.full_maps.items()) if key[-1] in kinds and key[-2] in layers]
    if not maps:
        raise ValueError(
            f"no {kinds} attention was recorded for the last position in layers {sorted(layers)}."
        )
    return maps


def attention_patch_maps(
    model, processor_batch, *, weighting: str = "decoder", abstractor_layer: int = -1, layers=None
) -> tuple[torch.Tensor, str]:
    """Attention mass per image patch seen from the last prompt position: ([N_img, gh, gw], source).

    * Owl2: abstractor query→patch maps (``hooks.capture``, mean over heads) of ``abstractor_layer``,
      combined over the learnable queries with weights = the decoder's attention from the last
      position to each query row (mean over heads and ``layers``; ``weighting='decoder'``) or
      uniformly (``weighting='uniform'``, the plain mean abstractor map).
    * Owl3: cross/joint attention of the last position to each image key (= SigLIP patch) in the
      hyper layers (mean over heads and hyper layers); ``weighting`` is ignored.
    """
    spec = family_of(model)
    if weighting not in ("decoder", "uniform"):
        raise ValueError(f"weighting must be 'decoder' or 'uniform'; got {weighting!r}.")
    ad = _Adapter(model, processor_batch)
    if ad.pixels is None:
        raise ValueError("attention_patch_maps needs a prompt with at least one image.")
    n_img = ad.pixels.shape[0]
    seeing = spec.image_layers(model.config)  # layers whose attention can reach the image
    layers = seeing if layers is None else [i for i in layers if i in seeing]
    extra_rows = model.config.tokens_per_image - 1 if spec.expands_image_marker else 0
    length = ad.ids.shape[1] + n_img * extra_rows
    has_abstractor = spec.has("abstractor_event")
    with (
        torch.no_grad(),
        capture(
            model,
            attention=True,
            full_maps={i: [length - 1] for i in layers},
            abstractor=has_abstractor,
            gates=False,
            layers=layers,
        ) as rec,
    ):
        model(**{k: v for k, v in processor_batch.items() if k != "labels"})
    if has_abstractor:
        amap = rec.abstractor_maps[abstractor_layer].mean(1)  # [N, H, Q, gh, gw] → [N, Q, gh, gw]
        Q = amap.shape[1]
        if weighting == "uniform":
            return amap.mean(1), f"Owl2 abstractor layer {abstractor_layer}: mean over heads and queries"
        w = torch.zeros(n_img, Q)
        maps = _last_query_maps(rec, ("self",), layers)
        for fm in maps:
            p = fm.probs[0, :, -1].mean(0)  # [Lk] mean over heads
            for n in range(n_img):
                cols = (fm.key_image[0] == n).nonzero().flatten()[:Q]  # query rows (vit_eos is last)
                w[n] += p[cols] / len(maps)
        return (
            torch.einsum("nq,nqhw->nhw", w, amap),
            f"Owl2 abstractor layer {abstractor_layer} maps (mean over heads), weighted by the decoder's "
            f"attention from the last position to each query row (mean over heads, layers {layers})",
        )
    maps = _last_query_maps(rec, ("cross", "joint"), layers)
    grid = int(round(model.config.tokens_per_image**0.5))
    out = torch.zeros(n_img, grid * grid)
    for fm in maps:
        p = fm.probs[0, :, -1].mean(0)  # [Lk]
        for n in range(n_img):
            cols = ((fm.key_image[0] == n) & (fm.key_position[0] < 0)).nonzero().flatten()
            out[n] += p[cols] / len(maps)
    return out.view(n_img, grid, grid), (
        f"Owl3 attention of the last position to each image key, mean over heads and hyper layers {layers}"
    )


def attention_vs_attribution(
    model,
    processor_batch,
    attribution: Attribution | None = None,
    *,
    absolute: bool = True,
    weighting: str = "decoder",
    abstractor_layer: int = -1,
    layers=None,
    **attribute_kwargs,
) -> AttentionComparison:
    """Put the attention view and the IG view of the image patches side by side.

    Args:
        model, processor_batch: as for :func:`attribute` (one sample with at least one image).
        attribution: a precomputed :class:`Attribution` of this batch (else computed with
            ``attribute_kwargs``, e.g. ``target=``, ``n_steps=``, ``tokenizer=``).
        absolute: compare attention with |IG| (importance regardless of sign; default) or signed IG.
        weighting, abstractor_layer, layers: see :func:`attention_patch_maps`.

    Returns:
        :class:`AttentionComparison`; ``round(cmp.spearman, 2)`` is the number a notebook prints.
    """
    attention, source = attention_patch_maps(
        model, processor_batch, weighting=weighting, abstractor_layer=abstractor_layer, layers=layers
    )
    if attribution is None:
        attribution = attribute(model, processor_batch, **attribute_kwargs)
    attr = attribution.patch_maps.abs() if absolute else attribution.patch_maps
    if tuple(attr.shape) != tuple(attention.shape):
        raise ValueError(
            f"attention maps {tuple(attention.shape)} and attribution maps {tuple(attr.shape)} "
            "differ in shape; was the attribution computed on this batch?"
        )
    per_image = [spearman(attention[n], attr[n]) for n in range(attr.shape[0])]
    return AttentionComparison(
        attention=attention,
        attribution=attr,
        spearman=spearman(attention, attr),
        per_image=per_image,
        source=source,
        result=attribution,
    )


# ---------------------------------------------------------------------------------------------
# prompt tokens and token groups
# ---------------------------------------------------------------------------------------------


@dataclass
class TokenComparison:
    """Attention of the last prompt position next to IG, per prompt token and per token group.

    Attributes:
        table: one row per prompt token of the attribution: position (in ``input_ids``), token,
            group (hooks token group: bos / question / placeholder), attributed (False for tokens kept
            in the IG baseline, whose attribution is 0 by construction), attention, attribution.
        spearman: rank correlation over the *attributed* tokens.
        groups: [group × (attention, attribution)] shares; image groups ``image:i`` take the patch
            attribution; each column sums to 1 over the groups it covers (attention of image groups is
            NaN for gated Owl3, whose image keys live in a separate cross softmax).
        source: how ``attention`` was computed.
        result: the underlying :class:`Attribution`.
    """

    table: pd.DataFrame
    spearman: float
    groups: pd.DataFrame
    source: str
    result: Attribution


def attention_vs_token_attribution(
    model,
    processor_batch,
    attribution: Attribution | None = None,
    *,
    absolute: bool = True,
    layers=None,
    **attribute_kwargs,
) -> TokenComparison:
    """Put the attention view and the IG view of the prompt tokens side by side.

    Attention: the last position's softmax over sequence keys (kind ``self``, or ``joint`` in fused Owl3
    hyper layers, which also holds the image keys), mean over heads and ``layers`` (default: every
    decoder layer). Owl2 token positions are mapped to the expanded sequence (each image marker
    becomes ``tokens_per_image`` rows).

    Args:
        model, processor_batch: as for :func:`attribute` (one sample; images optional).
        attribution: a precomputed :class:`Attribution` of this batch (else computed with
            ``attribute_kwargs``).
        absolute: compare with |IG| (default) or signed IG.
    """
    spec = family_of(model)
    ad = _Adapter(model, processor_batch)
    if attribution is None:
        attribution = attribute(model, processor_batch, **attribute_kwargs)
    n_layers = model.config.num_hidden_layers
    layers = list(range(n_layers)) if layers is None else [int(i) for i in layers]
    ids = ad.ids[0]
    seq, length = torch.arange(ids.numel()), ids.numel()  # input_ids index → decoder position [L]
    if spec.expands_image_marker:  # every earlier marker became tokens_per_image rows instead of one
        marker, extra = (ids == spec.image_marker(model.config)).long(), model.config.tokens_per_image - 1
        seq, length = seq + (marker.cumsum(0) - marker) * extra, length + int(marker.sum()) * extra
    with (
        torch.no_grad(),
        capture(
            model, full_maps={i: [length - 1] for i in layers}, layers=layers, gates=False, abstractor=False
        ) as rec,
    ):
        model(**{k: v for k, v in processor_batch.items() if k != "labels"})
    maps = _last_query_maps(rec, ("self", "joint"), layers)
    att = torch.zeros(length)
    group_mass: dict[str, float] = {}
    for fm in maps:
        p = fm.probs[0, :, -1].mean(0)  # [Lk] mean over heads
        inseq = fm.key_position[0] >= 0
        att.index_add_(0, fm.key_position[0][inseq], p[inseq] / len(maps))
        for g, m in zip(fm.key_group[0].tolist(), p.tolist(), strict=True):
            if g >= 0:
                group_mass[fm.groups[g]] = group_mass.get(fm.groups[g], 0.0) + m / len(maps)
    positions = attribution.token_positions
    group_of = {
        int(pos): fm.groups[g]
        for fm in maps
        for pos, g in zip(fm.key_position[0].tolist(), fm.key_group[0].tolist(), strict=True)
        if pos >= 0
    }
    scores = attribution.token_scores.abs() if absolute else attribution.token_scores
    base = attribution.extra["baseline_ids"][0]
    table = pd.DataFrame(
        {
            "position": positions.tolist(),
            "token": attribution.tokens,
            "group": [group_of.get(int(seq[p]), "?") for p in positions.tolist()],
            "attributed": (base[positions] != ids[positions]).tolist(),
            "attention": att[seq[positions]].tolist(),
            "attribution": scores.tolist(),
        }
    )
    used = table[table["attributed"]]
    rho = spearman(used["attention"], used["attribution"])

    attr_mass = table.groupby("group")["attribution"].apply(lambda s: s.abs().sum()).to_dict()
    for n in range(attribution.patch_maps.shape[0]):
        attr_mass[f"image:{n}"] = float(attribution.patch_maps[n].abs().sum())
    names = list(dict.fromkeys([*group_mass, *attr_mass]))
    groups = pd.DataFrame(
        {
            "attention": [group_mass.get(g, np.nan) for g in names],
            "attribution": [attr_mass.get(g, 0.0) for g in names],
        },
        index=pd.Index(names, name="group"),
    )
    groups = groups / groups.sum(skipna=True)  # gated Owl3: no image keys in `self` → image attention NaN
    kinds = sorted({key[-1] for key in rec.full_maps if key[-1] in ("self", "joint")})
    source = (
        f"{spec.name}: attention of the last position over sequence keys ({'/'.join(kinds)}), "
        "mean over heads "
        f"and layers {layers}; Spearman over the {len(used)} attributed tokens"
    )
    return TokenComparison(table=table, spearman=rho, groups=groups, source=source, result=attribution)


def compare_examples(model, processor, examples, **attribute_kwargs) -> pd.DataFrame:
    """Attribute and compare every example (one at a time): one row per example.

    Columns: example, expected, target (the attributed token: the model's greedy first answer token
    unless ``target=`` is given), first_token_correct, patch_spearman, token_spearman,
    image_share_ig (|IG| on patches over all |IG|), image_share_attention (the last position's
    attention mass on image keys in its sequence softmax, mean over layers; NaN for gated Owl3),
    gap (|completeness delta| / |f(input) - f(baseline)|).
    """
    rows = []
    for i, ex in enumerate(examples):
        batch = processor(text=ex.text, images=list(ex.images) or None)
        a = attribute(model, batch, tokenizer=processor, **attribute_kwargs)
        tok = attention_vs_token_attribution(model, batch, a)
        patches = attention_vs_attribution(model, batch, a).spearman if len(ex.images) else float("nan")
        images = tok.groups.index.str.startswith("image")
        change = a.value - a.baseline_value
        rows.append(
            {
                "example": i,
                "expected": ex.answer,
                "target": a.target,
                "first_token_correct": a.target.lstrip("▁Ġ") == str(ex.answer).split()[0],
                "patch_spearman": patches,
                "token_spearman": tok.spearman,
                "image_share_ig": a.image_share,
                "image_share_attention": float(tok.groups.loc[images, "attention"].sum(min_count=1)),
                "gap": abs(a.delta) / abs(change) if change else float("nan"),
            }
        )
    return pd.DataFrame(rows)
