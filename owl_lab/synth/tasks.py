"""Question generators over the shapes world and the text-only tasks.

Every generator takes a ``random.Random`` and returns an :class:`Example`: the raw user message
(with one ``<|image|>`` placeholder per image; the processor adds the chat template), the PIL
images, and the exact answer string. Answers are short closed-vocabulary strings, so exact match
is well defined.

Task families (names are the keys of :data:`TASKS`):

* single-image questions — ``color shape count position exist size pattern caption`` on scenes
  of 1–4 objects, ``dense_color dense_shape`` on crowded scenes of 5–8 objects (the setting
  where few abstractor queries cannot carry every object);
* ``pattern`` is the fine-detail task (needs resolution, see :mod:`owl_lab.synth.shapes`);
* text-only — ``add sub compare greater next parity`` (the "text benchmark");
* multi-image — ``multi`` (see :mod:`owl_lab.synth.multi`).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from PIL import Image

from owl_lab.synth.shapes import NATIVE_SIZE, Scene, caption, render, sample_scene
from owl_lab.synth.vocab import COLORS, GRID, IMAGE_PLACEHOLDER, SHAPES, position_name

# scene sizes: ordinary scenes vs crowded ones
N_OBJECTS = (1, 4)
N_OBJECTS_DENSE = (5, 8)
N_OBJECTS_CAPTION = (1, 3)


@dataclass
class Example:
    """One prompt/answer pair. ``text`` is the user message (no template)."""

    task: str
    text: str
    answer: str
    images: list[Image.Image] = field(default_factory=list)
    scenes: list[Scene] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


# --- scene questions (return (question, answer) for a scene, or None if not askable) ------------


def _pick_unique(rng, scene: Scene, key):
    """A random object that ``key`` singles out (one ``rng.choice``), or None if none is unique."""
    counts = Counter(key(o) for o in scene.objects)
    objs = [o for o in scene.objects if counts[key(o)] == 1]
    return rng.choice(objs) if objs else None


def q_color(rng, scene):
    o = _pick_unique(rng, scene, lambda o: o.shape)
    return None if o is None else (f"What color is the {o.shape}?", o.color)


def q_shape(rng, scene):
    empty = [(r, c) for r in range(GRID) for c in range(GRID) if scene.at(r, c) is None]
    if empty and rng.random() < 0.2:  # sometimes ask about an empty cell ("nothing")
        r, c = rng.choice(empty)
    else:
        o = rng.choice(scene.objects)
        r, c = o.row, o.col
    o = scene.at(r, c)
    return f"What shape is at the {position_name(r, c)}?", (o.shape if o else "nothing")


def q_count(rng, scene):
    if rng.random() < 0.5:
        return "How many objects are there?", str(len(scene.objects))
    # mostly a colour that is present, so the answer is not usually 0
    color = rng.choice(COLORS if rng.random() < 0.3 else sorted({o.color for o in scene.objects}))
    return f"How many {color} objects are there?", str(sum(o.color == color for o in scene.objects))


def balanced_count_question(rng):
    """A ``count`` question whose answer is drawn *before* the scene (world ``balanced_counts``).

    Half ask for all objects; half ask for one colour with the answer 0, 1 or 2 at equal odds, and
    the returned asker declines scenes where no colour has that count, so ``scene_question`` draws
    another. The legacy :func:`q_count` makes "0" and "2" so rare (20 % and 10 % of per-colour
    questions) that a tiny model learns "a colour that is present -> 1".
    """
    per_colour, target = rng.random() < 0.5, rng.choice((0, 1, 2))

    def ask(rng, scene):
        if not per_colour:
            return "How many objects are there?", str(len(scene.objects))
        colors = [c for c in COLORS if sum(o.color == c for o in scene.objects) == target]
        return (f"How many {rng.choice(colors)} objects are there?", str(target)) if colors else None

    return ask


def q_position(rng, scene):
    o = _pick_unique(rng, scene, lambda o: (o.color, o.shape))
    return None if o is None else (f"Where is the {o.color} {o.shape}?", o.position)


def q_exist(rng, scene):
    present = {(o.color, o.shape) for o in scene.objects}
    if rng.random() < 0.5:  # balanced yes / no
        color, shape = rng.choice(sorted(present))
    else:
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        color, shape = rng.choice(absent)
    return f"Is there a {color} {shape}?", ("yes" if (color, shape) in present else "no")


def q_size(rng, scene):
    o = _pick_unique(rng, scene, lambda o: (o.color, o.shape))
    return None if o is None else (f"What size is the {o.color} {o.shape}?", o.size)


def q_pattern(rng, scene):
    o = _pick_unique(rng, scene, lambda o: o.shape)
    return None if o is None else (f"What pattern is the {o.shape}?", o.pattern)


def q_caption(rng, scene):
    return "Describe the image.", caption(scene)


def q_dense_color(rng, scene):
    o = rng.choice(scene.objects)
    return f"What color is the object at the {o.position}?", o.color


SCENE_QUESTIONS = {
    "color": (q_color, N_OBJECTS),
    "shape": (q_shape, N_OBJECTS),
    "count": (q_count, N_OBJECTS),
    "position": (q_position, N_OBJECTS),
    "exist": (q_exist, N_OBJECTS),
    "size": (q_size, N_OBJECTS),
    "pattern": (q_pattern, N_OBJECTS),
    "caption": (q_caption, N_OBJECTS_CAPTION),
    "dense_color": (q_dense_color, N_OBJECTS_DENSE),
    "dense_shape": (q_shape, N_OBJECTS_DENSE),
}


_POSITION_OF = {position_name(r, c): (r, c) for r in range(GRID) for c in range(GRID)}


def answer_question(question: str, scene: Scene) -> str | None:
    """The answer ``scene`` gives to one of the multiple-choice question forms (``color``, ``shape``,
    ``count``, ``exist``, ``position``), or None where the question is not askable on it (e.g. "What
    color is the circle?" on a scene with no circle, or two). The inverse of the askers above: used to
    draw *hard* distractors, scenes that answer the asked question differently (issue 18)."""
    words = question.rstrip("?").split()
    if question.startswith("What color is the ") and len(words) == 5:
        objs = [o for o in scene.objects if o.shape == words[4]]
        return objs[0].color if len(objs) == 1 else None
    if question.startswith("What shape is at the "):
        o = scene.at(*_POSITION_OF[" ".join(words[5:])])
        return o.shape if o else "nothing"
    if question == "How many objects are there?":
        return str(len(scene.objects))
    if question.startswith("How many ") and len(words) == 6:
        return str(sum(o.color == words[2] for o in scene.objects))
    if question.startswith("Is there a "):
        return "yes" if any((o.color, o.shape) == (words[3], words[4]) for o in scene.objects) else "no"
    if question.startswith("Where is the "):
        objs = [o for o in scene.objects if (o.color, o.shape) == (words[3], words[4])]
        return objs[0].position if len(objs) == 1 else None
    raise ValueError(f"not a multiple-choice question form: {question!r}")


def scene_question(
    rng: random.Random, kind: str, n_objects=None, balanced_counts: bool = False
) -> tuple[Scene, str, str]:
    """Sample a scene on which question ``kind`` is askable; return (scene, question, answer).

    ``balanced_counts`` (a world option) gives per-colour ``count`` questions the answers 0, 1 and 2
    with equal odds; off, the draw of the first checkpoints is kept bit for bit.
    """
    fn, default_n = SCENE_QUESTIONS[kind]
    lo, hi = n_objects or default_n
    if balanced_counts and kind == "count":
        fn = balanced_count_question(rng)
    while True:
        scene = sample_scene(rng, lo, hi)
        qa = fn(rng, scene)
        if qa is not None:
            return (scene, *qa)


def make_image_task(kind: str):
    def generate(
        rng: random.Random, render_size: int = NATIVE_SIZE, n_objects=None, balanced_counts: bool = False, **_
    ) -> Example:
        scene, question, answer = scene_question(rng, kind, n_objects, balanced_counts)
        return Example(kind, f"{IMAGE_PLACEHOLDER}{question}", answer, [render(scene, render_size)], [scene])

    generate.__name__ = f"task_{kind}"
    return generate


# --- text-only tasks -----------------------------------------------------------------------------


def t_add(rng):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"What is {a} plus {b}?", str(a + b)


def t_sub(rng):
    a = rng.randint(0, 18)
    b = rng.randint(0, a)
    return f"What is {a} minus {b}?", str(a - b)


def t_compare(rng):
    a, b = rng.sample(range(31), 2)
    if rng.random() < 0.5:
        return f"Which is larger, {a} or {b}?", str(max(a, b))
    return f"Which is smaller, {a} or {b}?", str(min(a, b))


def t_greater(rng):
    a, b = rng.sample(range(31), 2)
    if rng.random() < 0.5:
        return f"Is {a} greater than {b}?", ("yes" if a > b else "no")
    return f"Is {a} less than {b}?", ("yes" if a < b else "no")


def t_next(rng):
    if rng.random() < 0.5:
        n = rng.randint(0, 63)
        return f"What number comes after {n}?", str(n + 1)
    n = rng.randint(1, 64)
    return f"What number comes before {n}?", str(n - 1)


def t_parity(rng):
    n = rng.randint(0, 64)
    return f"Is {n} even or odd?", ("even" if n % 2 == 0 else "odd")


TEXT_QUESTIONS = {
    "add": t_add,
    "sub": t_sub,
    "compare": t_compare,
    "greater": t_greater,
    "next": t_next,
    "parity": t_parity,
}


def make_text_task(kind: str):
    def generate(rng: random.Random, **_) -> Example:
        question, answer = TEXT_QUESTIONS[kind](rng)
        return Example(kind, question, answer)

    generate.__name__ = f"task_{kind}"
    return generate


IMAGE_TASKS = tuple(SCENE_QUESTIONS)
TEXT_TASKS = tuple(TEXT_QUESTIONS)
TASKS = {k: make_image_task(k) for k in IMAGE_TASKS} | {k: make_text_task(k) for k in TEXT_TASKS}
