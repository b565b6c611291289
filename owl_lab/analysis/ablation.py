"""Ablation sweeps (Owl2 Tables 6-8, Owl3 Tables 8-10): what each checkpoint *is*, held-out correct
flags on shared seeded questions, and the trainer's ``metrics.json`` beside the recomputed numbers.

    info = describe(model.config, directory)              # read from the config, not from the name
    flags[label] = score_tasks(model, processor, eval_sets)   # {task: [bool, ...]}
    flags[label] |= {"distractor:8": circular_scores(...)["flags"]}
    table = accuracy_table(flags, {"QA": QA_TASKS, "multi": ["multi"]})   # label × column, in %
    diffs = paired_table(flags, "owl3-tiny", columns)     # each variant minus the baseline, paired SE
    check = crosscheck(flags, {label: shipped_accuracy(directory)}, columns)

A *column* pools one or more flag keys: a task name (``eval_set`` flags, one per question) or
``"distractor:N"`` (CircularEval flags, one per question, at N images). All checkpoints must be
scored on the same questions, so per-question flags pair up across them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from owl_lab import evaluate
from owl_lab.analysis.stats import binomial_se, paired_difference
from owl_lab.families import FamilySpec, family_for_model_type
from owl_lab.recipes import stage_freeze
from owl_lab.zoo import resolve_checkpoint

DISTRACTOR = "distractor:"  # flag key prefix: "distractor:8" = circular flags at N = 8 images
Columns = Mapping[str, Sequence[str]]


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _vit_training(recipe: dict, spec: FamilySpec) -> str:
    """'trainable', 'frozen' or 'partly frozen' from the language stages' ``freeze`` regexes."""
    stages = [s for s in recipe.get("stages", []) if s.get("kind") != "vision"]
    if not stages:
        return "unknown"
    probe = spec.path("vision_layer", k=0) + ".mlp.fc1.weight"  # any ViT parameter name
    frozen = [any(re.match(p, probe) for p in stage_freeze(recipe, s)) for s in stages]
    return "frozen" if all(frozen) else "partly frozen" if any(frozen) else "trainable"


def exists(name_or_dir: str | Path) -> bool:
    """True if ``load_owl`` can find this checkpoint (a shipped name or a checkpoint directory).
    Notebooks use it to list the variants a folder holds."""
    try:
        resolve_checkpoint(name_or_dir)
    except (FileNotFoundError, ValueError):
        return False
    return True


