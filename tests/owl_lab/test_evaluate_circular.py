"""evaluate(): the recipe's optional ``circular`` spec runs the paper's distractor benchmark into metrics."""

from __future__ import annotations

from owl_lab.evaluate import evaluate
from owl_lab.train import build, load_recipe


def test_evaluate_reports_the_circular_curve(monkeypatch):
    recipe = load_recipe("smoke-owl3")
    model, processor = build(recipe)
    seen = []

    def oracle_on_small_n(model, processor, examples, *a, **k):  # right iff fewer than 3 images
        seen.extend(examples)
        return [len(e.images) < 3 for e in examples]

    monkeypatch.setattr("owl_lab.evaluate.exact_match", oracle_on_small_n)
    recipe = {
        **recipe,
        "eval": {
            "seed": 5,
            "n_per_task": 2,
            "tasks": ["color"],
            "circular": {"n_images": [1, 3], "questions": 5},
        },
    }
    metrics = evaluate(model, processor, recipe)
    assert metrics["circular"] == {
        "n_images": [1, 3],
        "circular": [100.0, 0.0],
        "instance": [100.0, 0.0],
        "questions": 5,
    }
    assert any(e.task == "binding" and "In Image" in e.text for e in seen)
    assert "circular" not in evaluate(
        model, processor, {**recipe, "eval": {"tasks": ["color"], "n_per_task": 2}}
    )


def test_evaluate_draws_the_benchmark_with_the_recipes_frame_tags(monkeypatch):
    """A recipe whose world sets ``frame_tags`` is scored on tagged images (train and eval agree)."""
    import numpy as np

    from owl_lab.synth.shapes import BACKGROUND

    recipe = load_recipe("smoke-owl3")
    model, processor = build(recipe)
    seen = []

    def record(model, processor, examples, *a, **k):
        seen.extend(examples)
        return [True] * len(examples)

    monkeypatch.setattr("owl_lab.evaluate.exact_match", record)
    spec = {"seed": 5, "n_per_task": 1, "tasks": ["color"], "circular": {"n_images": [2], "questions": 2}}
    for tags in (False, True):
        seen.clear()
        evaluate(model, processor, {**recipe, "world": {**recipe["world"], "frame_tags": tags}, "eval": spec})
        backgrounds = set()
        for e in seen:
            if e.task == "binding":
                for im in e.images:
                    colors, counts = np.unique(np.asarray(im).reshape(-1, 3), axis=0, return_counts=True)
                    backgrounds.add(tuple(int(v) for v in colors[counts.argmax()]))  # the most common colour
        assert (backgrounds == {BACKGROUND}) != tags
