"""Held-out metrics of a tiny Owl: exact-match accuracy per task and the distractor curve.

Scoring is **teacher-forced exact match**: one forward pass over prompt + reference answer + eos,
and a question is correct iff the argmax at every answer position (eos included) is the reference
token. That is exactly "greedy decoding reproduces the answer and then stops": greedy decoding
emits the reference iff each next-token argmax given the correct prefix is the reference token.
It costs one forward per batch instead of one per generated token
(``tests/owl_lab/test_train.py`` checks the equivalence against ``model.generate``).

All accuracies are percentages (0–100) so "within ±1 point" compares like with like.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import pandas as pd
import torch

from owl_lab.families import family_of
from owl_lab.models.owl2 import IMAGE_TOKEN_INDEX
from owl_lab.synth.data import IMAGE_TASKS, TEXT_TASKS, eval_set
from owl_lab.synth.distractor import chance_levels, circular_eval
from owl_lab.synth.multi import distractor_eval
from owl_lab.synth.tasks import Example

IGNORE_INDEX = -100
TIMING_KEYS = ("train_seconds", "eval_seconds")


def tokens_per_image(model) -> int:
    """Sequence rows one image occupies in the decoder (Owl2: abstractor queries + ``vit_eos``)."""
    return int(model.config.tokens_per_image)


def expand_labels(
    labels: torch.Tensor,
    input_ids: torch.Tensor,
    per_image: int,
    length: int,
    attention_mask: torch.Tensor | None = None,
    marker: int = IMAGE_TOKEN_INDEX,
) -> torch.Tensor:
    """Put labels [B, L] on the expanded sequence [B, length] the logits live on (families whose model
    expands each image marker into rows, e.g. Owl2 with ``marker`` = its ``image_token_id``).

    Each ``marker`` in ``input_ids`` becomes ``per_image`` image rows (label -100). Rows that
    expand to fewer than ``length`` positions are padded with -100 on the side the model pads them:
    left when every row of the batch ends with a real token, else right (padding only ever holds
    -100, so truncating it is harmless).
    """
    left = attention_mask is not None and bool(attention_mask[:, -1].all())
    rows = []
    for lab, ids in zip(labels, input_ids, strict=True):
        pieces, last = [], 0
        for p in (ids == marker).nonzero().flatten().tolist():
            pieces += [lab[last:p], lab.new_full((per_image,), IGNORE_INDEX)]
            last = p + 1
        pieces.append(lab[last:])
        row = torch.cat(pieces)[:length]
        pad = row.new_full((length - row.numel(),), IGNORE_INDEX)
        rows.append(torch.cat([pad, row] if left else [row, pad]))
    return torch.stack(rows)  # [B, length]


def collate(processor, examples: Sequence[Example], with_answers: bool = True):
    """Examples → the processor's batch (labels on the answer + eos when ``with_answers``).

    Training examples whose ``meta["turns"]`` holds follow-up chat turns (the ``binding`` task's
    ``binding_turns_per_image``) are sent as multi-turn chats with every answer labelled; without
    ``with_answers`` (generation, scoring) only the first turn is sent."""
    images = [list(e.images) for e in examples]
    turns = [e.meta.get("turns", []) for e in examples]
    extra = {"turns": turns} if with_answers and any(turns) else {}
    return processor(
        text=[e.text for e in examples],
        images=images if any(images) else None,
        answers=[e.answer for e in examples] if with_answers else None,
        return_tensors="pt",
        **extra,
    )


@torch.no_grad()
def exact_match(
    model, processor, examples: Sequence[Example], batch_size: int = 32, max_images_per_batch: int = 128
) -> list[bool]:
    """Teacher-forced exact match of each example's full answer (+ eos), in order."""
    results: list[bool] = []
    i = 0
    while i < len(examples):
        # batch by count and by total images (32-image prompts would otherwise blow up memory)
        j, n_img = i, 0
        while (
            j < len(examples)
            and j - i < batch_size
            and (j == i or n_img + len(examples[j].images) <= max_images_per_batch)
        ):
            n_img += len(examples[j].images)
            j += 1
        batch = collate(processor, examples[i:j])
        labels = batch.pop("labels")
        logits = model(**batch).logits  # [B, L', V]
        spec = family_of(model)
        if spec.expands_image_marker and logits.shape[1] != labels.shape[1]:  # image rows inside the sequence
            labels = expand_labels(
                labels,
                batch["input_ids"],
                tokens_per_image(model),
                logits.shape[1],
                batch.get("attention_mask"),
                marker=spec.image_marker(model.config),
            )
        pred, target = logits[:, :-1].argmax(-1), labels[:, 1:]  # position t predicts token t+1
        scored = target != IGNORE_INDEX
        ok = ((pred == target) | ~scored).all(dim=1) & scored.any(dim=1)
        results += ok.tolist()
        i = j
    return results


