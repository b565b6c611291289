"""owl_lab.analysis.occlusion: captum occlusion against a hand-occluded forward; the object scorer."""

from __future__ import annotations

import pytest
import torch

from owl_lab import load_owl, synth
from owl_lab.analysis.occlusion import (
    asked_object,
    background_pixels,
    cell_mask,
    object_cover,
    object_hits,
    object_share,
    occlusion_map,
)
from owl_lab.analysis.pixels import answer_positions
from owl_lab.synth import Obj, Scene, render
from owl_lab.synth.shapes import _shape_mask
from owl_lab.synth.tasks import Example


def known_scene_example() -> Example:
    scene = Scene(
        (Obj("circle", "red", "large", "plain", 0, 2), Obj("square", "blue", "small", "plain", 2, 0))
    )
    return Example("color", "<|image|>What color is the circle?", "red", [render(scene)], [scene])


@pytest.fixture(scope="module", params=["owl2-tiny", "owl3-tiny"])
def owl(request):
    model, processor = load_owl(request.param)
    return request.param, model.eval(), processor


def test_asked_object_per_question_kind():
    ex = known_scene_example()
    assert asked_object(ex).shape == "circle"
    found = 0
    for task in ("color", "position", "size", "pattern", "dense_color", "shape"):
        for e in synth.eval_set(task, 6, seed=1):
            obj = asked_object(e)
            if obj is None:
                assert task == "shape" and e.answer == "nothing"  # an empty cell names no object
                continue
            found += 1
            if task in ("shape", "dense_color"):
                assert e.answer in (obj.shape, obj.color)
            elif task == "position":
                assert e.answer == obj.position
            else:
                assert e.answer == getattr(
                    obj, {"color": "color", "size": "size", "pattern": "pattern"}[task]
                )
    assert found >= 30
    for task in ("count", "caption", "add"):
        assert all(asked_object(e) is None for e in synth.eval_set(task, 4, seed=1))


def test_object_cover_and_share():
    obj = known_scene_example().scenes[0].objects[0]
    cover = object_cover(obj, (8, 8))
    box, mask = _shape_mask(obj, 112)
    assert float(cover.mean()) == pytest.approx(mask.sum() / 112**2, abs=1e-6)  # cells tile the pixels
    assert cover[:, :4].sum() == 0 and cover[:2, 5:].sum() > 0  # top-right cell only
    assert object_share(torch.ones(8, 8), cover) == pytest.approx(float(cover.mean()))  # uniform = chance
    assert object_share(cover, cover) > 0.5
    with pytest.raises(ValueError, match="differ in grid"):
        object_share(torch.ones(4, 4), cover)


def test_occlusion_matches_hand_occluded_forward(owl):
    _, model, processor = owl
    ex = known_scene_example()
    drop = occlusion_map(model, processor, ex, perturbations_per_eval=7)  # uneven chunks on purpose
    assert drop.shape == (1, 8, 8)
    batch = processor(text=ex.text, images=ex.images, answers=ex.answer)
    pos, ids = answer_positions(model, batch)
    fill = background_pixels(processor, ex)
    cells = cell_mask(batch["pixel_values"].shape[-1], (8, 8))[0, 0]

    def logp(pixels):
        fwd = {k: v for k, v in batch.items() if k not in ("labels", "pixel_values")}
        with torch.no_grad():
            logits = model(**fwd, pixel_values=pixels).logits
        return float(torch.log_softmax(logits[0, pos[0]].float(), -1)[ids[0]])

    base = logp(batch["pixel_values"])
    for cell in (0, 8 * 1 + 6, 63):
        px = batch["pixel_values"].clone()
        where = cells == cell
        px[0][:, where] = fill[0][:, where]
        assert drop[0].flatten()[cell] == pytest.approx(base - logp(px), abs=1e-4)


def test_object_hits_table(owl):
    _, model, processor = owl
    hits = object_hits(model, processor, [known_scene_example()], ig_steps=4, progress=False)
    assert set(hits["map"]) == {"raw", "composed", "rollout", "integrated_gradients", "occlusion"}
    assert hits["share"].between(0, 1).all() and (hits["chance"] > 0).all()
    occ = hits.set_index("map").loc["occlusion"]
    assert occ["share"] > 3 * occ["chance"]  # erasing the red circle is what hurts "red"
    with pytest.raises(ValueError, match="names no single object"):
        object_hits(model, processor, synth.eval_set("count", 1, seed=0), progress=False)
