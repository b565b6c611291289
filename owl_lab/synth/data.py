"""Seeded task mixtures: the training stream and the held-out evaluation sets.

Every example is generated from its own ``random.Random`` seeded with a string such as
``"0/train/1234"`` (string seeds hash with SHA-512, so they are stable across runs, machines and
``PYTHONHASHSEED``). Training and evaluation draw from different seed strings: the held-out set is
an independent sample of the same distribution. For the image tasks the scene space is so large
that held-out scenes are practically never seen in training; the text tasks have small answer
tables (e.g. ``a plus b`` for one-digit a, b), so there "held-out" measures whether the skill was
learned, not generalisation to unseen pairs.
"""
from __future__ import annotations

import random
from collections.abc import Iterator, Mapping

from owl_lab.synth.multi import task_multi
from owl_lab.synth.tasks import IMAGE_TASKS, TASKS, TEXT_TASKS, Example

ALL_TASKS = dict(TASKS, multi=task_multi)


def _check_tasks(names) -> None:
    unknown = sorted(set(names) - set(ALL_TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; expected names from {sorted(ALL_TASKS)}")


def generate(task: str, rng: random.Random, **world) -> Example:
    """One example of ``task``; ``world`` holds options such as ``render_size``."""
    _check_tasks([task])
    return ALL_TASKS[task](rng, **world)


class Mixture:
    """A weighted mix of tasks, e.g. ``Mixture({"color": 1, "add": 2}, seed=0)``.

    ``example(i)`` is a pure function of (weights, seed, i, world): reproducible and random-access.
    """

    def __init__(self, weights: Mapping[str, float], seed: int = 0, split: str = "train", **world):
        if not weights:
            raise ValueError("a task mixture needs at least one task with a positive weight")
        _check_tasks(weights)
        self.names = sorted(weights)  # sorted: the dict's order must not change the stream
        self.weights = [float(weights[n]) for n in self.names]
        self.seed, self.split, self.world = seed, split, world

    def example(self, i: int) -> Example:
        rng = random.Random(f"{self.seed}/{self.split}/{i}")
        task = rng.choices(self.names, weights=self.weights)[0]
        return ALL_TASKS[task](rng, **self.world)

    def batches(self, batch_size: int, steps: int, start: int = 0) -> Iterator[list[Example]]:
        for step in range(start, steps):
            yield [self.example(step * batch_size + j) for j in range(batch_size)]


def eval_set(task: str, n: int, seed: int = 0, **world) -> list[Example]:
    """``n`` held-out examples of one task (seed strings disjoint from the training stream)."""
    _check_tasks([task])
    return [ALL_TASKS[task](random.Random(f"{seed}/eval/{task}/{i}"), **world) for i in range(n)]


__all__ = ["ALL_TASKS", "IMAGE_TASKS", "TEXT_TASKS", "Mixture", "eval_set", "generate"]