def _pct(flags) -> float:
    return round(100.0 * sum(flags) / max(len(flags), 1), 2)


def evaluate(model, processor, recipe: dict, progress: bool = False) -> dict:
    """Recompute the held-out metrics described by ``recipe["eval"]`` (see data/recipes/README.md)."""
    spec = recipe.get("eval", {})
    world = recipe.get("world", {})
    seed, n = spec.get("seed", 1000), spec.get("n_per_task", 200)
    trained = {t for stage in recipe["stages"] for t in stage.get("tasks", {})}
    tasks = spec.get("tasks") or [t for t in IMAGE_TASKS + TEXT_TASKS + ("multi",) if t in trained]
    bs = spec.get("batch_size", 64)
    start = time.perf_counter()
    model.eval()

    accuracy, pooled = {}, {"image": [], "text": []}
    for task in tasks:
        flags = exact_match(model, processor, eval_set(task, n, seed, **world), bs)
        accuracy[task] = _pct(flags)
        if task in IMAGE_TASKS or task in TEXT_TASKS:  # multi-image questions are reported on their own
            pooled["image" if task in IMAGE_TASKS else "text"] += flags
        if progress:
            print(f"  {task:12s} {accuracy[task]:6.2f}")
    metrics = {
        "accuracy": accuracy,
        "image_accuracy": _pct(pooled["image"]) if pooled["image"] else None,
        "text_accuracy": _pct(pooled["text"]) if pooled["text"] else None,
    }
    qa = [accuracy[t] for t in tasks if t in IMAGE_TASKS and t != "caption"]
    metrics["image_qa_accuracy"] = round(sum(qa) / len(qa), 2) if qa else None  # mean over QA tasks

    dspec = spec.get("distractor")
    if dspec:
        curve = {"n_images": [], "circular": [], "instance": []}
        for n_images in dspec.get("n_images", [1, 2, 4, 8, 16, 32]):
            groups = distractor_eval(
                seed,
                n_images,
                dspec.get("questions", 40),
                dspec.get("instances", 3),
                world.get("render_size", 112),
                frame_tags=world.get("frame_tags", False),
            )
            flat = [e for g in groups for e in g]
            flags = exact_match(model, processor, flat, bs)
            k, per_group = 0, []
            for g in groups:
                per_group.append(all(flags[k : k + len(g)]))
                k += len(g)
            curve["n_images"].append(n_images)
            curve["circular"].append(_pct(per_group))
            curve["instance"].append(_pct(flags))
            if progress:
                print(f"  distractors N={n_images:2d} circular {curve['circular'][-1]:6.2f}")
        metrics["distractor"] = curve
    cspec = spec.get("circular")
    if cspec:  # the paper's distractor benchmark (owl_lab.synth.distractor)
        table = circular_curve(
            model,
            processor,
            seed,
            cspec.get("n_images", [1, 5, 10, 20, 50]),
            cspec.get("questions", 40),
            world.get("render_size", 112),
            bs,
            frame_tags=world.get("frame_tags", False),
        )
        metrics["circular"] = {
            "n_images": table["n_images"].tolist(),
            "circular": [round(v, 2) for v in table["circular"]],
            "instance": [round(v, 2) for v in table["instance"]],
            "questions": int(table["questions"].iloc[0]),
        }
        if progress:
            print(table.round(1).to_string(index=False))
    metrics["eval"] = {
        "method": "teacher-forced exact match of answer + eos (= greedy decoding exact match)",
        "seed": seed,
        "n_per_task": n,
        "tasks": tasks,
    }
    metrics["eval_seconds"] = round(time.perf_counter() - start, 1)
    return metrics


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
            out.update({f"{key}[{i}]": x for i, x in enumerate(v)})
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = v
    return out


