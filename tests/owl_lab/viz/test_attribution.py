"""owl_lab.viz.attribution: patch maps over the image and token bars carry the given numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from owl_lab.viz.attribution import patch_attribution_figure, token_attribution_figure


def test_patch_figure_scales_each_map_and_tiles_the_image():
    image = Image.new("RGB", (112, 56), "red")
    ig = torch.tensor([[0.0, -2.0], [1.0, 0.5]])  # signed: drawn as |IG| / max |IG|
    fig = patch_attribution_figure(image, {"|IG|": ig, "attention": np.array([[0.1, 0.2], [0.3, 0.4]])})
    heat = [t for t in fig.data if t.type == "heatmap"]
    assert len(heat) == 2 and sum(t.type == "image" for t in fig.data) == 3
    np.testing.assert_allclose(heat[0].z, [[0, 1], [0.5, 0.25]])
    np.testing.assert_allclose(heat[1].z, [[0.25, 0.5], [0.75, 1.0]])
    assert (heat[0].x0, heat[0].dx, heat[0].y0, heat[0].dy) == (28, 56, 14, 28)  # 2×2 cells over 112×56 px
    assert [a.text for a in fig.layout.annotations] == ["image", "|IG|", "attention"]
    with pytest.raises(ValueError, match="2-D"):
        patch_attribution_figure(image, {"bad": np.zeros((1, 2, 2))})


def test_token_figure_normalises_both_series():
    table = pd.DataFrame(
        {
            "position": [0, 1, 3],
            "token": ["<s>", "what", "color"],
            "attention": [0.2, 0.2, 0.6],
            "attribution": [0.0, -1.0, 3.0],
        }
    )
    fig = token_attribution_figure(table)
    assert list(fig.data[0].x) == ["0:<s>", "1:what", "3:color"]
    np.testing.assert_allclose(fig.data[0].y, [0.2, 0.2, 0.6])
    np.testing.assert_allclose(fig.data[1].y, [0.0, 0.25, 0.75])
