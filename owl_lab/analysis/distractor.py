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

import random
from collections.abc import Sequence

import pandas as pd
import torch

from hooks.capture import capture
from hooks.sites import record
from owl_lab.analysis.probe import linear_probe
from owl_lab.evaluate import circular_curve, circular_scores  # re-exported: they live with evaluate()
from owl_lab.synth.binding_train import task_binding

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


def _label_positions(processor, input_ids: torch.Tensor) -> torch.Tensor:
    """[B] index of the named label X in "In Image X": the token after the first "in", "image" pair."""
    tok = processor.tokenizer
    w_in, w_image = tok.convert_tokens_to_ids("in"), tok.convert_tokens_to_ids("image")
    pair = (input_ids[:, :-2] == w_in) & (input_ids[:, 1:-1] == w_image)  # [B, L-2]
    if not bool(pair.any(1).all()):
        raise ValueError('every prompt must name its image as "In Image X" (or "... in Image X?")')
    return pair.float().argmax(1) + 2


@torch.no_grad()
def question_label_probe(
    model,
    processor,
    n_images: int = 10,
    *,
    positions: Sequence[str] = ("answer", "label"),
    n_train: int = 320,
    n_test: int = 160,
    seed: int | str = 0,
    render_size: int = 112,
    frame_tags: bool | str = False,
    suffix: bool = False,
    batch_size: int = 16,
) -> pd.DataFrame:
    """Does a position know *which image the question names*? A linear probe of the named slot X.

    The paper's lookup "In Image X, {question}" needs X where the lookup happens: the answer position's
    query must prefer image X's keys. This fits, per residual site (``blocks.i.hook_resid_pre`` for each
    layer, then the last ``hook_resid_post``), a softmax-linear probe (:func:`~owl_lab.analysis.probe.
    linear_probe`) from the residual [n, hidden] at each of ``positions`` to X - 1 on ``n_train`` benchmark
    prompts with ``n_images`` images (slots labelled 1..N, fresh scenes from ``seed``), scored on
    ``n_test`` others. Position ``"answer"`` reads the last prompt token (where the answer is made);
    ``"label"`` reads the X token itself, a positive control: its own embedding names X, so layer 0
    must read ~100 %. ``suffix`` asks in the open "… in Image X?" form, where X is the second-to-last
    token. One forward pass per prompt serves every position.

    Returns:
        DataFrame, one row per (position, site): ``position``, ``site``, ``layer`` (the block index;
        ``L`` for the final ``resid_post``), ``accuracy`` (%), ``chance`` (100 / N).
    """
    positions = [positions] if isinstance(positions, str) else list(positions)
    if not positions or any(p not in ("answer", "label") for p in positions):
        raise ValueError(f'positions must be a non-empty list of "answer" / "label"; got {positions!r}')
    if n_images < 2 or n_train < 1 or n_test < 1:
        raise ValueError(f"need n_images >= 2 and n_train, n_test >= 1; got {n_images}, {n_train}, {n_test}")
    n_layers = model.config.get_text_config().num_hidden_layers
    names = [f"blocks.{i}.hook_resid_pre" for i in range(n_layers)]
    names.append(f"blocks.{n_layers - 1}.hook_resid_post")
    layer_of = dict(zip(names, [str(i) for i in range(n_layers)] + ["L"], strict=True))

    def features(split: str, count: int) -> tuple[dict[tuple[str, str], torch.Tensor], torch.Tensor]:
        examples = [
            task_binding(
                random.Random(f"{seed}/label-probe/{split}/{i}"),
                render_size=render_size,
                binding_n=n_images,
                distractor_pool=0,
                frame_tags=frame_tags,
                binding_suffix_share=1.0 if suffix else 0.0,
            )
            for i in range(count)
        ]
        feats: dict[tuple[str, str], list[torch.Tensor]] = {(p, n): [] for p in positions for n in names}
        for i in range(0, count, batch_size):
            chunk = examples[i : i + batch_size]
            batch = processor(text=[e.text for e in chunk], images=[list(e.images) for e in chunk])
            at = {}  # [b] token index per requested position
            if "answer" in positions:
                at["answer"] = batch["attention_mask"].sum(1) - 1  # right padding: the last real token
            if "label" in positions:
                at["label"] = _label_positions(processor, batch["input_ids"])
            with record(model, names) as cache:
                model(**batch)
            rows = torch.arange(len(chunk))
            for p, n in feats:
                feats[(p, n)].append(cache[n][rows, at[p]].float())  # [b, hidden]
        targets = torch.tensor([e.meta["target"] - 1 for e in examples])  # [count] slot of X, 0-based
        return {n: torch.cat(v) for n, v in feats.items()}, targets

    train, train_y = features("train", n_train)
    test, test_y = features("test", n_test)
    return pd.DataFrame(
        [
            {
                "position": p,
                "site": n,
                "layer": layer_of[n],
                "accuracy": linear_probe(train[(p, n)], train_y, test[(p, n)], test_y),
                "chance": 100.0 / n_images,
            }
            for p, n in train
        ]
    )


__all__ = ["IMAGE_KINDS", "circular_curve", "circular_scores", "question_label_probe", "target_share"]
