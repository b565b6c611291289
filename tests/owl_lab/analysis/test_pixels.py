"""owl_lab.analysis.pixels: the composed answer→pixels maps against the models' own eager attentions."""

from __future__ import annotations

import pytest
import torch

from owl_lab import load_owl
from owl_lab.analysis.occlusion import asked_object, object_cover, object_share
from owl_lab.analysis.pixels import PIXEL_COLUMNS, answer_positions, answer_to_pixels, rollout
from owl_lab.evaluate import expand_labels
from owl_lab.synth import Obj, Scene, render
from owl_lab.synth.tasks import Example


def known_scene_example() -> Example:
    """One large red circle in the top-right cell: the answer object is known exactly."""
    scene = Scene((Obj("circle", "red", "large", "plain", 0, 2),))
    return Example("color", "<|image|>What color is the circle?", "red", [render(scene)], [scene])


@pytest.fixture(scope="module", params=["owl2-tiny", "owl3-tiny"])
def owl(request):
    model, processor = load_owl(request.param)
    return request.param, model.eval(), processor


def test_answer_positions_match_expanded_labels(owl):
    name, model, processor = owl
    ex = known_scene_example()
    batch = processor(text=ex.text, images=ex.images, answers=ex.answer)
    positions, ids = answer_positions(model, batch)
    labels = batch["labels"]
    if name.startswith("owl2"):
        length = labels.shape[1] + model.config.tokens_per_image - 1
        labels = expand_labels(labels, batch["input_ids"], model.config.tokens_per_image, length)
    where = (labels[0] != -100).nonzero().flatten()
    assert positions == (where - 1).tolist() and ids == labels[0, where].tolist()


def test_composed_maps_equal_eager_products(owl):
    name, model, processor = owl
    ex = known_scene_example()
    path = answer_to_pixels(model, processor, ex, tokens="all", rollout_encoder=False)
    batch = processor(text=ex.text, images=ex.images, answers=ex.answer)
    forward = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        out = model(**forward, output_attentions=True)
    t = path.positions
    for li, layer in enumerate(path.layers):
        got = path.per_layer["composed"][li, :, 0].flatten(1)  # [T, P]
        if name.startswith("owl2"):
            Q = model.config.tokens_per_image - 1
            start = int((batch["input_ids"][0] == -200).nonzero()[0])
            d = out.attentions[layer][0, :, t, start : start + Q].mean(0)  # [T, Q] decoder → query rows
            with torch.no_grad():
                feats = model.model.vision_model(forward["pixel_values"]).last_hidden_state
                abstr = model.model.visual_abstractor(feats, output_attentions=True).attentions[-1]
            A = abstr[0].mean(0)[:, Q + 1 :]  # [Q, P] query → patches (after the query keys and CLS)
            assert torch.allclose(got, d @ A, atol=1e-5)
            raw = path.per_layer["raw"][li, :, 0].flatten(1)
            assert torch.allclose(raw, d.sum(-1, keepdim=True) * A.mean(0), atol=1e-5)
        else:
            cross = out.cross_attentions[layer][0, :, t].mean(0)  # [T, P]
            raw = path.per_layer["raw"][li, :, 0].flatten(1)
            assert torch.allclose(raw, cross, atol=1e-5)
            share = got.sum(-1) / raw.sum(-1)  # the gate's vision share scales the whole map
            assert ((share > 0) & (share < 1)).all()
            assert torch.allclose(got, share[:, None] * raw, atol=1e-6)
    table = path.table
    assert list(table.columns) == PIXEL_COLUMNS and set(table["layer"]) == {*path.layers, "all"}
    assert len(path.tokens) == 2  # "red" and the end-of-answer token


def test_rollout_is_row_stochastic_and_identity_for_identity():
    eye = torch.eye(5).expand(3, 1, 5, 5)
    assert torch.allclose(rollout(eye)[0], torch.eye(5))
    a = torch.softmax(torch.randn(2, 1, 5, 5), -1)
    r = rollout(a)
    assert torch.allclose(r.sum(-1), torch.ones(1, 5), atol=1e-6)
    expected = (0.5 * a[1, 0] + 0.5 * torch.eye(5)) @ (0.5 * a[0, 0] + 0.5 * torch.eye(5))
    assert torch.allclose(r[0], expected, atol=1e-6)


def test_maps_land_on_the_known_object(owl):
    name, model, processor = owl
    ex = known_scene_example()
    cover = object_cover(asked_object(ex), (8, 8))
    path = answer_to_pixels(model, processor, ex)
    chance = float(cover.mean())
    assert 0.03 < chance < 0.1
    assert object_share(path.maps["composed"][0, 0], cover) > 3 * chance
    fig = path.figure()
    assert len(fig.data) == 1 + 2 * len(path.maps)


def test_bad_input(owl):
    _, model, processor = owl
    ex = known_scene_example()
    with pytest.raises(ValueError, match="out of range"):
        answer_to_pixels(model, processor, ex, tokens=[5])
    with pytest.raises(ValueError, match="at least one image"):
        answer_to_pixels(model, processor, Example("add", "What is 1 plus 2?", "3"))
