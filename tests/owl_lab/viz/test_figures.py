"""owl_lab.viz builds figures whose data are the numbers given (no silent reshaping)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from owl_lab import viz


def test_layer_mass_figure_has_one_trace_per_group_and_panel():
    table = pd.DataFrame({"text": [0.7, 0.4], "visual": [0.3, 0.6]}, index=pd.Index([0, 1], name="layer"))
    fig = viz.layer_mass_figure({"w/ MAM": table, "w/o MAM": table})
    assert len(fig.data) == 4
    np.testing.assert_allclose(fig.data[1].y, [0.3, 0.6])


def test_abstractor_map_figure_averages_heads():
    maps = torch.zeros(1, 1, 2, 1, 2, 2)
    maps[0, 0, 0, 0, 0, 0] = 1.0  # head 0 puts all mass on the top-left patch
    fig = viz.abstractor_map_figure(maps)
    np.testing.assert_allclose(np.asarray(fig.data[0].z), [[0.5, 0.0], [0.0, 0.0]])


def test_gate_heatmap_pivots_head_by_query():
    gates = pd.DataFrame(
        dict(batch=0, step=0, layer=2, query=[5, 6, 5, 6], head=[0, 0, 1, 1], gate=[0.1, 0.2, 0.3, 0.4])
    )
    fig = viz.gate_heatmap_figure(gates, layer=2)
    np.testing.assert_allclose(np.asarray(fig.data[0].z), [[0.1, 0.2], [0.3, 0.4]])


def test_figures_draw_two_standard_errors_as_error_bars():
    import pytest

    table = pd.DataFrame({"text": [0.7, 0.4], "visual": [0.3, 0.6]}, index=pd.Index([0, 1], name="layer"))
    se = pd.DataFrame({"text": [0.01, 0.02], "visual": [0.03, 0.04]}, index=table.index)
    fig = viz.layer_mass_figure({"a": table}, errors={"a": se})
    np.testing.assert_allclose(fig.data[1].error_y.array, [0.06, 0.08])
    fig = viz.curve_figure([1, 2], {"acc": [50, 60], "chance": [10, 10]}, errors={"acc": [1.0, 2.0]})
    np.testing.assert_allclose(fig.data[0].error_y.array, [2.0, 4.0])
    assert fig.data[1].error_y.array is None
    fig = viz.bar_compare_figure(table, errors=se)
    np.testing.assert_allclose(fig.data[0].error_y.array, [0.02, 0.04])
    with pytest.raises(ValueError):
        viz.bar_compare_figure(table, errors=se.T)
    with pytest.raises(ValueError):
        viz.curve_figure([1, 2], {"acc": [50, 60]}, errors={"other": [1.0, 2.0]})
