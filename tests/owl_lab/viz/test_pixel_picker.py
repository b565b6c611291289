"""owl_lab.viz.pixel_picker: the question / token picker's callback follows its controls."""

from __future__ import annotations

import pytest

from owl_lab import load_owl
from owl_lab.synth import Obj, Scene, render
from owl_lab.synth.tasks import Example
from owl_lab.viz.pixel_picker import answer_pixel_picker, answer_pixels_view


def _example(answer_color="red") -> Example:
    scene = Scene((Obj("circle", answer_color, "large", "plain", 0, 2),))
    return Example("color", "<|image|>What color is the circle?", answer_color, [render(scene)], [scene])


def test_picker_callback_follows_the_controls():
    models = {name: load_owl(name) for name in ("owl2-tiny", "owl3-tiny")}
    examples = [_example(), _example("blue")]
    picker = answer_pixel_picker(models, examples, occlusion=False)
    first = picker.view
    assert first.token == "red" and set(first.numbers) == {"raw", "composed", "rollout", "chance"}
    picker.question.value = 1  # observers call update()
    assert picker.view.token == "blue"
    picker.token.value = 1
    assert picker.view.token != "blue"  # the end-of-answer token
    picker.model.value = "owl3-tiny"
    assert picker.layer.options == ("all", 0, 2, 4)
    picker.layer.value = 2
    assert "layer 2" in picker.view.figure.layout.title.text
    view = answer_pixels_view(*models["owl2-tiny"], examples[0], occlusion=True)
    assert "occlusion" in view.numbers and view.numbers["occlusion"] > view.numbers["chance"]
    with pytest.raises(ValueError, match="layer must be"):
        answer_pixels_view(*models["owl3-tiny"], examples[0], layer=1)
