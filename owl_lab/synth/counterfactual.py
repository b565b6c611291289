"""Counterfactual scene pairs for causal experiments: a clean scene and a minimal edit of it.

Activation patching and knockout compare two runs *position by position*, so the two prompts must
have an identical token layout. Here the question text is the same string and each sample has the
same number of images, so ``input_ids``, ``attention_mask`` and the image rows / placeholder
positions coincide exactly; only the pixels differ. The edit changes one attribute of the object
the question asks about, so the answer changes:

====================  =====================================  =========================================
edit                  question (task)                        what changes
====================  =====================================  =========================================
``color``             "What color is the {shape}?"           the asked object's colour
``shape``             "What shape is at the {position}?"     the shape of the object in that cell
``position``          "Where is the {color} {shape}?"        the asked object moves to an empty cell
====================  =====================================  =========================================

Every other object, and the edited object's other attributes (size, pattern, jitter), stay as they
are. The first answer token always differs between clean and corrupt (``position`` avoids moves such
as "top left" → "top right" that share it), so a single-token logit difference is a valid metric.

>>> pairs = counterfactual_pairs("color", 4, seed=0)
>>> pairs[0].clean.text == pairs[0].corrupt.text, pairs[0].clean.answer, pairs[0].corrupt.answer
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch

from owl_lab.synth.shapes import NATIVE_SIZE, Obj, Scene, render, sample_scene
from owl_lab.synth.tasks import Example, q_color, q_position
from owl_lab.synth.vocab import COLORS, GRID, IMAGE_PLACEHOLDER, SHAPES, position_name

EDITS = ("color", "shape", "position")
N_OBJECTS = (1, 4)


@dataclass(frozen=True)
class CounterfactualPair:
    """A clean example and its corrupted twin (same ``text``, same image count, different answer).

    Attributes:
        edit: which attribute was changed (one of :data:`EDITS`).
        clean, corrupt: the two examples; ``clean.text == corrupt.text``.
        before, after: the edited object in the clean and in the corrupt scene.
    """

    edit: str
    clean: Example
    corrupt: Example
    before: Obj
    after: Obj


def edit_scene(scene: Scene, obj: Obj, **changes) -> Scene:
    """``scene`` with ``obj`` replaced by ``replace(obj, **changes)`` (same object order)."""
    if obj not in scene.objects:
        raise ValueError(f"{obj} is not an object of the scene")
    unknown = sorted(set(changes) - {"shape", "color", "size", "pattern", "row", "col", "dx", "dy"})
    if unknown:
        raise ValueError(f"unknown object attribute(s) {unknown}")
    new = replace(obj, **changes)
    if (new.row, new.col) != (obj.row, obj.col) and scene.at(new.row, new.col) is not None:
        raise ValueError(f"cell ({new.row}, {new.col}) is occupied")
    return Scene(tuple(new if o == obj else o for o in scene.objects))


def _first_word(answer: str) -> str:
    return answer.split()[0]


def _asked_object(edit: str, rng: random.Random, scene: Scene) -> tuple[str, Obj] | None:
    """(question, asked object) for ``edit``'s question on ``scene``, or None if not askable."""
    if edit == "color":
        qa = q_color(rng, scene)
        if qa is None:
            return None
        shape = qa[0].removeprefix("What color is the ").removesuffix("?")
        return qa[0], next(o for o in scene.objects if o.shape == shape and o.color == qa[1])
    if edit == "shape":
        o = rng.choice(scene.objects)  # never the empty-cell variant: the answer must be an object
        return f"What shape is at the {o.position}?", o
    qa = q_position(rng, scene)
    if qa is None:
        return None
    return qa[0], next(o for o in scene.objects if o.position == qa[1])


def _edited(edit: str, rng: random.Random, scene: Scene, obj: Obj) -> Obj | None:
    if edit == "color":
        return replace(obj, color=rng.choice([c for c in COLORS if c != obj.color]))
    if edit == "shape":
        return replace(obj, shape=rng.choice([s for s in SHAPES if s != obj.shape]))
    cells = [
        (r, c)
        for r in range(GRID)
        for c in range(GRID)
        if scene.at(r, c) is None and _first_word(position_name(r, c)) != _first_word(obj.position)
    ]
    if not cells:
        return None
    r, c = rng.choice(cells)
    return replace(obj, row=r, col=c)


def _answer(edit: str, obj: Obj) -> str:
    return {"color": obj.color, "shape": obj.shape, "position": obj.position}[edit]


def make_pair(
    rng: random.Random, edit: str, render_size: int = NATIVE_SIZE, n_objects: tuple[int, int] = N_OBJECTS
) -> CounterfactualPair:
    """One clean/corrupt pair drawn from ``rng`` (redraws scenes until the edit is possible)."""
    if edit not in EDITS:
        raise ValueError(f"unknown edit {edit!r}; expected one of {EDITS}")
    while True:
        scene = sample_scene(rng, *n_objects)
        asked = _asked_object(edit, rng, scene)
        if asked is None:
            continue
        question, obj = asked
        new = _edited(edit, rng, scene, obj)
        if new is None:
            continue
        corrupt_scene = edit_scene(
            scene, obj, **{f: getattr(new, f) for f in ("color", "shape", "row", "col")}
        )
        text = f"{IMAGE_PLACEHOLDER}{question}"
        clean = Example(
            edit, text, _answer(edit, obj), [render(scene, render_size)], [scene], {"counterfactual": "clean"}
        )
        corrupt = Example(
            edit,
            text,
            _answer(edit, new),
            [render(corrupt_scene, render_size)],
            [corrupt_scene],
            {"counterfactual": "corrupt"},
        )
        return CounterfactualPair(edit, clean, corrupt, obj, new)


def counterfactual_pairs(
    edit: str, n: int, seed: int = 0, render_size: int = NATIVE_SIZE
) -> list[CounterfactualPair]:
    """``n`` seeded pairs for one edit (seed strings disjoint from training and ``eval_set``)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [
        make_pair(random.Random(f"{seed}/counterfactual/{edit}/{i}"), edit, render_size) for i in range(n)
    ]


def collate_pairs(processor, pairs: list[CounterfactualPair]):
    """(clean batch, corrupt batch, clean answer ids [B], corrupt answer ids [B]).

    The batches are the processor's tensors for the prompts (no answers), with identical
    ``input_ids`` / ``attention_mask``; the ids are each answer's first token.
    """
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    batches = [
        processor(
            text=[getattr(p, side).text for p in pairs],
            images=[getattr(p, side).images for p in pairs],
            return_tensors="pt",
        )
        for side in ("clean", "corrupt")
    ]
    tok = processor.tokenizer
    ids = [
        [tok.convert_tokens_to_ids(_first_word(getattr(p, side).answer)) for p in pairs]
        for side in ("clean", "corrupt")
    ]
    return batches[0], batches[1], torch.tensor(ids[0]), torch.tensor(ids[1])


__all__ = ["EDITS", "CounterfactualPair", "collate_pairs", "counterfactual_pairs", "edit_scene", "make_pair"]
