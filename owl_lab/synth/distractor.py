"""The Owl3 paper's distractor benchmark (§4.5) and the training task that teaches it.

Prompt (one placeholder per image; the question names the true image; options close the question)::

    Image 1: <|image|> Image 2: <|image|> … Image N: <|image|> In Image X, what color is the circle,
    red, gray, blue or green?

Multiple choice: the answer is one of the listed options (the option word itself: the vocabulary has
no option letters, and a letter answer would add a content → letter mapping the toy does not need).
A *question* is (target scene, question, answer, option set); it is identical for every N, so a
curve over N compares like with like. Its *instances* are the k rotations of its option list
(k = 4, or 2 for yes/no questions); every instance also redraws the N − 1 distractor scenes and the
slot X of the true image. **CircularEval**: a question counts only if all k instances are answered
exactly (MMBench's protocol, which the paper uses). Chance for a guesser that picks an option at random
per instance is ``mean_q (1/k_q)^k_q`` (≈ 1 %); a constant answerer solves only the questions whose
answer happens to be its constant (:func:`chance_levels`).

Distractors are drawn like the target scene's distribution (1–4 objects, attributes uniform), so a
distractor often holds an object the question names with other attributes: only binding "Image X" to
the X-th image answers it. The eval draws fresh scenes; training
(:func:`owl_lab.synth.binding_train.task_binding`) may draw them from a finite pool of seeded scenes
(world option ``distractor_pool``) so their renders are cached.
"""

from __future__ import annotations

import math
import random
from functools import lru_cache

from PIL import Image

from owl_lab.synth.shapes import NATIVE_SIZE, Scene, render, sample_scene, with_frame_tag
from owl_lab.synth.tasks import N_OBJECTS, Example, answer_question, scene_question
from owl_lab.synth.vocab import COLORS, IMAGE_PLACEHOLDER, NUMBERS, POSITIONS, SHAPES

CHOICE_KINDS = ("color", "shape", "count", "exist", "position")
PAPER_N = (1, 5, 10, 20, 50)  # the paper's Fig. 4 grid
N_OPTIONS = 4
# answer space of each kind; the options are the answer plus N_OPTIONS - 1 others from it
ANSWER_SPACE = {
    "color": COLORS,
    "shape": SHAPES + ("nothing",),
    "count": tuple(str(i) for i in range(5)),
    "exist": ("yes", "no"),
    "position": POSITIONS,
}
MAX_IMAGES = len(NUMBERS) - 1  # "Image N" needs N in the number words


def _labels(n_images: int, labels: list[int] | None) -> list[int]:
    """The label of each slot: 1..N (the paper's), or ``labels`` (training aid ``binding_sparse_share``)."""
    if labels is None:
        return list(range(1, n_images + 1))
    if (
        len(labels) != n_images
        or len(set(labels)) != n_images
        or not all(1 <= v <= MAX_IMAGES for v in labels)
    ):
        raise ValueError(f"need {n_images} distinct labels in 1..{MAX_IMAGES}; got {labels}")
    return list(labels)


def paper_prompt(
    n_images: int, target: int, question: str, options: list[str], labels: list[int] | None = None
) -> str:
    """``"Image 1: <|image|> … Image N: <|image|> In Image X, {question}, o1, o2, o3 or o4?"``.

    ``target`` is the 1-based slot; ``question`` is a single-image question ending in "?". ``labels``
    (training only) names the slots by other numbers than 1..N, e.g. ``Image 4: … Image 31: …``.
    """
    if not 1 <= target <= n_images <= MAX_IMAGES:
        raise ValueError(
            f"need 1 <= target <= n_images <= {MAX_IMAGES}; got target {target}, n_images {n_images}"
        )
    if len(options) < 2:
        raise ValueError(f"a multiple-choice question needs at least 2 options; got {options}")
    names = _labels(n_images, labels)
    images = " ".join(f"Image {i}: {IMAGE_PLACEHOLDER}" for i in names)
    return f"{images} {named_question(names[target - 1], question, options)}"


