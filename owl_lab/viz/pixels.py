"""Figures for notebook 16: pixel maps laid over the image, and how much of each map lands on the object."""

from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from PIL import Image
from plotly.subplots import make_subplots

from owl_lab.viz.figures import TEXT, VISUAL
from owl_lab.viz.overlay import heatmap_over_image, patch_grid


def _png_source(rgb: np.ndarray) -> str:
    """A PNG data URI of an RGB array: a few kB in the figure instead of one JSON number per pixel."""
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def pixel_overlay_figure(
    image, maps: dict, *, cover=None, opacity: float = 0.55, title: str = ""
) -> go.Figure:
    """The image, then each map [grid_h, grid_w] over it, scaled to its own positive maximum.

    Args:
        image: PIL image the maps belong to.
        maps: name → patch-grid map (negative values are drawn as 0).
        cover: optional [grid_h, grid_w] object cover (:func:`owl_lab.analysis.occlusion.object_cover`);
            cells the object touches are outlined in every panel.
    """
    rgb = np.asarray(image.convert("RGB"))
    h, w = rgb.shape[:2]
    fig = make_subplots(rows=1, cols=1 + len(maps), subplot_titles=["image", *maps], horizontal_spacing=0.03)
    source = _png_source(rgb)
    fig.add_trace(go.Image(source=source), row=1, col=1)
    for col, (name, m) in enumerate(maps.items(), start=2):
        z = np.clip(patch_grid(m), 0, None)
        z = z / z.max() if z.max() > 0 else z
        fig.add_trace(go.Image(source=source), row=1, col=col)
        fig.add_trace(
            heatmap_over_image(z, w, h, opacity=opacity, show_scale=col == 2, name=name), row=1, col=col
        )
    if cover is not None:
        c = patch_grid(cover)
        gh, gw = c.shape
        for r, k in zip(*np.nonzero(c > 0), strict=True):
            for col in range(1, 2 + len(maps)):
                fig.add_shape(
                    type="rect",
                    x0=k * w / gw,
                    x1=(k + 1) * w / gw,
                    y0=r * h / gh,
                    y1=(r + 1) * h / gh,
                    line=dict(color="cyan", width=1),
                    row=1,
                    col=col,
                )
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False, autorange="reversed")
    fig.update_layout(title=title, template="plotly_white", height=300, width=240 * (1 + len(maps)))
    return fig


def object_hit_figure(summary: pd.DataFrame, *, title: str = "") -> go.Figure:
    """Bars: share of each map's weight on the asked-about object (± SE), per model, with chance.

    Args:
        summary: columns model, map, share, share_se, chance (one row per model × map).
    """
    models = list(dict.fromkeys(summary["model"]))
    fig = go.Figure()
    for i, model in enumerate(models):
        rows = summary[summary["model"] == model]
        fig.add_trace(
            go.Bar(
                x=rows["map"],
                y=rows["share"],
                name=model,
                marker_color=[VISUAL, TEXT][i % 2],
                error_y=dict(type="data", array=2 * rows["share_se"].to_numpy()),
            )
        )
        fig.add_trace(
            go.Scatter(
                x=rows["map"],
                y=rows["chance"],
                mode="markers",
                name=f"{model} chance (area)",
                marker=dict(symbol="line-ew-open", size=28, color="black"),
            )
        )
    fig.update_layout(
        barmode="group",
        template="plotly_white",
        height=360,
        title=title,
        yaxis_title="share of map weight on the object (±2 SE)",
    )
    return fig


__all__ = ["object_hit_figure", "pixel_overlay_figure"]
