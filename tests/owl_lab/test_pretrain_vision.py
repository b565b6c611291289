"""The vision pre-training stage's per-attribute loss weights and the probe ``train`` records after it."""

from __future__ import annotations

import pytest
import torch

from owl_lab.pretrain_vision import _cross_entropy, attribute_weights
from owl_lab.synth.shapes import CELL_ATTRIBUTES
from owl_lab.train import load_recipe, train

SIZES = [len(values) + 1 for _, values in CELL_ATTRIBUTES]  # per attribute: its values + "empty"


def test_attribute_weights_default_to_one_and_reject_unknown_names():
    assert attribute_weights({}) == [1.0] * len(CELL_ATTRIBUTES)
    names = [name for name, _ in CELL_ATTRIBUTES]
    weights = attribute_weights({"attribute_weights": {"pattern": 4}})
    assert weights[names.index("pattern")] == 4.0 and sum(weights) == len(names) - 1 + 4
    with pytest.raises(ValueError, match="unknown attributes.*texture"):
        attribute_weights({"attribute_weights": {"texture": 2}})
    with pytest.raises(ValueError, match=">= 0"):
        attribute_weights({"attribute_weights": {"shape": -1}})


def test_a_weight_scales_only_its_attributes_loss_and_gradient():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, sum(SIZES), generator=generator, requires_grad=True)  # [B, C, Σ]
    targets = torch.stack([torch.randint(0, s, (3, 5), generator=generator) for s in SIZES], -1)  # [B, C, 4]
    parts = [
        torch.nn.functional.cross_entropy(p.flatten(0, 1), targets[..., k].flatten())
        for k, p in enumerate(logits.split(SIZES, -1))
    ]
    ones = _cross_entropy(logits, targets, SIZES, [1.0] * 4)
    torch.testing.assert_close(ones, sum(parts))
    torch.testing.assert_close(
        _cross_entropy(logits, targets, SIZES, [1, 1, 1, 4]), sum(parts) + 3 * parts[3]
    )
    # weight 0 on the last attribute: its logits get no gradient, the others keep theirs
    _cross_entropy(logits, targets, SIZES, [1, 1, 1, 0]).backward()
    last = logits.grad.split(SIZES, -1)
    assert torch.count_nonzero(last[3]) == 0 and torch.count_nonzero(last[0]) > 0


def test_train_records_a_probe_of_the_encoder_after_each_vision_stage():
    recipe = load_recipe("owl2-tiny")  # vision stage + two language stages
    metrics = train(recipe, None, progress=False, evaluate_after=False, steps_override=2, threads=1)
    probe = metrics["vision_probe"]
    assert list(probe) == ["stage1"]
    assert set(probe["stage1"]) == {name for name, _ in CELL_ATTRIBUTES}
    assert all(0.0 <= v <= 100.0 for v in probe["stage1"].values())
    smoke = train(load_recipe("smoke-owl2"), None, progress=False, evaluate_after=False, steps_override=2)
    assert "vision_probe" not in smoke  # no vision stage, no probe


@pytest.mark.parametrize("bridge", [True, False])
def test_train_bridge_false_leaves_the_owl3_projector_untouched(bridge):
    from owl_lab.pretrain_vision import run_vision_stage
    from owl_lab.train import build

    recipe = load_recipe("smoke-owl3")
    model, processor = build(recipe)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stage = {
        "kind": "vision",
        "steps": 2,
        "batch_size": 4,
        "lr": 0.01,
        "warmup": 1,
        "train_bridge": bridge,
        "objectives": ["patches", "board"],
    }
    run_vision_stage(
        model,
        processor,
        "owl3",
        stage,
        "t",
        {"render_size": 56},
        {"step": [], "loss": [], "lr": [], "stage": []},
        0,
        0,
        False,
    )
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("vision_model.") for k in moved)
    assert any(k.startswith("vision2text_model.") for k in moved) == bridge
    assert all(k.startswith(("vision_model.", "vision2text_model.")) for k in moved)


