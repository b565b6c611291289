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

from owl_lab.synth.binding_train import task_binding, task_find
from owl_lab.synth.distractor import sample_n_images
from owl_lab.synth.multi import task_multi
from owl_lab.synth.shapes import frame_tag_mode
from owl_lab.synth.tasks import IMAGE_TASKS, TASKS, TEXT_TASKS, Example

ALL_TASKS = dict(TASKS, multi=task_multi, binding=task_binding)


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
        try:  # fail at construction, not at the first multi-image example thousands of steps in
            frame_tag_mode(world.get("frame_tags", False))
        except ValueError as err:
            raise ValueError(f"world option {err}") from None
        self.names = sorted(weights)  # sorted: the dict's order must not change the stream
        self.weights = [float(weights[n]) for n in self.names]
        self.seed, self.split, self.world = seed, split, world

    def example(self, i: int) -> Example:
        rng = random.Random(f"{self.seed}/{self.split}/{i}")
        task = rng.choices(self.names, weights=self.weights)[0]
        return ALL_TASKS[task](rng, **self.world)

    def batches(self, batch_size: int, steps: int, start: int = 0) -> Iterator[list[Example]]:
        """Batches of ``batch_size`` examples; with the ``binding`` task in the mix, see
        :meth:`binding_batch`."""
        for step in range(start, steps):
            if "binding" in self.names:
                yield self.binding_batch(step, batch_size)
            else:
                yield [self.example(step * batch_size + j) for j in range(batch_size)]

    def binding_batch(self, step: int, batch_size: int) -> list[Example]:
        """A step of a mix that holds the many-image ``binding`` task.

        Owl3 pads every sample of a batch to the batch's largest image count and sequence length, so
        one 50-image prompt would make a whole batch of one-image questions cost as much as 32
        fifty-image prompts. Each step is therefore either a *binding batch* (probability = the task's
        weight share) whose prompts all share one N (drawn per step from ``binding_n_choices`` when the
        world sets it, else by ``binding_curve`` up to ``binding_max_images``), with
        ``binding_images_per_batch`` / N prompts (at least 2, at most ``batch_size``), or an ordinary
        batch of the other tasks.
        """
        rng = random.Random(f"{self.seed}/{self.split}/step{step}")
        share = self.weights[self.names.index("binding")] / sum(self.weights)
        if rng.random() < share:
            if self.world.get("binding_n_choices"):  # a curriculum phase: N uniform over a fixed set
                n = rng.choice(list(self.world["binding_n_choices"]))
            else:
                n = sample_n_images(
                    rng,
                    self.world.get("binding_max_images", 50),
                    self.world.get("binding_curve", "loguniform"),
                )
            size = max(2, min(batch_size, self.world.get("binding_images_per_batch", 256) // n))
            find = self.world.get("binding_find_share", 0.0)  # share of reverse-lookup prompts (task_find)
            out = []
            for j in range(size):
                r = random.Random(f"{self.seed}/{self.split}/bind/{step}/{j}")
                out.append(
                    (task_find if find and r.random() < find else task_binding)(
                        r, **dict(self.world, binding_n=n)
                    )
                )
            return out
        others = {name: w for name, w in zip(self.names, self.weights, strict=True) if name != "binding"}
        names, weights = sorted(others), [others[k] for k in sorted(others)]
        out = []
        for j in range(batch_size):
            r = random.Random(f"{self.seed}/{self.split}/{step * batch_size + j}")
            out.append(ALL_TASKS[r.choices(names, weights=weights)[0]](r, **self.world))
        return out


def eval_set(task: str, n: int, seed: int = 0, **world) -> list[Example]:
    """``n`` held-out examples of one task (seed strings disjoint from the training stream)."""
    _check_tasks([task])
    return [ALL_TASKS[task](random.Random(f"{seed}/eval/{task}/{i}"), **world) for i in range(n)]


__all__ = ["ALL_TASKS", "IMAGE_TASKS", "TEXT_TASKS", "Mixture", "eval_set", "generate"]
