"""Visual-token pruning in the style of FastV (Chen et al., ECCV 2024): how many visual rows can go?

FastV's rule: at layer K, rank an image's visual tokens by the attention they *receive* (mean over
heads, summed over the queries that may see them) and drop the lowest-ranked fraction for every
later layer. The control drops a random fraction instead. Dropping is done with
:func:`hooks.knockout` (no later query may attend the dropped keys), so positions, RoPE and the
cache stay as they are — the same thing FastV's removal computes, minus the speed-up.

What a "visual token" is differs by family:

* Owl2 — an image's rows in the sequence (abstractor queries + ``vit_eos``, T rows per image); they
  are dropped as keys of the self-attention in layers K+1 … L-1.
* Owl3 — images never enter the sequence; they are the patch keys (T per image) of the hyper
  layers. Ranking uses the cross (240728) or joint (241101) attention of hyper layer K, and the
  dropped patch keys vanish from the hyper layers after K. A query left with no key of an image no
  longer sees that image (gated: its self-attention output passes unchanged). ``layer`` must be a
  hyper layer.

Accuracy is the teacher-forced first answer token at the last prompt position (argmax), per example,
so fractions are compared on the same examples (paired).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

import hooks
from hooks import capture
from hooks.sites import family_spec, n_layers
from owl_lab.analysis.causal import gather_positions, last_positions, layouts
from owl_lab.analysis.knockout import answer_ids
from owl_lab.models.observe import TOKEN_IMAGE, TOKEN_PAD
from owl_lab.synth.tasks import Example

RULES = ("attention", "random")


def _received(model, batch, layer: int) -> tuple[torch.Tensor, torch.Tensor, object]:
    """(scores [B, N, T], key index [B, N, T] into the full map's keys, layout) at ``layer``."""
    with (
        layouts(model) as seen,
        capture(model, layers=[layer], full_maps={layer: None}, gates=False, abstractor=False) as rec,
    ):
        model(**batch)
    # Owl2 image rows are keys of the self-attention; Owl3 image keys those of cross / joint attention
    rows_in_sequence = family_spec(model).images_in_sequence
    maps = [
        m
        for (call, step, lyr, kind), m in rec.full_maps.items()
        if lyr == layer and (rows_in_sequence or kind != "self")
    ]
    if len(maps) != 1:
        raise ValueError(
            f"layer {layer} has no attention over image keys to rank them by (Owl3: choose a hyper layer)"
        )
    fm = maps[0]
    scores = fm.probs.mean(1).sum(1)  # [B, Lk] attention received, mean over heads, summed over queries
    B = scores.shape[0]
    per_sample = []
    for b in range(B):
        keys = (fm.key_image[b] >= 0).nonzero().flatten()  # image keys (Owl2 rows / Owl3 patches), in order
        per_sample.append(keys)
    n_keys = {len(k) for k in per_sample}
    if len(n_keys) != 1:
        raise ValueError("every sample of a pruning batch must have the same number of images")
    index = torch.stack(per_sample)  # [B, N*T]
    layout = seen[0]
    T = int((fm.key_image[0] == 0).sum())  # keys (Owl2 rows / Owl3 patches) of one image
    return scores.gather(1, index).view(B, -1, T), index.view(B, -1, T), (layout, fm)


def _drop_mask(scores: torch.Tensor, fraction: float, rule: str, generator: torch.Generator) -> torch.Tensor:
    """[B, N, T] bool: the ``fraction`` of each image's keys to drop (lowest scores, or random)."""
    B, N, T = scores.shape
    k = int(fraction * T)
    drop = torch.zeros(B, N, T, dtype=torch.bool)
    if k == 0:
        return drop
    ranking = scores if rule == "attention" else torch.rand(B, N, T, generator=generator)
    lowest = ranking.argsort(dim=-1)[..., :k]
    drop.scatter_(-1, lowest, True)
    return drop


@torch.no_grad()
def prune_sweep(
    model: nn.Module,
    processor,
    examples: Sequence[Example],
    layer: int,
    fractions: Sequence[float] = (0.0, 0.25, 0.5, 0.75),
    rules: Sequence[str] = RULES,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> pd.DataFrame:
    """Accuracy when a fraction of each image's visual tokens is dropped after ``layer``.

    Returns:
        DataFrame: rule, fraction, dropped (tokens per image), example, correct, p (answer probability).
    """
    bad = sorted(set(rules) - set(RULES))
    if bad or any(not 0 <= f <= 1 for f in fractions):
        raise ValueError(
            f"rules must be a subset of {RULES} and fractions in [0, 1]; got {list(rules)}, {list(fractions)}"
        )
    n = n_layers(model)
    if not 0 <= layer < n - 1:
        raise ValueError(f"layer must be in 0..{n - 2} (some layer must follow it), got {layer}")
    owl2 = family_spec(model).images_in_sequence  # image rows are sequence positions (Owl2, LLaVA)
    generator = torch.Generator().manual_seed(seed)
    rows, offset = [], 0
    chunks = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    bar = tqdm(total=len(chunks) * len(rules) * len(fractions), desc="pruning", disable=not progress)
    for chunk in chunks:
        batch = processor(text=[e.text for e in chunk], images=[e.images for e in chunk], return_tensors="pt")
        ids = answer_ids(processor, chunk)
        scores, index, (layout, fm) = _received(model, batch, layer)
        pos = last_positions(layout)
        B, N, T = scores.shape
        for rule in rules:
            for fraction in fractions:
                drop = _drop_mask(scores, fraction, rule, generator)
                later = range(layer + 1, n)
                if owl2:  # keys are sequence positions: mark the dropped rows
                    keys = torch.zeros(B, layout.token_kind.shape[1], dtype=torch.bool)
                    keys.scatter_(1, fm.key_position.gather(1, index.view(B, -1)), drop.view(B, -1))
                    ctx = hooks.knockout(model, queries="all", keys=keys, layers=later)
                else:
                    ctx = hooks.knockout(model, queries="all", keys=[], layers=later, image_keys=drop)
                with ctx:
                    logits = model(**batch).logits
                at = gather_positions(logits, pos).float()
                p = torch.softmax(at, -1)[torch.arange(B), ids]
                ok = at.argmax(-1) == ids
                rows.extend(
                    (rule, fraction, int(drop[0, 0].sum()), offset + b, bool(ok[b]), float(p[b]))
                    for b in range(B)
                )
                bar.update()
        offset += B
    bar.close()
    return pd.DataFrame(rows, columns=["rule", "fraction", "dropped", "example", "correct", "p"])


@torch.no_grad()
def answer_visual_share(
    model: nn.Module, processor, examples: Sequence[Example], batch_size: int = 64
) -> tuple[pd.DataFrame, pd.Series]:
    """How much of the answer position's attention lands on the image rows, per layer — and how much
    it would be if attention were spread evenly (FastV's "inefficient attention" compares the two).

    The answer position is each prompt's last real token (it predicts the answer's first word). Only
    for families whose images are sequence rows (Owl2, LLaVA): Owl3's images are keys of the hyper
    layers, where the gate split (``rec.gate_split``) is the comparable quantity.

    Returns:
        (share [examples × layers]: visual share of the last position's self-attention, mean over
        heads; fraction [examples]: image rows / real tokens the last position can see).
    """
    if not family_spec(model).images_in_sequence:
        raise ValueError(
            "answer_visual_share needs images that are sequence rows (Owl2, LLaVA); for Owl3 use "
            "capture(model, gates=True).gate_split"
        )
    shares, fractions, offset = [], [], 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        batch = processor(text=[e.text for e in chunk], images=[e.images for e in chunk], return_tensors="pt")
        with (
            layouts(model) as seen,
            capture(model, heads="mean", queries="last", gates=False, abstractor=False) as rec,
        ):
            model(**batch)
        t = rec.attention_mass
        t = t[(t.kind == "self") & (t.level == "modality") & (t.group == "visual")]
        shares.append(t.pivot_table(index="batch", columns="layer", values="mass", observed=True))
        kind = seen[0].token_kind  # [B, L]
        real = kind != TOKEN_PAD
        fractions.append(((kind == TOKEN_IMAGE) & real).sum(1).double() / real.sum(1).double())
        shares[-1].index += offset
        offset += len(chunk)
    share = pd.concat(shares).rename_axis(index="example", columns="layer")
    fraction = pd.Series(torch.cat(fractions).numpy(), index=share.index, name="visual_fraction")
    return share, fraction


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Accuracy (%) per rule and fraction, its binomial SE, and the paired drop vs fraction 0 with SE."""
    base = df[df.fraction == 0].groupby("example").correct.first()
    out = []
    for (rule, fraction), d in df.groupby(["rule", "fraction"]):
        flags = d.set_index("example").correct.astype(float)
        diff = flags - base.loc[flags.index].astype(float)
        n = len(flags)
        acc = 100 * flags.mean()
        out.append(
            dict(
                rule=rule,
                fraction=fraction,
                dropped=int(d.dropped.iloc[0]),
                n=n,
                accuracy=acc,
                se=(acc * (100 - acc) / n) ** 0.5,
                drop=-100 * diff.mean(),
                drop_se=100 * diff.std(ddof=1) / n**0.5 if n > 1 else 0.0,
            )
        )
    return pd.DataFrame(out)


__all__ = ["RULES", "answer_visual_share", "prune_sweep", "summarize"]