def named_question(label: int, question: str, options: list[str]) -> str:
    """``"In Image X, {question}, o1, o2, o3 or o4?"``: the part of the paper's prompt after the images
    (also the text of a follow-up chat turn, world option ``binding_turns_per_image``)."""
    body = question.rstrip("?")
    listed = ", ".join(options[:-1]) + f" or {options[-1]}"
    return f"In Image {label}, {body[0].lower()}{body[1:]}, {listed}?"


def suffix_prompt(n_images: int, target: int, question: str, labels: list[int] | None = None) -> str:
    """``"Image 1: <|image|> … Image N: <|image|> {question} in Image X?"`` (training only, world option
    ``binding_suffix_share``): the label sits right before the answer position, so the token that
    predicts the answer is one step from "X" and a hyper layer's query can name image X's tag at once;
    the paper's format puts "In Image X," a whole question and option list away from it."""
    if not 1 <= target <= n_images <= MAX_IMAGES:
        raise ValueError(
            f"need 1 <= target <= n_images <= {MAX_IMAGES}; got target {target}, n_images {n_images}"
        )
    names = _labels(n_images, labels)
    images = " ".join(f"Image {i}: {IMAGE_PLACEHOLDER}" for i in names)
    return f"{images} {question.rstrip('?')} in Image {names[target - 1]}?"


def choice_question(rng: random.Random, kind: str, balanced_counts: bool = False):
    """(scene, question, answer, options) with the answer among ``options`` at a random slot."""
    if kind not in ANSWER_SPACE:
        raise ValueError(f"unknown multiple-choice kind {kind!r}; expected one of {CHOICE_KINDS}")
    scene, question, answer = scene_question(rng, kind, balanced_counts=balanced_counts)
    return scene, question, answer, _options(rng, kind, answer)


def _options(rng: random.Random, kind: str, answer: str) -> list[str]:
    space = ANSWER_SPACE[kind]
    options = rng.sample([a for a in space if a != answer], min(N_OPTIONS, len(space)) - 1) + [answer]
    rng.shuffle(options)
    return options


def rotate(options: list[str], r: int) -> list[str]:
    """The r-th circular rotation of the option list (r = 0 keeps it)."""
    r %= len(options)
    return options[r:] + options[:r]


@lru_cache(maxsize=8192)
def _pool_image(pool_seed: str, index: int, render_size: int) -> tuple[Scene, Image.Image]:
    scene = sample_scene(random.Random(f"{pool_seed}/{index}"), *N_OBJECTS)
    return scene, render(scene, render_size)


def _pool_distractor(
    rng: random.Random, pool: int, pool_seed: str, render_size: int, question: str | None, answer: str
) -> tuple[Scene, Image.Image]:
    """A pool scene; with ``question``, one on which the question is askable and answered otherwise
    than ``answer`` (a *hard* distractor: a model that reads the question off any image that holds
    its object, instead of off image X, is wrong on it). After 64 misses any pool scene is kept."""
    for _ in range(64 if question else 1):
        scene, image = _pool_image(pool_seed, rng.randrange(pool), render_size)
        if question is None or answer_question(question, scene) not in (None, answer):
            return scene, image
    return scene, image