def test_tags_objective_trains_on_tagged_images_with_a_per_patch_tag_target(monkeypatch):
    """Objective ``tags``: half the images carry a frame tag; every patch predicts it (0 = none)."""
    import random

    import numpy as np

    import owl_lab.pretrain_vision as pv
    from owl_lab.synth.shapes import BACKGROUND, FRAME_TAGS
    from owl_lab.train import build

    draws = [pv._draw_tag(random.Random(i), len(FRAME_TAGS)) for i in range(400)]
    assert 150 < draws.count(0) < 250 and max(draws) <= len(FRAME_TAGS) and len(set(draws)) > 40
    recipe = load_recipe("smoke-owl3")
    model, processor = build(recipe)
    seen, targets = [], []
    real_processor = processor.__class__.__call__

    def spy(self, text=None, images=None, **k):
        seen.extend(im for ims in images for im in ims)
        return real_processor(self, text=text, images=images, **k)

    real_ce = torch.nn.functional.cross_entropy

    def spy_ce(logits, target, *a, **k):
        targets.append(target.clone())
        return real_ce(logits, target, *a, **k)

    monkeypatch.setattr(processor.__class__, "__call__", spy)
    monkeypatch.setattr(pv.nn.functional, "cross_entropy", spy_ce)
    stage = {"kind": "vision", "steps": 1, "batch_size": 8, "lr": 0.01, "warmup": 1, "objectives": ["tags"]}
    history = {"step": [], "loss": [], "lr": [], "stage": []}
    pv.run_vision_stage(model, processor, "owl3", stage, "t", {"render_size": 56}, history, 0, 0, False)
    batch = seen[-8:]

    def most_common(im):  # the background (or its tint) covers more pixels than any object colour
        colors, counts = np.unique(np.asarray(im).reshape(-1, 3), axis=0, return_counts=True)
        return tuple(int(v) for v in colors[counts.argmax()])

    tagged = [most_common(im) != BACKGROUND for im in batch]
    tag_target = targets[-1].view(8, -1)
    assert (tag_target == tag_target[:, :1]).all()  # one target per image, on every patch
    assert [bool(t) for t in tag_target[:, 0].tolist()] == tagged
    with pytest.raises(ValueError, match="objectives"):
        pv.run_vision_stage(
            model, processor, "owl3", {**stage, "objectives": ["frames"]}, "t", {}, history, 0, 0, False
        )


def test_tag_targets_in_objects_mode_ask_only_object_patches_for_the_label():
    """Mode ``frame_tags: "objects"``: patches with ≥ 1/4 object pixels report the label, pure background
    patches "untagged" (0), slivers are not scored (-100); untagged images and the other modes: one class."""
    from owl_lab.pretrain_vision import tag_targets
    from owl_lab.synth.shapes import Obj, Scene, patch_object_shares, render

    scene = Scene(
        (Obj("circle", "red", "large", "plain", 0, 0), Obj("square", "blue", "small", "plain", 2, 2))
    )
    plain = render(scene, 112)
    share = torch.tensor(patch_object_shares(plain, 8))
    assert share.max() == 1.0 and (share == 0).any() and ((share > 0) & (share < 0.25)).any()
    got = tag_targets([7, 0], [plain, plain], "objects", 8)
    assert got.shape == (2, 64)
    assert (got[0][share >= 0.25] == 7).all() and (got[0][share == 0] == 0).all()
    assert (got[0][(share > 0) & (share < 0.25)] == -100).all()
    assert (got[1] == 0).all()  # an untagged image: every patch says "untagged"
    assert (tag_targets([7, 0], [plain, plain], "dots", 8) == got).all()  # label only in objects there too
    for mode in (True, "background", "all"):
        assert (tag_targets([7, 0], [plain, plain], mode, 8) == torch.tensor([[7], [0]])).all()
    with pytest.raises(ValueError, match="one render per tag"):
        tag_targets([7], [plain, plain], "objects", 8)
    with pytest.raises(ValueError, match="frame_tags"):
        tag_targets([7], [plain], "object", 8)
