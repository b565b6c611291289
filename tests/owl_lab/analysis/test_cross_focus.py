"""owl_lab.analysis.cross_focus: focus of the answer position's image attention, and the blind
(uniform / shuffled) cross-attention interventions."""

from __future__ import annotations

import math

import pytest
import torch

from owl_lab.analysis.cross_focus import (
    asked_object,
    blind_cross_attention,
    cross_focus,
    patch_object_share,
    uniform_cross_attention,
)
from owl_lab.synth import eval_set
from owl_lab.synth.shapes import Obj, Scene


@pytest.fixture(scope="module")
def owl3(build_tiny_owl):
    return build_tiny_owl("owl3")  # gated, hyper layer 1, 4x4 patch grid, O(1) weights


@pytest.fixture(scope="module")
def examples():
    return eval_set("color", 3, seed=1, render_size=112) + eval_set("count", 2, seed=1, render_size=112)


def _last_logits(model, processor, exs):
    batch = processor(text=[e.text for e in exs], images=[list(e.images) for e in exs])
    last = batch["attention_mask"].sum(1) - 1
    with torch.no_grad():
        out = model(**batch)
    return out.logits[torch.arange(len(exs)), last]


def test_asked_object_and_patch_share():
    red = Obj("circle", "red", "large", "plain", 0, 0)
    blue = Obj("square", "blue", "small", "plain", 2, 2)
    scene = Scene((red, blue))
    assert asked_object("What color is the circle?", scene) == red
    assert asked_object("Where is the blue square?", scene) == blue
    assert asked_object("Where is the red square?", scene) is None  # no such object
    assert asked_object("How many objects are there?", scene) is None  # no shape named
    share = patch_object_share(scene, 4)
    only_red = patch_object_share(scene, 4, only=red)
    assert share.shape == (16,) and bool((share >= only_red - 1e-9).all())
    assert only_red[0] > 0.5 and only_red[15] == 0  # top-left cell holds the circle, bottom-right does not
    assert patch_object_share(scene, 4, only=blue)[15] > 0


def test_cross_focus_matches_eager_probabilities(owl3, examples):
    model, processor = owl3
    focus = cross_focus(model, processor, examples, batch_size=2, min_share=0.01)
    layer = model.config.hyper_layer_indices[0]
    assert set(focus["layer"]) == {layer} and len(focus) == len(examples) * model.config.num_attention_heads
    batch = processor(text=[e.text for e in examples], images=[list(e.images) for e in examples])
    last = batch["attention_mask"].sum(1) - 1
    with torch.no_grad():
        probs = model(**batch, output_attentions=True).cross_attentions[layer]  # [B, H, L, N*T]
    p = probs[torch.arange(len(examples)), :, last]  # [B, H, K]
    p = p / p.sum(-1, keepdim=True)
    for row in focus.itertuples():
        q = p[row.example, row.head]
        assert row.n_keys == 16 and row.uniform_weight == pytest.approx(1 / 16)
        assert row.max_weight == pytest.approx(float(q.max()), abs=1e-5)
        assert row.argmax == int(q.argmax())
        ent = float(-(q * q.clamp_min(1e-30).log()).sum())
        assert row.entropy == pytest.approx(ent, abs=1e-4)
        assert row.norm_entropy == pytest.approx(ent / math.log(16), abs=1e-4)
        assert 0 <= row.object_mass <= 1 and 0 < row.object_chance < 1
    color_rows = focus[focus["example"] < 3]
    assert color_rows["asked_mass"].notna().all()  # "What color is the <shape>?" names one object
    assert focus[focus["example"] >= 3]["asked_mass"].isna().all()  # count questions name none
    assert focus["norm_entropy"].lt(0.999).any()  # O(1) weights: not uniform


def test_uniform_makes_attention_uniform_and_restores(owl3, examples):
    model, processor = owl3
    before = _last_logits(model, processor, examples)
    with uniform_cross_attention(model):
        focus = cross_focus(model, processor, examples)
        during = _last_logits(model, processor, examples)
    assert focus["norm_entropy"].to_numpy() == pytest.approx(1.0, abs=1e-5)
    assert not torch.allclose(before, during, atol=1e-4)  # the cross context changed
    assert torch.equal(_last_logits(model, processor, examples), before)  # restored on exit
    assert "attend" not in vars(model.language_model.model.layers[1].self_attn)


def test_uniform_leaves_text_only_prompts(owl3):
    model, processor = owl3
    text = eval_set("add", 2, seed=0)
    before = _last_logits(model, processor, text)
    with blind_cross_attention(model, "uniform"):
        assert torch.equal(_last_logits(model, processor, text), before)


def test_shuffle_keeps_the_weights_moves_them(owl3, examples):
    model, processor = owl3
    plain = cross_focus(model, processor, examples)
    with blind_cross_attention(model, "shuffle", seed=3):
        shuffled = cross_focus(model, processor, examples)
        logits = _last_logits(model, processor, examples)
    # the same multiset of weights (entropy, max), put on other patches
    assert shuffled["entropy"].to_numpy() == pytest.approx(plain["entropy"].to_numpy(), abs=1e-4)
    assert shuffled["max_weight"].to_numpy() == pytest.approx(plain["max_weight"].to_numpy(), abs=1e-5)
    assert (shuffled["argmax"] != plain["argmax"]).any()
    assert not torch.allclose(logits, _last_logits(model, processor, examples), atol=1e-4)


def test_bad_input(owl3, build_tiny_owl):
    model, _ = owl3
    with pytest.raises(ValueError, match="mode"):
        with blind_cross_attention(model, "random"):
            pass
    with pytest.raises(ValueError, match="not hyper layers"):
        with blind_cross_attention(model, "uniform", layers=[1]):
            pass
    fused, _ = build_tiny_owl("owl3-fused")
    with pytest.raises(ValueError, match="separate cross softmax"):
        with uniform_cross_attention(fused):
            pass
    owl2, processor2 = build_tiny_owl("owl2")
    with pytest.raises(ValueError, match="Owl3"):
        cross_focus(owl2, processor2, eval_set("color", 1, seed=0))


def test_cross_focus_multi_image_focus_is_the_target(owl3):
    import random

    from owl_lab.synth.binding_train import task_find

    model, processor = owl3
    exs = [task_find(random.Random(i), render_size=112, binding_n=3, distractor_pool=16) for i in range(3)]
    focus = cross_focus(model, processor, exs, min_share=0.01)
    batch = processor(text=[e.text for e in exs], images=[list(e.images) for e in exs])
    last = batch["attention_mask"].sum(1) - 1
    layer = model.config.hyper_layer_indices[0]
    with torch.no_grad():
        probs = model(**batch, output_attentions=True).cross_attentions[layer]  # [B, H, L, 3*16]
    p = probs[torch.arange(3), :, last]
    for row in focus.itertuples():
        t = exs[row.example].meta["target"] - 1
        assert row.n_keys == 48 and row.target_chance == pytest.approx(1 / 3)
        assert row.target_mass == pytest.approx(
            float(p[row.example, row.head, 16 * t : 16 * t + 16].sum()), abs=1e-5
        )
        assert row.object_mass <= row.target_mass + 1e-6
        if not math.isnan(row.asked_mass):  # NaN when the target scene holds two such objects
            assert row.asked_mass <= row.object_mass + 1e-6
    assert focus["asked_mass"].notna().any()
