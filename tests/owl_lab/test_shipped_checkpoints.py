"""Every shipped checkpoint loads through load_owl, matches its recipe, and reproduces its metrics."""

from __future__ import annotations

import json

import pytest
import torch

from owl_lab import load_owl, zoo
from owl_lab.evaluate import evaluate
from owl_lab.train import load_recipe

SHIPPED = zoo.list_checkpoints()


def _accuracies(metrics: dict) -> dict[str, float]:
    flat = {f"accuracy.{k}": v for k, v in metrics.get("accuracy", {}).items()}
    for key in ("image_accuracy", "text_accuracy", "image_qa_accuracy"):
        if key in metrics:
            flat[key] = metrics[key]
    return flat


def test_the_notebooks_checkpoints_are_shipped():
    assert {
        "owl2-tiny",
        "owl2-tiny-nomam",
        "owl3-tiny",
        "owl3-tiny-fused",
        "llava-tiny",
        "llava-tiny-s1",
    } <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_reproduces_its_metrics(name):
    directory = zoo.checkpoints_dir() / name
    recipe = json.loads((directory / "recipe.json").read_text())
    assert load_recipe(name) == recipe, "data/recipes/<name>.json must be the recipe that made the checkpoint"
    assert recipe.get("ship") is True
    model, processor = load_owl(name)
    assert zoo.detect_family(directory) == recipe["family"]
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.get("threads", 1))
    try:
        fresh = evaluate(model, processor, recipe)
    finally:
        torch.set_num_threads(threads)
    shipped = _accuracies(json.loads((directory / "metrics.json").read_text()))
    recomputed = _accuracies(fresh)
    assert shipped, "metrics.json has no accuracies"
    off = {
        k: (v, recomputed.get(k))
        for k, v in shipped.items()
        if recomputed.get(k) is None or abs(recomputed[k] - v) > 1.0
    }
    assert not off, f"metrics not reproduced within ±1 point (shipped, recomputed): {off}"
