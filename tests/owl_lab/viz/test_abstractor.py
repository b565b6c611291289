"""owl_lab.viz.abstractor: the query/layer picker's callback and the widget without a frontend."""

from __future__ import annotations

import ipywidgets as w
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from owl_lab.viz.abstractor import abstractor_picker, abstractor_view


def _maps():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 3, 2, 4, 8, 8, generator=g) * 0.01  # [A, N, H, Q, gh, gw]
    maps[1, 2, :, 3, 0, 7] = 0.9  # layer 1, image 2, query 3: top-right patch, both heads
    return maps


def _summary():
    rows = [
        dict(
            abstractor_layer=a,
            image=n,
            head=h,
            query=q,
            patches=0.5,
            cls=0.1 * (q + 1),
            queries=0.5 - 0.1 * (q + 1),
        )
        for a in range(2)
        for n in range(3)
        for h in range(2)
        for q in range(4)
    ]
    return pd.DataFrame(rows)


def test_view_of_one_query_shows_its_heads_and_peak():
    images = [Image.new("RGB", (16, 16), (i * 50, 0, 0)) for i in range(3)]
    view = abstractor_view(_maps(), layer=-1, query=3, image=2, images=images, summary=_summary())
    assert (view.layer, view.query, view.image) == (1, 3, 2)
    assert view.numbers["peak_cell"] == (0, 2) and view.numbers["peak_lift"] > 3
    assert view.numbers["cls"] == pytest.approx(0.4) and view.numbers["queries"] == pytest.approx(0.1)
    heat = [t for t in view.figure.data if t.type == "heatmap"]
    assert len(heat) == 3  # mean over heads + 2 heads
    np.testing.assert_allclose(np.asarray(heat[0].z), _maps()[1, 2, :, 3].mean(0).numpy(), rtol=1e-6)
    assert view.figure.data[0].type == "image" and "query 3" in view.text and "peak_cell=(0, 2)" in view.text


def test_view_of_all_queries_averages_numbers_over_queries():
    view = abstractor_view(_maps(), layer=0, image=1, summary=_summary())
    assert view.query is None and len(view.figure.data) == 4  # one heatmap per query
    assert view.numbers["cls"] == pytest.approx(0.25) and "all queries" in view.text
    assert 0.9 < view.numbers["entropy"] <= 1.0  # near-uniform random maps
    for bad, match in [(dict(layer=2), "layer"), (dict(query=4), "query"), (dict(image=-4), "image")]:
        with pytest.raises(ValueError, match=match):
            abstractor_view(_maps(), **bad)


def test_picker_updates_from_its_controls():
    picker = abstractor_picker(_maps(), summary=_summary())
    assert isinstance(picker.widget, w.VBox) and picker.layer.value == 1 and picker.view.query is None
    assert "application/vnd.plotly.v1+json" in picker.output.outputs[0]["data"]
    picker.image.value = 2
    picker.query.value = 3  # each control change re-runs the callback
    assert (picker.view.image, picker.view.query) == (2, 3) and picker.view.numbers["peak_cell"] == (0, 2)
    assert "query 3" in picker.text.value
    picker.layer.value = 0
    assert picker.view.layer == 0 and picker.view.numbers["peak_lift"] < 3
