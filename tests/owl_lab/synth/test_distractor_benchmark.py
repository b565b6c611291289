"""owl_lab.synth.distractor: the paper's distractor benchmark (prompt, rotations, CircularEval), scored
by null and perfect answerers through analysis.distractor (its training task: test_binding_train.py)."""

from __future__ import annotations

import random

import pytest

from owl_lab.analysis.distractor import circular_curve, circular_scores
from owl_lab.synth.distractor import (
    ANSWER_SPACE,
    CHOICE_KINDS,
    chance_levels,
    choice_question,
    circular_eval,
    paper_prompt,
    rotate,
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
