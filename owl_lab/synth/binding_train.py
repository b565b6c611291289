"""Training generators for the distractor benchmark's look-up (issue 18): what a model is shown so
that it learns to answer "In Image X, …" from the X-th image. The benchmark itself (prompt, CircularEval)
is :mod:`owl_lab.synth.distractor`; nothing here is used to score a model.

- :func:`task_binding`: the benchmark's prompt on training scenes, with the world's training aids:
  sparse labels, the suffix form, multi-turn chats (:func:`follow_up_turns`), *echo* prompts and
  *hard* distractors;
- :func:`task_find`: the reverse look-up ("In which image is there a red circle?" → X).

Every aid is off by default and draws nothing from the stream when off, so streams of older recipes
stay bit for bit.
"""

from __future__ import annotations

import random

from owl_lab.synth.distractor import (
    CHOICE_KINDS,
    MAX_IMAGES,
    _options,
    _pool_image,
    binding_instance,
    choice_question,
    named_question,
    sample_n_images,
)
from owl_lab.synth.shapes import NATIVE_SIZE, Scene, render, sample_scene, with_frame_tag
from owl_lab.synth.tasks import N_OBJECTS, SCENE_QUESTIONS, Example
from owl_lab.synth.vocab import IMAGE_PLACEHOLDER

ECHO_SUFFIX = "Which image?"


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
    binding_echo_share: float = 0.0,
    binding_hard_share: float = 0.0,
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
    all) to ``meta["turns"]``; :func:`owl_lab.evaluate.collate` supervises their answers too.

    ``binding_hard_share`` of them draw *hard* distractors (scenes that answer the question otherwise:
    no image but X can be read for the answer). ``binding_echo_share`` of the paper-form prompts are
    *echo* prompts: the question is followed by :data:`ECHO_SUFFIX` and the answer is the label X
    (``meta["echo"]``), which trains the last position to gather X from "In Image X," — the text half of
    the look-up (data/recipes/NOTES-owl3-binding.md, session 13)."""
    kind = rng.choice(CHOICE_KINDS)
    scene, question, answer, options = choice_question(rng, kind, balanced_counts)
    n = binding_n or sample_n_images(rng, binding_max_images, binding_curve)
    suffix = binding_suffix_share > 0 and rng.random() < binding_suffix_share  # no draw when off
    labels = _sparse_labels(rng, n, binding_sparse_share, binding_label_max)
    hard = binding_hard_share > 0 and distractor_pool > 0 and rng.random() < binding_hard_share
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
        hard=hard,
    )
    if hard:
        example.meta["hard"] = True
    if binding_echo_share > 0 and not suffix and rng.random() < binding_echo_share:
        names = example.meta.get("labels") or list(range(1, n + 1))
        example.text = f"{example.text} {ECHO_SUFFIX}"
        example.answer = str(names[example.meta["target"] - 1])
        example.meta["echo"] = True
        return example  # one question, one answer: no follow-up turns
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


__all__ = ["ECHO_SUFFIX", "follow_up_turns", "question_about", "task_binding", "task_find"]
