"""``owl-lab reproduce``: retrain every shipped checkpoint from its recipe (one after another)."""

from __future__ import annotations

import time
from pathlib import Path

from owl_lab import zoo
from owl_lab.recipes import load_recipe, shipped_recipes
from owl_lab.train import train


def add_arguments(parser):
    parser.add_argument(
        "names", nargs="*", help='recipes to retrain (default: every recipe with "ship": true)'
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write checkpoints under this folder instead of data/checkpoints",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: OMP_NUM_THREADS, else every core; use 1 per job when running two)",
    )


def run(args) -> int:
    names = args.names or shipped_recipes()
    root = args.out or zoo.checkpoints_dir()
    start = time.perf_counter()
    for i, name in enumerate(names, 1):
        recipe = load_recipe(name)
        print(f"[{i}/{len(names)}] {name}")
        m = train(recipe, root / recipe["name"], progress=not args.quiet, threads=args.threads)
        print(f"  image {m.get('image_accuracy')}  text {m.get('text_accuracy')}  {m['train_seconds']} s")
    print(f"retrained {len(names)} checkpoint(s) in {time.perf_counter() - start:.0f} s into {root}")
    return 0