def describe(config, directory: str | Path | None = None) -> dict:
    """The ablation-relevant facts of one checkpoint, read from its (loaded) config.

    Owl2: abstractor ``queries``, ``image_size`` and ``patch_size`` of the ViT, ``patches`` per image,
    ``tokens_per_image`` in the decoder, ``mam``, and ``vit`` (trainable/frozen, from the
    ``recipe.json`` in ``directory``; "unknown" without one). Owl3: ``hyper_attention``, ``mi_rope``,
    ``hyper_layers`` (1-based, the official convention), ``projector``, ``image_size``.
    """
    spec = family_for_model_type(getattr(config, "model_type", None))
    # the ablation axes are each paper's own (MAM / queries / resolution vs gate / MI-RoPE / placement):
    # a per-family table, not a registry fact
    if spec is not None and spec.name == "owl2":
        vm = config.visual_config["visual_model"]
        ab = config.visual_config["visual_abstractor"]
        recipe = _json(Path(directory) / "recipe.json") if directory is not None else {}
        return {
            "queries": int(ab["num_learnable_queries"]),
            "image_size": int(vm["image_size"]),
            "patch_size": int(vm["patch_size"]),
            "patches": (vm["image_size"] // vm["patch_size"]) ** 2,
            "tokens_per_image": int(config.tokens_per_image),
            "mam": bool(getattr(config, "modality_adaptive", True)),
            "vit": _vit_training(recipe, spec),
        }
    if spec is not None and spec.name == "owl3":
        return {
            "hyper_attention": str(config.hyper_attention),
            "mi_rope": bool(config.mi_rope),
            "hyper_layers": ",".join(str(x) for x in config.hyper_layers),
            "projector": str(config.projector),
            "image_size": int(config.image_size),
        }
    model_type = getattr(config, "model_type", None)
    raise ValueError(
        f"describe expects an Owl2 ('mplug_owl2') or Owl3 ('mplugowl3') config, got {model_type!r}"
    )


def score_tasks(
    model, processor, eval_sets: Mapping[str, Sequence], batch_size: int = 64
) -> dict[str, list[bool]]:
    """Teacher-forced exact-match flags per task (``evaluate.exact_match``), in question order."""
    return {
        task: evaluate.exact_match(model, processor, examples, batch_size)
        for task, examples in eval_sets.items()
    }


def shipped_accuracy(directory: str | Path) -> dict[str, tuple[float, int]]:
    """The trainer's ``metrics.json`` keyed like the flags: task or ``"distractor:N"`` → (accuracy %, n).

    n is ``eval.n_per_task`` for tasks and ``recipe.json``'s ``eval.distractor.questions`` (default
    40, as in ``evaluate.evaluate``) for the CircularEval points. Empty without a metrics.json.
    """
    directory = Path(directory)
    metrics, recipe = _json(directory / "metrics.json"), _json(directory / "recipe.json")
    n = int(metrics.get("eval", {}).get("n_per_task", 200))
    out = {task: (float(acc), n) for task, acc in metrics.get("accuracy", {}).items()}
    curve = metrics.get("distractor")
    if curve:
        q = int(recipe.get("eval", {}).get("distractor", {}).get("questions", 40))
        out |= {
            f"{DISTRACTOR}{k}": (float(a), q)
            for k, a in zip(curve["n_images"], curve["circular"], strict=True)
        }
    return out


def pool(flags: Mapping[str, Sequence], keys: Sequence[str]) -> list:
    """All flags of ``keys`` concatenated (one checkpoint's ``{key: flags}``), in order."""
    missing = [k for k in keys if k not in flags]
    if missing:
        raise ValueError(f"no flags for {missing}; scored keys are {sorted(flags)}")
    return [f for k in keys for f in flags[k]]


def accuracy_table(
    flags: Mapping[str, Mapping[str, Sequence]], columns: Columns, se: bool = False
) -> pd.DataFrame:
    """Accuracy (%) per checkpoint label (rows) and column (pooled flag keys); ``se=True``: binomial SE."""
    rows = {}
    for label, per in flags.items():
        pooled = {c: pool(per, keys) for c, keys in columns.items()}
        rows[label] = {c: binomial_se(v) if se else 100.0 * sum(v) / len(v) for c, v in pooled.items()}
    return pd.DataFrame.from_dict(rows, orient="index")[list(columns)]


def pair_table(
    flags: Mapping[str, Mapping[str, Sequence]],
    pairs: Mapping[str, tuple[str, str]],
    columns: Columns,
    k: float = 2.0,
) -> pd.DataFrame:
    """``a − b`` on the same questions for each named pair ``{comparison: (a, b)}`` of scored labels.

    One row per (comparison, column); columns ``a``, ``b`` (accuracies %), ``diff``, ``se`` (paired),
    ``beyond`` (|diff| > k·se) and ``n``. E.g. ``{"seed 1 − seed 0": ("m-s1", "m"), "gate, seed 0": ...}``
    sets an ablation's effect beside the seed-to-seed difference of one design.
    """
    unknown = sorted({x for pair in pairs.values() for x in pair} - set(flags))
    if unknown:
        raise ValueError(f"{unknown} are not among the scored labels {list(flags)}")
    rows = []
    for name, (a, b) in pairs.items():
        for c, keys in columns.items():
            d = paired_difference(pool(flags[a], keys), pool(flags[b], keys), k=k)
            rows.append(
                {
                    "comparison": name,
                    "column": c,
                    "a": d["a"],
                    "b": d["b"],
                    "diff": d["diff"],
                    "se": d["se"],
                    "beyond": d["beyond_noise"],
                    "n": d["n"],
                }
            )
    return pd.DataFrame(rows).set_index(["comparison", "column"])


def replicate_verdict(
    table: pd.DataFrame, effects: Sequence[str], spreads: Sequence[str], column: str
) -> str:
    """Does an effect survive a change of training seed? One line, from a :func:`pair_table`.

    ``effects``: the rows holding the same ablation effect in each seed (e.g. "gate effect, seed 0",
    "…, seed 1"); ``spreads``: the rows holding seed 1 − seed 0 of one design. True/False answers: the
    effect keeps its sign in every seed, and its smallest size exceeds the largest seed-to-seed
    difference.
    """
    effect = [float(table.loc[(e, column), "diff"]) for e in effects]
    spread = max(abs(float(table.loc[(r, column), "diff"])) for r in spreads)
    same_sign = all(x > 0 for x in effect) or all(x < 0 for x in effect)
    sizes = ", ".join(f"{x:+.1f}" for x in effect)
    return (
        f"{column}: the effect keeps its sign across seeds: {same_sign} ({sizes} points); it exceeds the "
        f"largest seed-to-seed difference ({spread:.1f} points): {min(abs(x) for x in effect) > spread}"
    )


def paired_table(
    flags: Mapping[str, Mapping[str, Sequence]], baseline: str, columns: Columns, k: float = 2.0
) -> pd.DataFrame:
    """Each other label minus ``baseline`` on the same questions: one row per (variant, column).

    Columns: ``baseline``, ``variant acc`` (accuracies %), ``diff`` (variant − baseline), ``se`` (paired),
    ``beyond`` (|diff| > k·se) and ``n``.
    """
    if baseline not in flags:
        raise ValueError(f"baseline {baseline!r} is not among the scored labels {list(flags)}")
    pairs = {label: (label, baseline) for label in flags if label != baseline}
    table = pair_table(flags, pairs, columns, k).rename(columns={"a": "variant acc", "b": "baseline"})
    return table.rename_axis(["variant", "column"])[["baseline", "variant acc", "diff", "se", "beyond", "n"]]


def crosscheck(
    flags: Mapping[str, Mapping[str, Sequence]],
    shipped: Mapping[str, Mapping[str, tuple]],
    columns: Columns,
    k: float = 3.0,
) -> pd.DataFrame:
    """Recomputed accuracy beside the shipped one, per (label, column): a two-proportion z-test.

    Pooled shipped columns are the n-weighted mean of their keys. ``se`` is the SE of the difference
    under "both samples measure one accuracy" (the pooled proportion p over n + n_shipped questions:
    √(p(1−p)(1/n + 1/n_shipped))); ``beyond`` = |ours − shipped| > k·se. The pooled p matters near 0 or
    100 %: one sample's own SE there is tiny (1 of 40 right gives 2.5 ± 2.5 %), so per-sample SEs flag
    differences that chance explains (with different question seeds, a few cells in 2 SE are chance).
    Columns whose keys are not all in a checkpoint's metrics.json get NaN (and ``beyond`` False);
    columns a checkpoint was not scored on (keys missing from its flags) are left out.
    """
    rows = []
    for label, per in flags.items():
        for c, keys in columns.items():
            if not all(key in per for key in keys):
                continue
            ours = pool(per, keys)
            acc, n = 100.0 * sum(ours) / len(ours), len(ours)
            have = shipped.get(label, {})
            if all(key in have for key in keys):
                n_s = sum(have[key][1] for key in keys)
                acc_s = sum(have[key][0] * have[key][1] for key in keys) / n_s
                pooled_p = (acc * n + acc_s * n_s) / (n + n_s) / 100.0
                se = 100.0 * math.sqrt(pooled_p * (1.0 - pooled_p) * (1.0 / n + 1.0 / n_s))
            else:
                acc_s = n_s = se = math.nan
            diff = acc - acc_s
            rows.append(
                {
                    "label": label,
                    "column": c,
                    "ours": acc,
                    "n": n,
                    "shipped": acc_s,
                    "n shipped": n_s,
                    "diff": diff,
                    "se": se,
                    "beyond": bool(abs(diff) > k * se) if se == se else False,
                }
            )
    return pd.DataFrame(rows).set_index(["label", "column"])


def chance_check(flags: Sequence, chance: float, k: float = 2.0) -> dict:
    """Is an accuracy indistinguishable from guessing? ``chance`` in % (e.g. 100/3).

    Returns ``acc``, ``chance``, ``se`` (binomial SE *at chance*, the null's spread), ``at_chance``
    (|acc − chance| ≤ k·se) and ``above`` (acc > chance + k·se).
    """
    vals = [float(f) for f in flags]
    if not vals:
        raise ValueError("chance_check needs at least one flag")
    acc, se = 100.0 * sum(vals) / len(vals), binomial_se(chance, len(vals))
    return {
        "acc": acc,
        "chance": chance,
        "se": se,
        "n": len(vals),
        "at_chance": abs(acc - chance) <= k * se,
        "above": acc > chance + k * se,
    }


def difference_text(d: dict, k: float = 2.0) -> str:
    """One-line summary of a ``paired_difference`` result: 'b% -> a%, Δ ± se (paired SE), beyond 2 SE: …'."""
    return (
        f"{d['b']:.1f}% -> {d['a']:.1f}%, Δ {d['diff']:+.1f} ± {d['se']:.1f} (paired SE); "
        f"beyond {k:g} SE: {d['beyond_noise']}"
    )


__all__ = [
    "DISTRACTOR",
    "accuracy_table",
    "chance_check",
    "crosscheck",
    "describe",
    "difference_text",
    "paired_table",
    "pool",
    "score_tasks",
    "shipped_accuracy",
]
