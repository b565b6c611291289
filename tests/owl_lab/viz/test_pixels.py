"""owl_lab.viz.pixels: the overlay and the hit-rate bars."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from owl_lab.synth import Obj, Scene, render
from owl_lab.synth.tasks import Example
from owl_lab.viz.pixels import object_hit_figure, pixel_overlay_figure


def _example(answer_color="red") -> Example:
    scene = Scene((Obj("circle", answer_color, "large", "plain", 0, 2),))
    return Example("color", "<|image|>What color is the circle?", answer_color, [render(scene)], [scene])


def test_overlay_and_hit_figures():
    ex = _example()
    cover = torch.zeros(8, 8)
    cover[1, 6] = 0.5
    fig = pixel_overlay_figure(ex.images[0], {"a": torch.rand(8, 8), "b": -torch.ones(8, 8)}, cover=cover)
    assert len(fig.data) == 5 and len(fig.layout.shapes) == 3  # the outlined cell in each of 3 panels
    with pytest.raises(ValueError, match="2-D"):
        pixel_overlay_figure(ex.images[0], {"a": torch.rand(2, 8, 8)})
    summary = pd.DataFrame(
        {
            "model": ["m", "m"],
            "map": ["raw", "composed"],
            "share": [0.1, 0.3],
            "share_se": [0.01, 0.02],
            "chance": [0.04, 0.04],
        }
    )
    assert len(object_hit_figure(summary).data) == 2
