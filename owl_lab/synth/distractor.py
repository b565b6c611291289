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
the X-th image answers it. The eval draws fresh scenes; training (:func:`task_binding`) may draw them
from a finite pool of seeded scenes (world option ``distractor_pool``) so their renders are cached.
"""

from __future__ import annotations

import math
import random
from functools import lru_cache

from PIL import Image

from owl_lab.synth.shapes import NATIVE_SIZE, Scene, render, sample_scene, with_frame_tag
from owl_lab.synth.tasks import N_OBJECTS, SCENE_QUESTIONS, Example, scene_question
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


def question_about(rng: random.Random, scene: Scene) -> tuple[str, str, list[str], str]:
    """(question, answer, options, kind): a multiple-choice question about a *given* scene, its kind
    drawn from the askable ones of :data:`CHOICE_KINDS` (``exist`` is always askable)."""
    for kind in rng.sample(CHOICE_KINDS, len(CHOICE_KINDS)):
        qa = SCENE_QUESTIONS[kind][0](rng, scene)
        if qa is not None:
            return qa[0], qa[1], _options(rng, kind, qa[1]), kind
    raise ValueError(f"no multiple-choice question is askable about {scene}")  # unreachable: exist


def follow_up_turns(
    rng: random.Random, example: Example, turns_per_image: float, max_turns: int = 6
) -> list[tuple[str, str]]:
    """Extra chat turns for a ``binding`` prompt (training aid, world option ``binding_turns_per_image``).

    One prompt of N images teaches one look-up; K − 1 further turns ask, each in the paper's form, about
    other slots of the same images, with every answer supervised, so a step teaches K look-ups for the
    price of one set of images. K = clip(round(``turns_per_image`` · N), 1, ``max_turns``); the slots are
    distinct and differ from the first question's. Returns ``[(user text, answer), …]`` (K − 1 items).
    """
    n = example.meta["n_images"]
    k = max(1, min(max_turns, round(turns_per_image * n), n))
    slots = [s for s in range(1, n + 1) if s != example.meta["target"]]
    names = example.meta.get("labels") or list(range(1, n + 1))
    turns = []
    for slot in rng.sample(slots, k - 1):
        question, answer, options, _ = question_about(rng, example.scenes[slot - 1])
        turns.append((named_question(names[slot - 1], question, options), answer))
    return turns


def rotate(options: list[str], r: int) -> list[str]:
    """The r-th circular rotation of the option list (r = 0 keeps it)."""
    r %= len(options)
    return options[r:] + options[:r]


@lru_cache(maxsize=8192)
def _pool_image(pool_seed: str, index: int, render_size: int) -> tuple[Scene, Image.Image]:
    scene = sample_scene(random.Random(f"{pool_seed}/{index}"), *N_OBJECTS)
    return scene, render(scene, render_size)


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
) -> Example:
    """One prompt: the true scene at a random slot among ``n_images - 1`` distractors.

    ``pool`` > 0 draws distractors from ``pool`` seeded scenes whose renders are cached (training);
    0 draws fresh scenes (evaluation). ``frame_tags`` tints image k's background with k's tag
    (:func:`owl_lab.synth.shapes.with_frame_tag`; the world option of the same name). ``suffix``
    asks in :func:`suffix_prompt`'s open form instead of the paper's multiple choice. ``labels`` names
    the slots (default 1..N; the frame tags follow the labels).
    """
    names = _labels(n_images, labels)
    target = rng.randint(1, n_images)
    scenes, images = [], []
    for slot in range(1, n_images + 1):
        if slot == target:
            scenes.append(scene)
            images.append(render(scene, render_size))
        elif pool:
            s, im = _pool_image(pool_seed, rng.randrange(pool), render_size)
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


def task_binding(
    rng: random.Random,
    render_size: int = NATIVE_SIZE,
    binding_max_images: int = 50,
    binding_curve: str = "loguniform",
    distractor_pool: int = 4096,
    balanced_counts: bool = False,
    binding_n: int | None = None,
    frame_tags: bool | str = False,
    binding_suffix_share: float = 0.0,
    binding_sparse_share: float = 0.0,
    binding_label_max: int = 50,
    binding_turns_per_image: float = 0.0,
    binding_max_turns: int = 6,
    **_,
) -> Example:
    """Training generator for the benchmark's format: 1..``binding_max_images`` images, one named
    (``binding_n`` fixes N, as :meth:`owl_lab.synth.data.Mixture.binding_batch` does per batch);
    a ``binding_suffix_share`` of them asked in :func:`suffix_prompt`'s form (a curriculum aid).

    ``binding_sparse_share`` of them (training aid, issue 18) label the N slots with a sorted random
    sample of 1..``binding_label_max`` instead of 1..N, so every label up to 50 is trained at small N:
    with frame tags the lookup "Image X" → X's tag is by content, and a model trained only on
    1..N at N ≤ 10 would never have seen "Image 37".

    ``binding_turns_per_image`` > 0 adds :func:`follow_up_turns` (at most ``binding_max_turns`` turns in
    all) to ``meta["turns"]``; :func:`owl_lab.evaluate.collate` supervises their answers too."""
    kind = rng.choice(CHOICE_KINDS)
    scene, question, answer, options = choice_question(rng, kind, balanced_counts)
    n = binding_n or sample_n_images(rng, binding_max_images, binding_curve)
    suffix = binding_suffix_share > 0 and rng.random() < binding_suffix_share  # no draw when off
    labels = _sparse_labels(rng, n, binding_sparse_share, binding_label_max)
    example = binding_instance(
        rng,
        n,
        scene,
        question,
        answer,
        options,
        kind,
        render_size,
        pool=distractor_pool,
        frame_tags=frame_tags,
        suffix=suffix,
        labels=labels,
    )
    if binding_turns_per_image > 0 and not suffix:  # no draw when off: old streams stay bit for bit
        example.meta["turns"] = follow_up_turns(rng, example, binding_turns_per_image, binding_max_turns)
    return example


def _sparse_labels(rng: random.Random, n: int, share: float, label_max: int) -> list[int] | None:
    """None (labels 1..n) or, with probability ``share``, n sorted distinct labels from 1..label_max.
    Draws nothing when ``share`` is 0, so streams without the option are unchanged."""
    if share <= 0 or rng.random() >= share:
        return None
    return sorted(rng.sample(range(1, max(n, min(label_max, MAX_IMAGES)) + 1), n))


def task_find(
    rng: random.Random,
    render_size: int = NATIVE_SIZE,
    binding_max_images: int = 50,
    binding_curve: str = "loguniform",
    distractor_pool: int = 4096,
    binding_n: int | None = None,
    frame_tags: bool | str = False,
    binding_sparse_share: float = 0.0,
    binding_label_max: int = 50,
    **_,
) -> Example:
    """The reverse lookup, an auxiliary training task: "… In which image is there a red circle?" → "X".

    Exactly one image holds an object of that colour and shape (pool distractors holding one are
    skipped). It trains the same association as the benchmark (label X ⇔ the X-th image's content)
    from the other side, with the label as the answer.
    """
    scene = sample_scene(rng, *N_OBJECTS)
    obj = rng.choice(scene.objects)
    n = binding_n or sample_n_images(rng, binding_max_images, binding_curve)
    target = rng.randint(1, n)
    names = _sparse_labels(rng, n, binding_sparse_share, binding_label_max) or list(range(1, n + 1))
    scenes, images = [], []
    for slot in range(1, n + 1):
        if slot == target:
            s, im = scene, render(scene, render_size)
        else:
            while True:
                s, im = _pool_image("pool", rng.randrange(max(1, distractor_pool)), render_size)
                if not any((o.color, o.shape) == (obj.color, obj.shape) for o in s.objects):
                    break
        scenes.append(s)
        images.append(with_frame_tag(im, names[slot - 1], frame_tags) if frame_tags else im)
    labels = " ".join(f"Image {i}: {IMAGE_PLACEHOLDER}" for i in names)
    return Example(
        "find",
        f"{labels} In which image is there a {obj.color} {obj.shape}?",
        str(names[target - 1]),
        images,
        scenes,
        {"kind": "find", "n_images": n, "target": target},
    )


__all__ = [
    "task_find",
    "ANSWER_SPACE",
    "CHOICE_KINDS",
    "PAPER_N",
    "binding_instance",
    "chance_levels",
    "choice_question",
    "circular_eval",
    "follow_up_turns",
    "named_question",
    "question_about",
    "paper_prompt",
    "rotate",
    "sample_n_images",
    "task_binding",
]
