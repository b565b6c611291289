"""owl_lab.synth.distractor: the paper's distractor benchmark (prompt, rotations, CircularEval) and its
training task; scored by null and perfect answerers through analysis.distractor."""

from __future__ import annotations

import random

import pytest

from owl_lab.analysis.distractor import circular_curve, circular_scores
from owl_lab.synth.data import Mixture
from owl_lab.synth.distractor import (
    ANSWER_SPACE,
    CHOICE_KINDS,
    chance_levels,
    choice_question,
    circular_eval,
    paper_prompt,
    rotate,
    sample_n_images,
    task_binding,
)
from owl_lab.synth.tokenizer import build_tokenizer


def test_paper_prompt_format():
    text = paper_prompt(3, 2, "What color is the circle?", ["red", "blue", "green", "gray"])
    assert text == (
        "Image 1: <|image|> Image 2: <|image|> Image 3: <|image|> In Image 2, "
        "what color is the circle, red, blue, green or gray?"
    )
    with pytest.raises(ValueError, match="target"):
        paper_prompt(3, 4, "What?", ["yes", "no"])
    with pytest.raises(ValueError, match="options"):
        paper_prompt(1, 1, "What?", ["yes"])


def test_benchmark_words_are_in_the_vocabulary():
    tok = build_tokenizer("owl3")
    texts = [
        e.text + " " + e.answer for n in (1, 50) for g in circular_eval(0, n, 10, render_size=28) for e in g
    ]
    assert all(tok.unk_token_id not in tok(t)["input_ids"] for t in texts)


@pytest.mark.parametrize("n", [1, 5, 20])
def test_instances_rotate_the_options_and_redraw_the_distractors(n):
    groups = circular_eval(7, n, 10, render_size=28)
    for g in groups:
        first = g[0].meta["options"]
        k = len(first)
        assert len(g) == k == (2 if g[0].meta["kind"] == "exist" else 4)
        assert g[0].answer in first and len(set(first)) == k
        for r, ex in enumerate(g):
            assert ex.meta["options"] == first[r:] + first[:r] == rotate(first, r)
            assert ex.answer == g[0].answer and ex.meta["question"] == g[0].meta["question"]
            assert len(ex.images) == n and f"In Image {ex.meta['target']}," in ex.text
            assert ex.scenes[ex.meta["target"] - 1] == g[0].scenes[g[0].meta["target"] - 1]  # the true scene
        # the answer sits at a different option slot in every instance
        assert len({ex.meta["options"].index(ex.answer) for ex in g}) == k
        if n > 1:  # distractors are redrawn per instance
            distractors = [
                tuple(s for i, s in enumerate(ex.scenes) if i != ex.meta["target"] - 1) for ex in g
            ]
            assert len(set(distractors)) == k


def test_questions_do_not_depend_on_n():
    base = [
        (g[0].scenes[g[0].meta["target"] - 1], g[0].answer, tuple(g[0].meta["options"]))
        for g in circular_eval(3, 1, 12, render_size=28)
    ]
    for n in (5, 10):
        other = [
            (g[0].scenes[g[0].meta["target"] - 1], g[0].answer, tuple(g[0].meta["options"]))
            for g in circular_eval(3, n, 12, render_size=28)
        ]
        assert other == base
    assert {g[0].meta["kind"] for g in circular_eval(3, 1, 10, render_size=28)} == set(CHOICE_KINDS)


def _answerer(monkeypatch, answer):
    """Replace exact match by a fake model: ``answer(example) -> str``."""
    monkeypatch.setattr(
        "owl_lab.evaluate.exact_match",
        lambda model, processor, examples, *a, **k: [answer(e) == e.answer for e in examples],
    )


def test_an_oracle_scores_100_and_null_answerers_score_chance(monkeypatch):
    groups = circular_eval(11, 5, 60, render_size=28)
    _answerer(monkeypatch, lambda e: e.answer)
    assert circular_scores(None, None, groups)["circular"] == 100.0
    chance = chance_levels(groups)
    answers = [g[0].answer for g in groups]
    best = max(set(answers), key=answers.count)
    _answerer(monkeypatch, lambda e: best)  # the best constant answer
    assert circular_scores(None, None, groups)["circular"] == pytest.approx(chance["constant"])
    assert chance["constant"] < 25
    _answerer(monkeypatch, lambda e: e.meta["options"][0])  # "always the first option": rotation defeats it
    assert circular_scores(None, None, groups)["circular"] == 0.0
    rng = random.Random(0)  # a random guesser: ~ (1/k)^k per question
    scores = []
    for _ in range(200):
        _answerer(monkeypatch, lambda e: rng.choice(e.meta["options"]))
        scores.append(circular_scores(None, None, groups)["circular"])
    assert sum(scores) / len(scores) == pytest.approx(chance["random"], abs=1.0)


def test_an_answerer_that_ignores_the_named_image_fails(monkeypatch):
    """Answering about image 1 instead of image X is right only when X = 1 (or by luck)."""

    def about_first_image(e):
        return e.answer if e.meta["target"] == 1 else next(o for o in e.meta["options"] if o != e.answer)

    _answerer(monkeypatch, about_first_image)
    groups = circular_eval(5, 10, 40, render_size=28)
    assert circular_scores(None, None, groups)["circular"] < 5


def test_circular_curve_table(monkeypatch):
    _answerer(monkeypatch, lambda e: e.answer if e.meta["n_images"] < 10 else "no")
    table = circular_curve(None, None, 2, [1, 5, 10], n_questions=10, render_size=28)
    assert table["n_images"].tolist() == [1, 5, 10]
    assert table["circular"].tolist()[:2] == [100.0, 100.0] and table["circular"].iloc[2] <= 20
    assert (table["se"].iloc[:2] == 0).all() and table["questions"].tolist() == [10, 10, 10]


def test_choice_question_answer_among_options_and_rejects_unknown_kinds():
    for kind in CHOICE_KINDS:
        for i in range(20):
            _, _, answer, options = choice_question(random.Random(f"{kind}{i}"), kind)
            assert answer in options and set(options) <= set(ANSWER_SPACE[kind])
    with pytest.raises(ValueError, match="multiple-choice kind"):
        choice_question(random.Random(0), "caption")


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
    from owl_lab.synth.distractor import task_find

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
    from owl_lab.synth.distractor import follow_up_turns, named_question, question_about

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