def binding_instance(
    rng: random.Random,
    n_images: int,
    scene: Scene,
    question: str,
    answer: str,
    options: list[str],
    kind: str,
    render_size: int = NATIVE_SIZE,
    pool: int = 0,
    pool_seed: str = "pool",
    meta: dict | None = None,
    frame_tags: bool | str = False,
    suffix: bool = False,
    labels: list[int] | None = None,
    hard: bool = False,
) -> Example:
    """One prompt: the true scene at a random slot among ``n_images - 1`` distractors.

    ``pool`` > 0 draws distractors from ``pool`` seeded scenes whose renders are cached (training);
    0 draws fresh scenes (evaluation). ``frame_tags`` tints image k's background with k's tag
    (:func:`owl_lab.synth.shapes.with_frame_tag`; the world option of the same name). ``suffix``
    asks in :func:`suffix_prompt`'s open form instead of the paper's multiple choice. ``labels`` names
    the slots (default 1..N; the frame tags follow the labels). ``hard`` (training, needs ``pool``)
    draws distractors that answer the question too, differently (:func:`_pool_distractor`).
    """
    if hard and not pool:
        raise ValueError("hard distractors are drawn from the distractor pool; set pool > 0")
    names = _labels(n_images, labels)
    target = rng.randint(1, n_images)
    scenes, images = [], []
    for slot in range(1, n_images + 1):
        if slot == target:
            scenes.append(scene)
            images.append(render(scene, render_size))
        elif pool:
            s, im = _pool_distractor(rng, pool, pool_seed, render_size, question if hard else None, answer)
            scenes.append(s)
            images.append(im)
        else:
            s = sample_scene(rng, *N_OBJECTS)
            scenes.append(s)
            images.append(render(s, render_size))
    if frame_tags:
        images = [with_frame_tag(im, k, frame_tags) for k, im in zip(names, images, strict=True)]
    meta = dict(meta or {}, kind=kind, n_images=n_images, target=target, options=list(options))
    if labels is not None:
        meta["labels"] = names
    if suffix:
        text = suffix_prompt(n_images, target, question, labels)
        meta["options"], meta["suffix"] = [], True
    else:
        text = paper_prompt(n_images, target, question, options, labels)
    return Example("binding", text, answer, images, scenes, meta)


def circular_eval(
    seed: int,
    n_images: int,
    n_questions: int = 40,
    render_size: int = NATIVE_SIZE,
    kinds: tuple[str, ...] = CHOICE_KINDS,
    frame_tags: bool | str = False,
) -> list[list[Example]]:
    """The benchmark at one N: one group per question, one instance per option rotation.

    The questions depend only on ``seed`` (not on ``n_images``); instance ``r`` of question ``q``
    rotates the options by ``r`` and draws its own distractors and target slot from
    ``"{seed}/circular/q{q}/n{n_images}/r{r}"``.
    """
    if not 1 <= n_images <= MAX_IMAGES:
        raise ValueError(f"n_images must be in 1..{MAX_IMAGES}; got {n_images}")
    groups = []
    for q in range(n_questions):
        qrng = random.Random(f"{seed}/circular/q{q}")
        kind = kinds[q % len(kinds)]  # kinds in equal numbers
        scene, question, answer, options = choice_question(qrng, kind)
        groups.append(
            [
                binding_instance(
                    random.Random(f"{seed}/circular/q{q}/n{n_images}/r{r}"),
                    n_images,
                    scene,
                    question,
                    answer,
                    rotate(options, r),
                    kind,
                    render_size,
                    meta={"question": q, "rotation": r},
                    frame_tags=frame_tags,
                )
                for r in range(len(options))
            ]
        )
    return groups


def chance_levels(groups: list[list[Example]]) -> dict[str, float]:
    """CircularEval % of two null answerers on ``groups``: ``random`` (a uniform option per instance,
    expected value) and ``constant`` (the best single answer string given to every instance)."""
    random_pct = 100.0 * sum((1.0 / len(g[0].meta["options"])) ** len(g) for g in groups) / len(groups)
    answers = [g[0].answer for g in groups]
    best = max(answers.count(a) for a in set(answers))
    return {"random": random_pct, "constant": 100.0 * best / len(groups)}


def sample_n_images(rng: random.Random, max_images: int, curve: str = "loguniform") -> int:
    """N for one training prompt: ``loguniform`` (N = ⌊exp(U(0, ln(max+1)))⌋, so small N are common
    and every N up to ``max_images`` occurs; mean ≈ max / ln(max)) or ``uniform`` over 1..max."""
    if curve == "uniform":
        return rng.randint(1, max_images)
    if curve == "loguniform":
        return min(max_images, int(math.exp(rng.uniform(0.0, math.log(max_images + 1)))))
    raise ValueError(f"n_images curve must be loguniform or uniform; got {curve!r}")


__all__ = [
    "ANSWER_SPACE",
    "CHOICE_KINDS",
    "PAPER_N",
    "binding_instance",
    "chance_levels",
    "choice_question",
    "circular_eval",
    "named_question",
    "paper_prompt",
    "rotate",
    "sample_n_images",
    "suffix_prompt",
]
