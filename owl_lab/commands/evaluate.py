"""``owl-lab eval NAME``: recompute a checkpoint's held-out metrics and compare them to metrics.json."""

from __future__ import annotations

import json

import torch

from owl_lab import zoo
from owl_lab.evaluate import compare, evaluate


def add_arguments(parser):
    parser.add_argument("name", help="shipped checkpoint name or checkpoint directory")
    parser.add_argument(
        "--tolerance", type=float, default=1.0, help="allowed difference in points (default 1)"
    )
    parser.add_argument("--write", action="store_true", help="overwrite metrics.json's evaluation fields")


def run(args) -> int:
    directory = zoo.resolve_checkpoint(args.name)
    recipe_path = directory / "recipe.json"
    if not recipe_path.is_file():
        print(f"{directory} has no recipe.json: only checkpoints trained by owl-lab can be evaluated")
        return 2
    recipe = json.loads(recipe_path.read_text())
    torch.set_num_threads(recipe.get("threads", 1))  # as in training (see owl_lab/train.py)
    model, processor = zoo.load_owl(directory)
    fresh = evaluate(model, processor, recipe, progress=True)
    shipped_path = directory / "metrics.json"
    shipped = json.loads(shipped_path.read_text()) if shipped_path.is_file() else {}
    print(f"image accuracy {fresh['image_accuracy']}  text accuracy {fresh['text_accuracy']}")
    if args.write:
        shipped.update(fresh)
        shipped_path.write_text(json.dumps(shipped, indent=2) + "\n")
        print(f"wrote {shipped_path}")
        return 0
    if not shipped:
        print("no shipped metrics.json to compare with")
        return 1
    problems = compare(shipped, fresh, args.tolerance)
    for p in problems:
        print("MISMATCH", p)
    print(
        "metrics reproduced"
        if not problems
        else f"{len(problems)} metric(s) differ by more than {args.tolerance} point(s)"
    )
    return 1 if problems else 0