def compare(shipped: dict, fresh: dict, tolerance: float = 1.0) -> list[str]:
    """Accuracy numbers of ``fresh`` that differ from ``shipped`` by more than ``tolerance`` points."""
    keys = ("accuracy", "image_accuracy", "text_accuracy", "image_qa_accuracy", "distractor")
    a = _flatten({k: shipped.get(k) for k in keys if shipped.get(k) is not None})
    b = _flatten({k: fresh.get(k) for k in keys if fresh.get(k) is not None})
    problems = [f"{k}: missing in the recomputed metrics" for k in a if k not in b]
    problems += [
        f"{k}: shipped {a[k]} vs recomputed {b[k]}" for k in a if k in b and abs(a[k] - b[k]) > tolerance
    ]
    return problems


def circular_scores(model, processor, groups: Sequence[Sequence], batch_size: int = 32) -> dict:
    """Exact match of every instance, pooled per question.

    Returns:
        dict with ``circular`` (% of questions whose instances are all right), ``instance`` (% of
        instances right), ``flags`` (per-question bools, in order; for paired comparisons),
        ``questions`` and ``instances`` (counts).
    """
    if not groups or any(len(g) == 0 for g in groups):
        raise ValueError(
            "circular_scores needs a non-empty list of non-empty instance groups "
            "(synth.distractor_eval output)."
        )
    flat = [ex for g in groups for ex in g]
    hits = exact_match(model, processor, flat, batch_size)
    flags, k = [], 0
    for g in groups:
        flags.append(all(hits[k : k + len(g)]))
        k += len(g)
    return {
        "circular": 100.0 * sum(flags) / len(flags),
        "instance": 100.0 * sum(hits) / len(hits),
        "flags": flags,
        "questions": len(groups),
        "instances": len(flat),
    }


def circular_curve(
    model,
    processor,
    seed: int,
    n_images: Sequence[int] = (1, 5, 10, 20, 50),
    n_questions: int = 40,
    render_size: int = 112,
    batch_size: int = 32,
    frame_tags: bool | str = False,
) -> pd.DataFrame:
    """The paper's distractor benchmark (:func:`owl_lab.synth.distractor.circular_eval`) at each N.

    Returns:
        DataFrame, one row per N: ``n_images``, ``circular`` (% of questions with every rotation right),
        ``se`` (binomial standard error of ``circular``, points), ``instance`` (% of prompts right),
        ``chance_random`` and ``chance_constant`` (:func:`~owl_lab.synth.distractor.chance_levels`),
        ``questions``, ``instances``.
    """
    rows = []
    for n in n_images:
        groups = circular_eval(seed, n, n_questions, render_size, frame_tags=frame_tags)
        score = circular_scores(model, processor, groups, batch_size)
        chance = chance_levels(groups)
        p = score["circular"] / 100.0
        rows.append(
            {
                "n_images": n,
                "circular": score["circular"],
                "se": 100.0 * (p * (1 - p) / score["questions"]) ** 0.5,
                "instance": score["instance"],
                "chance_random": chance["random"],
                "chance_constant": chance["constant"],
                "questions": score["questions"],
                "instances": score["instances"],
            }
        )
    return pd.DataFrame(rows)
