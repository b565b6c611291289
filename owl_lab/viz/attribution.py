"""Figures for notebook 11: patch maps laid over the image, and per-token attention next to attribution."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from owl_lab.viz.figures import TEXT, VISUAL
from owl_lab.viz.overlay import heatmap_over_image, patch_grid


def patch_attribution_figure(image, maps: dict, *, opacity: float = 0.6, title: str = "") -> go.Figure:
    """The image, then each patch map [grid_h, grid_w] drawn over it (one panel per map).

    Each map is scaled to its own maximum (|values|), so panels compare *where*, not *how much*.
    The grid cells are stretched over the full image, matching how the patch conv tiles it.
    """
    rgb = np.asarray(image.convert("RGB"))
    h, w = rgb.shape[:2]
    fig = make_subplots(rows=1, cols=1 + len(maps), subplot_titles=["image", *maps], horizontal_spacing=0.03)
    fig.add_trace(go.Image(z=rgb), row=1, col=1)
    for col, (name, m) in enumerate(maps.items(), start=2):
        z = np.abs(patch_grid(m))
        z = z / z.max() if z.max() > 0 else z
        fig.add_trace(go.Image(z=rgb), row=1, col=col)
        fig.add_trace(
            heatmap_over_image(z, w, h, opacity=opacity, show_scale=col == 2, name=name), row=1, col=col
        )
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False, autorange="reversed")
    fig.update_layout(title=title, template="plotly_white", height=320, width=260 * (1 + len(maps)))
    return fig


def token_attribution_figure(table: pd.DataFrame, *, title: str = "") -> go.Figure:
    """Grouped bars per prompt token: attention and |attribution|, each normalised to sum to 1.

    Args:
        table: ``TokenComparison.table`` (columns token, attention, attribution, ...).
    """
    labels = [f"{i}:{t}" for i, t in zip(table["position"], table["token"], strict=True)]
    fig = go.Figure()
    for column, color in (("attention", VISUAL), ("attribution", TEXT)):
        v = table[column].abs().to_numpy(dtype=np.float64)
        fig.add_trace(go.Bar(x=labels, y=v / v.sum() if v.sum() > 0 else v, name=column, marker_color=color))
    fig.update_layout(
        barmode="group",
        title=title,
        template="plotly_white",
        height=340,
        yaxis_title="share (normalised per series)",
        xaxis_tickangle=-45,
    )
    return fig


__all__ = ["patch_attribution_figure", "token_attribution_figure"]
