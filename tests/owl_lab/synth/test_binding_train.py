"""owl_lab.synth.binding_train: the training generators of the distractor look-up (binding prompts and
their aids: N phases, find, follow-up turns, echo prompts, hard distractors)."""

from __future__ import annotations

import random

import pytest

from owl_lab.synth.binding_train import ECHO_SUFFIX, follow_up_turns, question_about, task_binding, task_find
from owl_lab.synth.data import Mixture
from owl_lab.synth.distractor import CHOICE_KINDS, binding_instance, named_question, sample_n_images
from owl_lab.synth.shapes import sample_scene
from owl_lab.synth.tasks import SCENE_QUESTIONS, answer_question
from owl_lab.synth.tokenizer import build_tokenizer


def test_training_task_and_binding_batches():
    ex = task_binding(random.Random(1), render_size=28, binding_n=7, distractor_pool=16)
    assert len(ex.images) == 7 and ex.answer in ex.meta["options"]
    ns = [sample_n_images(random.Random(i), 50) for i in range(2000)]
    assert min(ns) == 1 and max(ns) == 50 and sum(n <= 5 for n in ns) > sum(n > 25 for n in ns)
    with pytest.raises(ValueError, match="curve"):
        sample_n_images(random.Random(0), 5, "cubic")
    mix = Mixture(
        {"binding": 1, "color": 1},
        seed=0,
        render_size=28,
        binding_max_images=20,
        binding_images_per_batch=40,
        distractor_pool=32,
    )
    batches = list(mix.batches(8, 12))
    kinds = [{e.task for e in b} for b in batches]
    assert {"binding"} in kinds and {"color"} in kinds and all(len(k) == 1 for k in kinds)
    for b in batches:
        if b[0].task == "binding":  # one N per batch, images per batch bounded
            assert len({len(e.images) for e in b}) == 1 and len(b) == max(2, min(8, 40 // len(b[0].images)))
    again = list(
        Mixture(
            {"binding": 1, "color": 1},
            seed=0,
            render_size=28,
            binding_max_images=20,
            binding_images_per_batch=40,
            distractor_pool=32,
        ).batches(8, 12)
    )
    assert [[e.text for e in b] for b in again] == [[e.text for e in b] for b in batches]


def test_find_task_has_exactly_one_image_with_the_object():
    for i in range(20):
        ex = task_find(random.Random(i), render_size=28, binding_n=6, distractor_pool=64)
        color, shape = ex.text.rstrip("?").split()[-2:]
        holders = [
            k + 1
            for k, s in enumerate(ex.scenes)
            if any((o.color, o.shape) == (color, shape) for o in s.objects)
        ]
        assert holders == [int(ex.answer)] == [ex.meta["target"]] and len(ex.images) == 6


def test_binding_batches_mix_in_the_find_task_at_its_share():
    mix = Mixture(
        {"binding": 1},
        seed=1,
        render_size=28,
        binding_max_images=4,
        binding_images_per_batch=64,
        distractor_pool=32,
        binding_find_share=0.25,
    )
    tasks = [e.task for b in mix.batches(16, 10) for e in b]
    assert 0.1 < tasks.count("find") / len(tasks) < 0.4 and set(tasks) == {"find", "binding"}


def test_follow_up_turns_ask_other_slots_in_the_papers_form():
    ex = task_binding(
        random.Random(3), render_size=28, binding_n=10, distractor_pool=16, binding_turns_per_image=0.6
    )
    turns = ex.meta["turns"]
    assert len(turns) == 5  # K = round(0.6 * 10) = 6 turns, the first is the prompt itself
    asked = [int(u.split(",")[0].removeprefix("In Image ")) for u, _ in turns]
    assert len(set(asked)) == 5 and ex.meta["target"] not in asked
    for (user, answer), slot in zip(turns, asked, strict=True):
        parts = user.rstrip("?").split(", ")  # "In Image Y", question, o1, …, "o3 or o4"
        options = parts[2:-1] + parts[-1].split(" or ")
        assert answer in options and len(options) in (2, 4) and "<|image|>" not in user
        assert user.startswith(f"In Image {slot}, ")
    # every follow-up answer is right about its own slot's scene: re-ask the same draws
    q, a, opts, _ = question_about(random.Random(0), ex.scenes[0])
    assert a in opts and named_question(7, q, opts).startswith("In Image 7, ")
    # capped by binding_max_turns and by N; off (0) draws nothing, so old streams are unchanged
    ex50 = task_binding(
        random.Random(3), render_size=28, binding_n=50, distractor_pool=16, binding_turns_per_image=0.6
    )
    assert len(ex50.meta["turns"]) == 5
    assert (
        follow_up_turns(random.Random(0), task_binding(random.Random(4), render_size=28, binding_n=1), 0.6)
        == []
    )
    plain = task_binding(random.Random(3), render_size=28, binding_n=10, distractor_pool=16)
    assert "turns" not in plain.meta and plain.text == ex.text and plain.answer == ex.answer


def test_curriculum_phase_draws_n_from_the_listed_set():
    mix = Mixture(
        {"binding": 1},
        seed=2,
        render_size=28,
        binding_images_per_batch=64,
        distractor_pool=16,
        binding_n_choices=[2, 7],
    )
    ns = {len(b[0].images) for b in mix.batches(8, 12)}
    assert ns == {2, 7}


@pytest.mark.parametrize("kind", CHOICE_KINDS)
def test_answer_question_inverts_every_choice_asker(kind):
    """Each asker's answer is what answer_question reads back off the same scene; other scenes give
    None exactly where the question is not askable on them."""
    for i in range(200):
        rng = random.Random(f"{kind}/{i}")
        scene = sample_scene(rng, 1, 4)
        qa = SCENE_QUESTIONS[kind][0](rng, scene)
        if qa is not None:
            assert answer_question(qa[0], scene) == qa[1], qa
    assert answer_question("What color is the circle?", sample_scene(random.Random(0), 0, 0)) is None
    with pytest.raises(ValueError, match="not a multiple-choice"):
        answer_question("Describe the image.", sample_scene(random.Random(0), 1, 1))


def test_hard_distractors_answer_the_question_otherwise():
    hard_wrong = plain_wrong = total = 0
    for i in range(40):
        kw = dict(render_size=28, binding_n=6, distractor_pool=256)
        hard = task_binding(random.Random(i), binding_hard_share=1.0, **kw)
        plain = task_binding(random.Random(i), **kw)
        question = hard.text.split(", ")[1] + "?"
        question = question[0].upper() + question[1:]
        for ex, count in ((hard, "hard"), (plain, "plain")):
            others = [s for k, s in enumerate(ex.scenes) if k + 1 != ex.meta["target"]]
            wrong = sum(answer_question(question, s) not in (None, ex.answer) for s in others)
            if count == "hard":
                hard_wrong, total = hard_wrong + wrong, total + len(others)
            else:
                plain_wrong += wrong
        assert hard.meta["hard"] and "hard" not in plain.meta
    assert hard_wrong / total > 0.95 and plain_wrong < 0.8 * hard_wrong  # hard ones are (almost) all lures
    with pytest.raises(ValueError, match="pool"):
        binding_instance(random.Random(0), 3, *_a_question(), render_size=28, pool=0, hard=True)


def _a_question():
    from owl_lab.synth.distractor import choice_question

    scene, question, answer, options = choice_question(random.Random(0), "color")
    return scene, question, answer, options, "color"


def test_echo_prompts_ask_for_the_label_and_draw_nothing_when_off():
    tok = build_tokenizer("owl3")
    echoes = [
        task_binding(
            random.Random(i), render_size=28, binding_n=5, binding_echo_share=1.0, binding_sparse_share=0.5
        )
        for i in range(10)
    ]
    for ex in echoes:
        names = ex.meta.get("labels") or list(range(1, 6))
        assert ex.text.endswith(ECHO_SUFFIX) and ex.meta["echo"] and "turns" not in ex.meta
        assert ex.answer == str(names[ex.meta["target"] - 1]) and f"In Image {ex.answer}," in ex.text
        assert tok.unk_token_id not in tok(ex.text + " " + ex.answer)["input_ids"]
    for i in range(10):  # off: the stream is the old one bit for bit
        a = task_binding(random.Random(i), render_size=28, binding_n=5)
        b = task_binding(
            random.Random(i), render_size=28, binding_n=5, binding_echo_share=0.0, binding_hard_share=0.0
        )
        assert (a.text, a.answer, a.meta) == (b.text, b.answer, b.meta)
