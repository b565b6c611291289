"""Train a tiny Owl from a recipe (``data/recipes/<name>.json``) and ship it as a checkpoint.

A recipe names the family, the model config, the world options, one or more training *stages*
(task mix, steps, batch size, lr, schedule, frozen parameters) and the held-out evaluation. Variants
``"extends"`` a base recipe and override only what differs (dicts merge recursively; lists and
scalars replace). See ``data/recipes/README.md``.

The loop is family-agnostic through the processor/model contract::

    batch = processor(text=[...], images=[[...], ...], answers=[...])   # labels on answer + eos
    loss = model(**batch).loss

Reproducibility: ``torch.manual_seed(seed)`` before building the model, every example drawn from
its own string-seeded RNG (:mod:`owl_lab.synth.data`), deterministic CPU kernels and one thread
count ⇒ two runs with one seed give the same losses.

Outputs in the checkpoint directory: ``config.json``, ``model.safetensors``, tokenizer files
(processor.save_pretrained), ``recipe.json`` (the resolved recipe), ``metrics.json``,
``loss_curve.json``.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from owl_lab.analysis.probe import probe_cell_attributes, probe_frame_tags
from owl_lab.evaluate import collate, evaluate
from owl_lab.families import FamilySpec, get_family
from owl_lab.optim import apply_step
from owl_lab.pretrain_vision import run_vision_stage
from owl_lab.recipes import load_recipe, recipes_dir, shipped_recipes, stage_freeze
from owl_lab.sub_batches import batch_loss
from owl_lab.weight_average import WeightAverage
from owl_lab.zoo import load_owl

# the recipe helpers live in owl_lab.recipes (analysis reads them too); re-exported for `owl_lab.train` users
__all__ = [
    "build",
    "copy_text_branch_to_vision",
    "default_threads",
    "estimate_seconds",
    "family_classes",
    "load_recipe",
    "lr_factor",
    "recipes_dir",
    "save",
    "shipped_recipes",
    "stage_freeze",
    "train",
]
from owl_lab.synth.data import Mixture
from owl_lab.synth.tokenizer import build_tokenizer

# --- the family plug-in ------------------------------------------------------------------------


def family_classes(family: str | FamilySpec) -> tuple[type, type, type]:
    """(Config, Model, Processor) classes of a registered family."""
    spec = get_family(family)
    return spec.config_class, spec.model_class, spec.processor_class


def build(recipe: dict):
    """Fresh (model, processor) for a recipe: the config's vocab and special ids come from the tokenizer."""
    family = recipe["family"]
    spec = get_family(family)
    if spec.build_from_recipe is not None:  # a stock transformers family: its config is not one flat dict
        return spec.build_from_recipe(recipe["config"], build_tokenizer(spec), seed=recipe.get("seed", 0))
    Config, Model, Processor = family_classes(family)
    tokenizer = build_tokenizer(family)
    ids = dict(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    config = Config(**{**recipe["config"], **ids})
    torch.manual_seed(recipe.get("seed", 0))
    model = Model(config)
    if recipe.get("vision_branch_from_text", False):
        copy_text_branch_to_vision(model)
    processor = Processor.from_config(config, tokenizer)
    if recipe.get("init"):
        _load_init(model, recipe["init"])
    return model, processor


def _load_init(model, init: str) -> None:
    """Start from a checkpoint's weights (recipe key ``init``: a shipped name or a checkpoint folder), for a
    continuation recipe; the architecture must match the recipe's config exactly."""
    source, _ = load_owl(init)
    try:
        missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    except RuntimeError as err:  # a shape mismatch
        raise ValueError(f"init {init!r} does not fit the recipe's config: {err}") from None
    if missing or unexpected:
        raise ValueError(
            f"init {init!r} does not fit the recipe's config: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def copy_text_branch_to_vision(model) -> int:
    """Initialise every modality-adaptive module's vision branch (``multiway.1``) from its text branch
    (``multiway.0``), as mPLUG-Owl2 does from LLaMA's weights; returns the number of tensors copied.

    Without it the two branches start unrelated, and the image rows' keys/values live in a space the
    text queries have never seen. Raises ValueError on a model without multiway modules."""
    params = dict(model.named_parameters())
    pairs = [
        (name, name.replace(".multiway.1.", ".multiway.0.")) for name in params if ".multiway.1." in name
    ]
    if not pairs:
        raise ValueError(
            "vision_branch_from_text needs a modality-adaptive model (no '.multiway.1.' parameters)"
        )
    with torch.no_grad():
        for vision, text in pairs:
            params[vision].copy_(params[text])
    return len(pairs)


# --- optimisation ------------------------------------------------------------------------------


def lr_factor(step: int, steps: int, warmup: int, schedule: str, final: float) -> float:
    """Linear warm-up, then ``cosine`` or ``linear`` decay to ``final`` × peak (or ``constant``)."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    if schedule == "cosine":
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "linear":
        return final + (1 - final) * (1 - t)
    if schedule == "constant":
        return 1.0
    raise ValueError(f"schedule must be cosine, linear or constant; got {schedule!r}")


def _set_trainable(model, frozen: list[str]) -> list[torch.nn.Parameter]:
    """Freeze parameters whose name matches any regex in ``frozen``; return the trainable ones."""
    patterns = [re.compile(p) for p in frozen]
    if patterns:
        names = [n for n, _ in model.named_parameters()]
        for p in patterns:
            if not any(p.match(n) for n in names):
                raise ValueError(f"freeze pattern {p.pattern!r} matches no parameter (e.g. {names[:3]})")
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(not any(pat.match(name) for pat in patterns))
        if p.requires_grad:
            params.append(p)
    return params


def default_threads() -> int:
    """torch intra-op threads for training: ``OMP_NUM_THREADS`` if set, else every core (two jobs side by
    side should each get ``OMP_NUM_THREADS=1``; measured speed-ups: ``data/recipes/README.md``)."""
    return int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)


def train(
    recipe: dict,
    out_dir: Path | None = None,
    *,
    progress: bool = True,
    evaluate_after: bool = True,
    steps_override: int | None = None,
    callback=None,
    callback_every: int = 0,
    threads: int | None = None,
) -> dict:
    """Run a recipe; save the checkpoint to ``out_dir`` (if given); return the metrics dict.

    ``threads``: torch intra-op threads (default: the recipe's ``"threads"``, else
    :func:`default_threads`). The count is recorded in the metrics; runs with one seed and one
    thread count give identical losses.

    ``callback(global_step, model, processor)`` runs every ``callback_every`` steps (experiments,
    e.g. a held-out accuracy curve); the model is put back in train mode afterwards.
    """
    if steps_override:  # record what actually ran, so the saved recipe reproduces the checkpoint
        recipe = {**recipe, "stages": [{**st, "steps": steps_override} for st in recipe["stages"]]}
    torch.set_num_threads(threads or recipe.get("threads") or default_threads())
    torch.use_deterministic_algorithms(True, warn_only=True)
    seed = recipe.get("seed", 0)
    model, processor = build(recipe)
    world = recipe.get("world", {})
    history: dict[str, list] = {"step": [], "loss": [], "lr": [], "stage": []}
    global_step, start = 0, time.perf_counter()
    vision_probes: dict[str, dict[str, float]] = {}
    stage_seconds: list[float] = []  # the step loop of each stage (not its probe), for time estimates
    model.train()
    for si, stage in enumerate(recipe["stages"]):
        steps = steps_override or stage["steps"]
        stage_start = time.perf_counter()
        if stage.get("kind") == "vision":  # encoder pre-training (see owl_lab/pretrain_vision.py)
            global_step = run_vision_stage(
                model,
                processor,
                recipe["family"],
                dict(stage, steps=steps),
                f"{seed}.{si}",
                world,
                history,
                global_step,
                si,
                progress,
            )
            stage_seconds.append(round(time.perf_counter() - stage_start, 3))
            _report_stage(progress, si, steps, stage_seconds[-1])
            vision_probes[f"stage{si + 1}"] = _probe_vision(model, processor, world, progress)
            if "tags" in stage.get("objectives", []):  # the gate of issue 18: the tag in object patches
                tags = probe_frame_tags(model, processor, world.get("frame_tags") or True)
                vision_probes[f"stage{si + 1}"].update({f"tag_{k}": round(v, 1) for k, v in tags.items()})
                if progress:
                    tqdm.write(f"frame-tag probe (% of patches): {tags}")
            model.train()
            continue
        params = _set_trainable(model, stage_freeze(recipe, stage))
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": stage.get("weight_decay", 0.01)},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=stage["lr"],
            betas=tuple(stage.get("betas", (0.9, 0.98))),
            eps=stage.get("eps", 1e-8),
        )
        warmup = min(stage.get("warmup", 100), steps // 4 or 1)
        mix = Mixture(stage["tasks"], seed=f"{seed}.{si}", **{**world, **stage.get("world", {})})
        bar = tqdm(
            mix.batches(stage["batch_size"], steps),
            total=steps,
            disable=not progress,
            desc=f"{recipe['name']} stage {si + 1}/{len(recipe['stages'])}",
            mininterval=2.0,
        )

        def to_batch(examples):
            return collate(processor, examples)

        # "ema": DECAY: a moving average of the weights, loaded at the stage end (weight_average.py)
        average = WeightAverage(stage["ema"]) if stage.get("ema") else None

        for step, examples in enumerate(bar):
            for group in opt.param_groups:
                group["lr"] = stage["lr"] * lr_factor(
                    step, steps, warmup, stage.get("schedule", "cosine"), stage.get("final_lr_fraction", 0.05)
                )
            # "sub_batches": "modality" runs text-only rows apart from image rows (owl_lab/sub_batches.py)
            loss = batch_loss(model, to_batch, examples, stage.get("sub_batches", "none"))
            global_step = apply_step(opt, loss, params, stage.get("grad_clip", 1.0), history, global_step, si)
            if average is not None:
                average.update(model)
            if callback is not None and callback_every and global_step % callback_every == 0:
                model.eval()
                callback(global_step, model, processor)
                model.train()
            if progress and step % 20 == 0:
                bar.set_postfix(loss=f"{sum(history['loss'][-20:]) / len(history['loss'][-20:]):.4f}")
        if average is not None:
            average.load_into(model)
        stage_seconds.append(round(time.perf_counter() - stage_start, 3))
        _report_stage(progress, si, steps, stage_seconds[-1])
    train_seconds = time.perf_counter() - start
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)

    tail = history["loss"][-50:]
    metrics = {
        "name": recipe["name"],
        "family": recipe["family"],
        "steps": global_step,
        "final_loss": round(sum(tail) / len(tail), 5),
        "first_loss": history["loss"][0],
        "params": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(train_seconds, 1),
        "stage_seconds": stage_seconds,
        "threads": torch.get_num_threads(),
    }
    if vision_probes:
        metrics["vision_probe"] = vision_probes
    if out_dir is not None:  # weights first, so a failing evaluation never loses a training run
        save(model, processor, recipe, metrics, history, Path(out_dir))
    if evaluate_after:
        metrics.update(evaluate(model, processor, recipe, progress=progress))
        if out_dir is not None:
            save(model, processor, recipe, metrics, history, Path(out_dir))
    metrics["_model"], metrics["_processor"], metrics["_history"] = model, processor, history
    return metrics


def estimate_seconds(
    recipe: dict, fraction: float = 0.1, *, threads: int | None = None, progress: bool = True
) -> dict:
    """Project how long ``recipe`` trains, from a run of ``fraction`` of every stage's steps.

    Runs the recipe (nothing saved, no evaluation) with ``max(1, round(fraction × steps))`` steps per
    stage, takes each stage's seconds per step and multiplies by its full step count; the rest
    (model build, encoder probes) is added once, unscaled. The learning-rate schedule shrinks with
    the steps, which does not change the cost of a step. How close the projection came on full runs:
    ``data/recipes/README.md``.

    Returns:
        dict with ``fraction``, ``threads``, ``steps`` (full, per stage), ``ms_per_step`` (per stage),
        ``measured_seconds`` (the short run) and ``projected_seconds`` (the full recipe).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    full = [stage["steps"] for stage in recipe["stages"]]
    short = [max(1, round(fraction * n)) for n in full]
    run = train(
        {**recipe, "stages": [{**st, "steps": n} for st, n in zip(recipe["stages"], short, strict=True)]},
        None,
        progress=progress,
        evaluate_after=False,
        threads=threads,
    )
    per_step = [sec / n for sec, n in zip(run["stage_seconds"], short, strict=True)]
    overhead = max(0.0, run["train_seconds"] - sum(run["stage_seconds"]))
    return {
        "fraction": fraction,
        "threads": run["threads"],
        "steps": full,
        "ms_per_step": [round(1000 * t, 1) for t in per_step],
        "measured_seconds": run["train_seconds"],
        "projected_seconds": round(sum(t * n for t, n in zip(per_step, full, strict=True)) + overhead, 1),
    }


def _report_stage(progress: bool, si: int, steps: int, seconds: float) -> None:
    """One line per finished stage, so a slow run (or ``--estimate`` on a loaded machine) shows its
    per-stage cost as it goes instead of only at the end."""
    if progress:
        tqdm.write(
            f"stage {si + 1}: {steps} steps in {seconds:.1f} s ({1000 * seconds / max(1, steps):.0f} ms/step)"
        )


def _probe_vision(model, processor, world: dict, progress: bool) -> dict[str, float]:
    """Linear-probe accuracy (%) of each cell attribute on the encoder's patch features right after a
    vision stage (:func:`owl_lab.analysis.probe.probe_cell_attributes`, 500 + 200 scenes).

    Recorded in metrics.json as ``vision_probe``: an encoder that failed to pick up an attribute (the
    pattern plateau of some seeds) shows here, before the language stages spend 15 minutes on it.
    Draws no global random numbers, so the rest of the run is unchanged.
    """

    model.eval()
    result = {
        k: round(v, 1)
        for k, v in probe_cell_attributes(
            model, processor, n_train=500, n_test=200, render_size=world.get("render_size", 112)
        ).items()
    }
    if progress:
        tqdm.write(f"vision probe after pre-training (% of object patches): {result}")
    return result


def save(model, processor, recipe: dict, metrics: dict, history: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    public = {k: v for k, v in metrics.items() if not k.startswith("_")}
    (out_dir / "metrics.json").write_text(json.dumps(public, indent=2) + "\n")
    (out_dir / "loss_curve.json").write_text(json.dumps(history) + "\n")
