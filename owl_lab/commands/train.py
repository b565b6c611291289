"""``owl-lab train RECIPE``: train a tiny Owl from data/recipes/RECIPE.json (or a recipe path)."""
from __future__ import annotations

import json
from pathlib import Path

from owl_lab import zoo


def add_arguments(parser):
    parser.add_argument("recipe", help="recipe name (data/recipes/<name>.json) or path to a recipe file")
    parser.add_argument("--out", type=Path, default=None,
                        help="checkpoint directory (default: data/checkpoints/<recipe name>)")
    parser.add_argument("--steps", type=int, default=None, help="override the steps of every stage (debugging)")
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: OMP_NUM_THREADS, else every core; use 1 per job when running two)")


def run(args) -> int:
    from owl_lab.train import load_recipe, train

    recipe = load_recipe(args.recipe)
    out = args.out or zoo.checkpoints_dir() / recipe["name"]
    metrics = train(recipe, out, progress=not args.quiet, evaluate_after=not args.no_eval,
                    steps_override=args.steps, threads=args.threads)
    public = {k: v for k, v in metrics.items() if not k.startswith("_") and k != "eval"}
    print(json.dumps(public, indent=1))
    print(f"checkpoint written to {out}")
    return 0
