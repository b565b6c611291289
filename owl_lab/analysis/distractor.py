"""Distractor resistance (Owl3 paper §4.5, Fig. 4): CircularEval accuracy against the number of
images, and how much of the answer position's cross-attention lands on the image the question names.

    groups = synth.distractor_eval(seed, n_images, n_questions, n_instances)   # list of instance lists
    score = circular_scores(model, processor, groups)    # per-question flags + accuracies in %
    share = target_share(model, processor, [ex for g in groups for ex in g])   # [hyper layer] table

CircularEval: a question counts only if **every** instance of it (a different position of the true
image and a different set of distractor scenes) is answered exactly (teacher-forced exact match,
:func:`owl_lab.evaluate.exact_match`).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from hooks.capture import capture
from owl_lab.evaluate import circular_curve, circular_scores  # re-exported: they live with evaluate()

IMAGE_KINDS = ("cross", "joint")  # gated/static Owl3: a cross softmax over images; fused: one joint softmax


def _target_rows(df: pd.DataFrame, last: torch.Tensor, targets: list[int]) -> pd.DataFrame:
    """Per (batch, layer, head): mass on the target image over mass on all images, last query only."""
    rows = df[
        df["kind"].isin(IMAGE_KINDS)
        & (df["level"] == "token")
        & df["group"].astype(str).str.startswith("image:")
    ]
    rows = rows[rows["query"].to_numpy() == last.numpy()[rows["batch"].to_numpy()]]
    target_group = pd.Series([f"image:{t}" for t in targets])[rows["batch"].to_numpy()].to_numpy()
    rows = rows.assign(
        on_target=rows["mass"].where(rows["group"].astype(str).to_numpy() == target_group, 0.0)
    )
    per_head = rows.groupby(["batch", "layer", "head"], observed=True)[["on_target", "mass"]].sum()
    return (per_head["on_target"] / per_head["mass"]).rename("share").reset_index()


@torch.no_grad()
def target_share(
    model, processor, examples: Sequence, batch_size: int = 8, per_example: bool = False
) -> pd.DataFrame:
    """Share of the image attention the last prompt position puts on the asked-about image.

    For each example (``meta['target']`` is the 1-based true image, all images visible to the last
    position), at every hyper layer: mass on ``image:{target-1}`` divided by the mass on all images
    (gated models: the cross softmax, which already sums to 1 over images; fused: the image part of the
    joint softmax, renormalised), then the mean over heads and examples. Chance = 1/N.

    Returns:
        DataFrame indexed by layer with columns ``share`` (mean), ``chance`` (mean 1/N) and
        ``above_chance`` (fraction of examples whose head-mean share exceeds their 1/N). With
        ``per_example=True``: one row per (example, layer) with ``share`` and ``chance`` (for
        standard errors over examples).
    """
    layers = list(getattr(model.config, "hyper_layer_indices", []) or [])
    if not layers:
        raise ValueError("target_share needs an Owl3 model with hyper layers (config.hyper_layer_indices).")
    parts = []
    for i in range(0, len(examples), batch_size):
        chunk = list(examples[i : i + batch_size])
        targets = [int(ex.meta["target"]) - 1 for ex in chunk]  # meta is 1-based, groups 0-based
        batch = processor(text=[ex.text for ex in chunk], images=[list(ex.images) for ex in chunk])
        last = batch["attention_mask"].sum(1) - 1  # right padding: the last real token of each row
        with capture(model, layers=layers, gates=False) as rec:
            model(**batch)
        per = _target_rows(rec.attention_mass, last, targets)
        per = per.groupby(["batch", "layer"], as_index=False)["share"].mean()  # mean over heads
        per["chance"] = [1.0 / len(chunk[b].images) for b in per["batch"]]
        per["example"] = per["batch"] + i
        parts.append(per)
    table = pd.concat(parts, ignore_index=True)
    table["above_chance"] = table["share"] > table["chance"]
    if per_example:
        return table[["example", "layer", "share", "chance", "above_chance"]]
    out = table.groupby("layer")[["share", "chance", "above_chance"]].mean()
    if len(out) != len(layers) or table["example"].nunique() != len(examples):
        raise ValueError(
            "some examples had no image attention at their last position; does every "
            "prompt show its images before the question?"
        )
    return out


__all__ = ["IMAGE_KINDS", "circular_curve", "circular_scores", "target_share"]
