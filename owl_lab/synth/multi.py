"""Multi-image prompts with distractors (the Owl3 paper's distractor-resistance setting, §4.5).

Prompt format (one placeholder per image, the question names the true image)::

    Image 1: <|image|> Image 2: <|image|> Image 3: <|image|> In image 2, what color is the circle?

:func:`distractor_eval` builds the CircularEval-style test: every *question* (a target scene +
question + answer, identical for every N so the curve compares like with like) is asked in several
*instances* that differ in where the true image sits and which random distractor scenes surround it;
the question counts as solved only if every instance is answered exactly.
"""

from __future__ import annotations

import random

from owl_lab.synth.shapes import NATIVE_SIZE, render, sample_scene, with_frame_tag
from owl_lab.synth.tasks import N_OBJECTS, Example, scene_question
from owl_lab.synth.vocab import IMAGE_PLACEHOLDER

MULTI_KINDS = ("color", "shape", "count", "exist", "position")


def multi_prompt(n_images: int, target: int, question: str) -> str:
    """``"Image 1: <|image|> … Image N: <|image|> In image X, {question}"`` (``target`` is 1-based)."""
    if not 1 <= target <= n_images:
        raise ValueError(f"target image must be in 1..{n_images}, got {target}")
    images = " ".join(f"Image {i}: {IMAGE_PLACEHOLDER}" for i in range(1, n_images + 1))
    return f"{images} In image {target}, {question[0].lower()}{question[1:]}"


def _instance(
    rng, n_images, target_scene, question, answer, kind, render_size, meta, frame_tags: bool | str = False
) -> Example:
    target = rng.randint(1, n_images)
    scenes = [sample_scene(rng, *N_OBJECTS) for _ in range(n_images)]
    scenes[target - 1] = target_scene
    return Example(
        "multi",
        multi_prompt(n_images, target, question),
        answer,
        [
            with_frame_tag(render(s, render_size), k, frame_tags) if frame_tags else render(s, render_size)
            for k, s in enumerate(scenes, start=1)
        ],
        scenes,
        dict(meta, kind=kind, n_images=n_images, target=target),
    )


def task_multi(
    rng: random.Random,
    render_size: int = NATIVE_SIZE,
    multi_max_images: int = 6,
    frame_tags: bool | str = False,
    **_,
) -> Example:
    """Training generator: 1..multi_max_images images, the question about one of them (``frame_tags``:
    image k's background tinted with k's tag, as in :func:`owl_lab.synth.distractor.binding_instance`)."""
    kind = rng.choice(MULTI_KINDS)
    scene, question, answer = scene_question(rng, kind)
    n = rng.randint(1, multi_max_images)
    return _instance(rng, n, scene, question, answer, kind, render_size, {}, frame_tags)


def distractor_eval(
    seed: int,
    n_images: int,
    n_questions: int = 40,
    n_instances: int = 3,
    render_size: int = NATIVE_SIZE,
    frame_tags: bool | str = False,
) -> list[list[Example]]:
    """Groups of instances, one group per question; with one image there is a single instance.

    The question set depends only on ``seed`` (not on ``n_images``), so accuracy across N is a
    curve over the same questions.
    """
    groups = []
    for q in range(n_questions):
        qrng = random.Random(f"{seed}/distractor/q{q}")
        kind = qrng.choice(MULTI_KINDS)
        scene, question, answer = scene_question(qrng, kind)
        instances = []
        for v in range(1 if n_images == 1 else n_instances):
            vrng = random.Random(f"{seed}/distractor/q{q}/n{n_images}/v{v}")
            instances.append(
                _instance(
                    vrng,
                    n_images,
                    scene,
                    question,
                    answer,
                    kind,
                    render_size,
                    {"question": q, "instance": v},
                    frame_tags,
                )
            )
        groups.append(instances)
    return groups
