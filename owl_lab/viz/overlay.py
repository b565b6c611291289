"""Shared pieces of the patch-map-over-image figures (attribution and answer → pixels)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go


def patch_grid(m) -> np.ndarray:
    """A patch map (tensor or array) as float64 [grid_h, grid_w]; ValueError for any other rank."""
    arr = np.asarray(m.detach().float() if hasattr(m, "detach") else m, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"a patch map must be 2-D [grid_h, grid_w]; got shape {arr.shape}.")
    return arr


def heatmap_over_image(
    z: np.ndarray, width: int, height: int, *, opacity: float, show_scale: bool, name: str
) -> go.Heatmap:
    """A [grid_h, grid_w] map in [0, 1] stretched over a ``width`` × ``height`` image (cell centres on
    the patch centres), Inferno, "share of max" colour bar."""
    gh, gw = z.shape
    return go.Heatmap(
        z=z,
        x0=width / gw / 2,
        dx=width / gw,
        y0=height / gh / 2,
        dy=height / gh,
        zmin=0,
        zmax=1,
        colorscale="Inferno",
        opacity=opacity,
        showscale=show_scale,
        colorbar_title="share of max",
        name=name,
    )
