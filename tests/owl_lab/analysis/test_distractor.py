"""owl_lab.analysis.distractor: CircularEval pooling and the true-image share of image attention."""

from __future__ import annotations

import random

import pytest
import torch

from hooks import capture
from owl_lab.analysis.distractor import circular_scores, question_label_probe, target_share
from owl_lab.evaluate import exact_match
from owl_lab.synth import distractor_eval
from owl_lab.synth.binding_train import task_binding


@pytest.fixture(scope="module", params=["owl3", "owl3-fused"])
def owl3(request, build_tiny_owl):
    return build_tiny_owl(request.param)  # tiny random Owl3 with O(1) weights (conftest.py)


def test_circular_scores_pool_instances(owl3):
    model, processor = owl3
    groups = distractor_eval(seed=3, n_images=2, n_questions=4, n_instances=3, render_size=28)
    s = circular_scores(model, processor, groups, batch_size=5)
    hits = exact_match(model, processor, [e for g in groups for e in g])
    assert s["flags"] == [all(hits[3 * q : 3 * q + 3]) for q in range(4)]
    assert s["circular"] == pytest.approx(100 * sum(s["flags"]) / 4)
    assert s["instance"] == pytest.approx(100 * sum(hits) / 12) and (s["questions"], s["instances"]) == (
        4,
        12,
    )
    with pytest.raises(ValueError, match="non-empty"):
        circular_scores(model, processor, [[]])


def test_circular_is_all_instances(monkeypatch, owl3):
    model, processor = owl3
    groups = distractor_eval(seed=3, n_images=2, n_questions=2, n_instances=2, render_size=28)
    monkeypatch.setattr("owl_lab.evaluate.exact_match", lambda *a, **k: [True, False, True, True])
    s = circular_scores(model, processor, groups)
    assert s["flags"] == [False, True] and s["circular"] == 50.0 and s["instance"] == 75.0


def _reference_share(model, processor, ex) -> dict[int, float]:
    """Independent: full attention maps of the last position, mass on the true image's keys / all image
    keys."""
    batch = processor(text=ex.text, images=list(ex.images))
    layers = list(model.config.hyper_layer_indices)
    last = batch["input_ids"].shape[1] - 1
    with torch.no_grad(), capture(model, layers=layers, full_maps={i: [last] for i in layers}) as rec:
        model(**batch)
    out = {}
    for key, fm in rec.full_maps.items():  # key ends in (layer, kind)
        layer, kind = key[-2:]
        if kind not in ("cross", "joint"):
            continue
        p = fm.probs[0, :, 0]  # [H, Lk]
        image, target = fm.key_image[0] >= 0, fm.key_image[0] == ex.meta["target"] - 1
        out[layer] = float((p[:, target].sum(1) / p[:, image].sum(1)).mean())
    return out


def test_target_share_matches_full_maps_and_batching(owl3):
    model, processor = owl3
    examples = [
        g[0] for g in distractor_eval(seed=5, n_images=3, n_questions=3, n_instances=1, render_size=28)
    ]
    one = target_share(model, processor, examples, batch_size=1)
    many = target_share(model, processor, examples, batch_size=3)  # right padding: per-row last position
    assert torch.allclose(torch.tensor(one.to_numpy(float)), torch.tensor(many.to_numpy(float)), atol=1e-5)
    refs = [_reference_share(model, processor, ex) for ex in examples]
    for layer in model.config.hyper_layer_indices:
        assert one.loc[layer, "share"] == pytest.approx(sum(r[layer] for r in refs) / 3, abs=1e-5)
    per = target_share(
        model, processor, examples, batch_size=2, per_example=True
    )  # one row per (example, layer)
    assert sorted(per["example"].unique()) == [0, 1, 2]
    for (example, layer), share in per.set_index(["example", "layer"])["share"].items():
        assert share == pytest.approx(refs[example][layer], abs=1e-5)
    assert (
        list(one["chance"]) == pytest.approx([1 / 3] * len(one))
        and ((one["share"] > 0) & (one["share"] < 1)).all()
    )
    single = [g[0] for g in distractor_eval(seed=5, n_images=1, n_questions=2, render_size=28)]
    assert list(target_share(model, processor, single)["share"]) == pytest.approx(
        [1.0] * len(one)
    )  # all of it


def test_target_share_needs_hyper_layers(build_tiny_owl):
    model, processor = build_tiny_owl("owl2")
    with pytest.raises(ValueError, match="hyper layers"):
        target_share(model, processor, [])


def test_question_label_probe_reads_the_label_token_and_not_a_constant(build_tiny_owl):
    model, processor = build_tiny_owl("owl3")
    kw = dict(n_images=3, n_train=24, n_test=12, render_size=28, seed=5)
    table = question_label_probe(model, processor, **kw)
    assert list(table["position"].unique()) == ["answer", "label"]
    at_label = table[table["position"] == "label"]
    assert list(at_label["layer"]) == [str(i) for i in range(model.config.num_hidden_layers)] + ["L"]
    assert list(at_label["chance"]) == pytest.approx([100 / 3] * len(at_label))
    assert at_label["accuracy"].iloc[0] == 100.0  # the X token's own embedding names X
    # the answer position's layer-0 input is the embedding of "?" in every prompt: a constant feature
    # can do no better than the most frequent slot of the test prompts
    at_answer = table[table["position"] == "answer"]
    slots = [
        task_binding(
            random.Random(f"5/label-probe/test/{i}"), render_size=28, binding_n=3, distractor_pool=0
        ).meta["target"]
        for i in range(12)
    ]
    assert at_answer["accuracy"].iloc[0] <= 100 * max(slots.count(s) for s in set(slots)) / 12 + 1e-3


def test_question_label_probe_rejects_bad_input(build_tiny_owl):
    model, processor = build_tiny_owl("owl3")
    with pytest.raises(ValueError, match="positions"):
        question_label_probe(model, processor, positions=["middle"])
    with pytest.raises(ValueError, match="n_images"):
        question_label_probe(model, processor, n_images=1)
