"""``owl-lab train RECIPE``: train a tiny Owl from data/recipes/RECIPE.json (or a recipe path)."""

from __future__ import annotations

import json
from pathlib import Path

from owl_lab import zoo
from owl_lab.recipes import load_recipe
from owl_lab.train import estimate_seconds, train
from owl_lab.train_curve import HeldOutCurve


def add_arguments(parser):
    parser.add_argument("recipe", help="recipe name (data/recipes/<name>.json) or path to a recipe file")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="checkpoint directory (default: data/checkpoints/<recipe name>)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="override the steps of every stage (debugging)"
    )
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--estimate",
        type=float,
        nargs="?",
        const=0.1,
        default=None,
        metavar="FRACTION",
        help="only project the training time from a run of FRACTION (default 0.1) of every "
        "stage's steps; saves nothing",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="override the recipe's seed (a second-seed run without a file)"
    )
    parser.add_argument(
        "--curve",
        type=int,
        default=0,
        metavar="EVERY",
        help="every EVERY steps, score a small held-out sample (QA, text, CircularEval N=1/5/10 for "
        "binding recipes) into OUT/curve.jsonl (owl_lab/train_curve.py)",
    )
    parser.add_argument(
        "--curve-from", type=int, default=0, metavar="STEP", help="first global step of the --curve"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: OMP_NUM_THREADS, else every core; use 1 per job when running two)",
    )


def run(args) -> int:
    recipe = load_recipe(args.recipe)
    if args.seed is not None:
        recipe = {**recipe, "seed": args.seed}
    if args.estimate is not None:
        if args.steps:
            raise SystemExit("--estimate scales each stage's own steps; it cannot be combined with --steps")
        est = estimate_seconds(recipe, args.estimate, threads=args.threads, progress=not args.quiet)
        print(json.dumps(est, indent=1))
        print(
            f"{recipe['name']}: about {est['projected_seconds'] / 60:.1f} min at {est['threads']} thread(s) "
            f"(projected from {est['measured_seconds']:.0f} s on {args.estimate:g} of the steps)"
        )
        return 0
    out = args.out or zoo.checkpoints_dir() / recipe["name"]
    if args.curve < 0:
        raise SystemExit(f"--curve takes a positive step interval; got {args.curve}")
    curve = HeldOutCurve(recipe, Path(out) / "curve.jsonl", start=args.curve_from) if args.curve else None
    metrics = train(
        recipe,
        out,
        progress=not args.quiet,
        evaluate_after=not args.no_eval,
        steps_override=args.steps,
        threads=args.threads,
        callback=curve,
        callback_every=args.curve,
    )
    public = {k: v for k, v in metrics.items() if not k.startswith("_") and k != "eval"}
    print(json.dumps(public, indent=1))
    print(f"checkpoint written to {out}")
    return 0
