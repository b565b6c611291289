"""A held-out learning curve recorded *during* training (``owl-lab train NAME --curve EVERY``).

The shipped metrics say where a recipe ends; a curve says how it got there and whether more steps would
help, which is what a recipe decision needs (issue 18's budget question is one). Every ``every`` global
steps from ``start`` on, :class:`HeldOutCurve` scores the model on a small held-out sample: the mean of
the single-image QA tasks, the text tasks, and, for recipes that train the many-image ``binding`` task,
the paper's CircularEval at a few N. Rows go to ``<out>/curve.jsonl`` as they are measured, so a stopped
run keeps its curve (a new run into the same folder starts the file afresh); ``train_s`` is training time
only (the evaluations are excluded).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from owl_lab.evaluate import circular_curve, evaluate

__all__ = ["HeldOutCurve", "read_curve"]


class HeldOutCurve:
    """``callback(global_step, model, processor)`` for :func:`owl_lab.train.train`.

    Args:
        recipe: the recipe being trained (its ``world`` renders the held-out examples).
        path: the JSON-lines file to append to (created with its folder).
        start: first global step to score (earlier callbacks are skipped; e.g. the end of a base stage).
        n_per_task: held-out examples per QA / text task (seed 1000, as the shipped evaluation).
        circular_n: N values of the CircularEval (seed 3000, ``questions`` questions × rotations);
            empty, or a recipe without the ``binding`` task, skips it.

    Each row: ``step``, ``train_s``, ``qa`` (mean % over the image QA tasks), ``text`` (%), and with the
    benchmark ``n_images``, ``circular`` and ``instance`` (lists, %), ``questions``.
    """

    def __init__(
        self,
        recipe: dict,
        path: Path,
        start: int = 0,
        n_per_task: int = 30,
        circular_n: tuple[int, ...] = (1, 5, 10),
        questions: int = 30,
    ):
        if n_per_task < 1 or questions < 1:
            raise ValueError(f"need n_per_task and questions >= 1; got {n_per_task}, {questions}")
        self.recipe, self.path, self.start = recipe, Path(path), start
        self.n_per_task, self.questions = n_per_task, questions
        trains_binding = any("binding" in st.get("tasks", {}) for st in recipe["stages"])
        self.circular_n = tuple(circular_n) if trains_binding else ()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")  # a new run starts a new curve
        self._t0, self._eval_s = time.perf_counter(), 0.0

    def __call__(self, step: int, model, processor) -> dict | None:
        if step < self.start:
            return None
        t = time.perf_counter()
        quick = {**self.recipe, "eval": {"seed": 1000, "n_per_task": self.n_per_task}}
        scores = evaluate(model, processor, quick)
        row = {
            "step": step,
            "train_s": round(t - self._t0 - self._eval_s, 1),
            "qa": scores["image_qa_accuracy"],
            "text": scores["text_accuracy"],
        }
        if self.circular_n:
            world = self.recipe.get("world", {})
            table = circular_curve(
                model,
                processor,
                3000,
                self.circular_n,
                self.questions,
                world.get("render_size", 112),
                frame_tags=world.get("frame_tags", False),
            )
            row |= {
                "n_images": list(self.circular_n),
                "circular": [round(v, 1) for v in table["circular"]],
                "instance": [round(v, 1) for v in table["instance"]],
                "questions": self.questions,
            }
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self._eval_s += time.perf_counter() - t
        return row


def read_curve(path: Path) -> list[dict]:
    """The rows of a ``curve.jsonl`` written by :class:`HeldOutCurve`, in step order."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["step"])
