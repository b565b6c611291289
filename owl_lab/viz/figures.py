"""Figures: attention mass across layers, abstractor query maps, gates, ablation curves.

Colours follow the Owl2 paper's convention: visual = orange, text = blue.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

VISUAL, TEXT = "#f28e2b", "#4e79a7"
GROUP_COLORS = {
    "visual": VISUAL,
    "text": TEXT,
    "bos": "#76b7b2",
    "question": TEXT,
    "generated": "#59a14f",
    "placeholder": "#b07aa1",
    "pad": "#bab0ac",
}


def _color(group: str, i: int) -> str:
    if group.startswith("image:"):
        palette = ["#f28e2b", "#e15759", "#edc948", "#ff9da7", "#9c755f", "#d37295"]
        return palette[int(group.split(":")[1]) % len(palette)]
    return GROUP_COLORS.get(group, ["#4e79a7", "#59a14f", "#76b7b2", "#af7aa1"][i % 4])


def _error_bars(se) -> dict | None:
    """Plotly error bars of ±2 SE (the lab's "beyond noise" width); None when there is no SE."""
    if se is None:
        return None
    return dict(type="data", array=[2 * float(v) for v in se], visible=True, thickness=1.2, width=3)


def layer_mass_figure(
    tables: dict[str, pd.DataFrame] | pd.DataFrame,
    *,
    title: str = "",
    yaxis: str = "mean attention mass",
    errors: dict[str, pd.DataFrame] | pd.DataFrame | None = None,
) -> go.Figure:
    """Lines of mass per layer, one per group; several tables (e.g. w/ and w/o MAM) side by side.

    Args:
        tables: a [layers × groups] table from :func:`owl_lab.analysis.layer_mass`, or a dict
            ``{panel title: table}``.
        errors: standard errors of the same shape (and the same dict keys); drawn as ±2 SE bars.
    """
    if isinstance(tables, pd.DataFrame):
        tables = {"": tables}
    if isinstance(errors, pd.DataFrame):
        errors = {"": errors}
    if errors is not None and set(errors) != set(tables):
        raise ValueError(f"errors must have the same panels as tables: {sorted(tables)} vs {sorted(errors)}")
    fig = make_subplots(rows=1, cols=len(tables), subplot_titles=list(tables), shared_yaxes=True)
    for col, (panel, table) in enumerate(tables.items(), start=1):
        for i, group in enumerate(table.columns):
            se = None if errors is None else errors[panel].reindex(index=table.index)[group]
            fig.add_trace(
                go.Scatter(
                    x=table.index,
                    y=table[group],
                    name=str(group),
                    mode="lines+markers",
                    line=dict(color=_color(str(group), i)),
                    legendgroup=str(group),
                    showlegend=col == 1,
                    error_y=_error_bars(se),
                ),
                row=1,
                col=col,
            )
        fig.update_xaxes(title_text="layer", dtick=1, row=1, col=col)
    fig.update_yaxes(title_text=yaxis, range=[0, 1], row=1, col=1)
    fig.update_layout(
        title=title + (" (bars: ±2 SE)" if errors is not None else ""),
        template="plotly_white",
        height=380,
        legend_title="group",
    )
    return fig


def query_mass_figure(table: pd.DataFrame, *, title: str = "") -> go.Figure:
    """Stacked bars of group mass for each query position (from :func:`analysis.query_mass`)."""
    fig = go.Figure()
    for i, (group, rows) in enumerate(table.groupby("group", sort=False)):
        fig.add_trace(go.Bar(x=rows["query"], y=rows["mass"], name=group, marker_color=_color(group, i)))
    fig.update_layout(
        barmode="stack",
        title=title,
        template="plotly_white",
        height=340,
        xaxis_title="query position",
        yaxis_title="attention mass (mean over heads)",
    )
    return fig


def abstractor_map_figure(
    maps, *, image=None, layer: int = -1, batch: int = 0, queries=None, cols: int = 4, title: str = ""
) -> go.Figure:
    """Each abstractor query's attention over the patch grid (mean over heads).

    Args:
        maps: tensor/array [abstractor_layer, batch, head, query, grid_h, grid_w] (``rec.abstractor_maps``).
        image: optional PIL image shown as the first panel.
        queries: which queries to draw (default all).
    """
    arr = np.asarray(
        maps[layer, batch].float().mean(0) if hasattr(maps, "float") else np.mean(maps[layer, batch], 0)
    )
    queries = list(range(arr.shape[0])) if queries is None else list(queries)
    panels = (["image"] if image is not None else []) + [f"query {q}" for q in queries]
    rows = -(-len(panels) // cols)
    fig = make_subplots(
        rows=rows, cols=cols, subplot_titles=panels, horizontal_spacing=0.02, vertical_spacing=0.08
    )
    offset = 0
    if image is not None:
        fig.add_trace(go.Image(z=np.asarray(image.convert("RGB"))), row=1, col=1)
        offset = 1
    vmax = float(arr[queries].max()) if queries else 1.0
    for n, q in enumerate(queries):
        r, c = divmod(n + offset, cols)
        fig.add_trace(
            go.Heatmap(z=arr[q], zmin=0, zmax=vmax, colorscale="Oranges", showscale=n == 0),
            row=r + 1,
            col=c + 1,
        )
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    fig.update_layout(title=title, template="plotly_white", height=200 * rows + 60)
    return fig


def gate_heatmap_figure(
    gates: pd.DataFrame,
    *,
    layer: int,
    batch: int = 0,
    step: int = 0,
    token_labels: list[str] | None = None,
    title: str = "",
) -> go.Figure:
    """Gate value (mean over channels) per query token × head for one hyper layer."""
    rows = gates[(gates["layer"] == layer) & (gates["batch"] == batch) & (gates["step"] == step)]
    grid = rows.pivot_table(index="head", columns="query", values="gate")
    x = token_labels if token_labels is not None and len(token_labels) == grid.shape[1] else grid.columns
    fig = go.Figure(
        go.Heatmap(
            z=grid.values,
            x=list(x),
            y=[f"head {h}" for h in grid.index],
            zmin=0,
            zmax=1,
            colorscale="Oranges",
            colorbar_title="g",
        )
    )
    fig.update_layout(
        title=title or f"gate (mean over channels), layer {layer}",
        template="plotly_white",
        height=120 + 40 * grid.shape[0],
        xaxis_title="query token",
    )
    return fig


def curve_figure(
    x,
    series: dict[str, list[float]],
    *,
    title: str = "",
    xaxis: str = "",
    yaxis: str = "accuracy",
    log_x: bool = False,
    errors: dict[str, list[float]] | None = None,
) -> go.Figure:
    """One line per named series over a shared x (e.g. accuracy vs number of images).

    ``errors`` maps a series name to its standard errors (same length), drawn as ±2 SE bars;
    series without an entry (e.g. a chance line) get none.
    """
    errors = errors or {}
    unknown = set(errors) - set(series)
    if unknown:
        raise ValueError(f"errors for unknown series: {sorted(unknown)}")
    fig = go.Figure()
    for name, ys in series.items():
        fig.add_trace(
            go.Scatter(
                x=list(x), y=list(ys), name=name, mode="lines+markers", error_y=_error_bars(errors.get(name))
            )
        )
    fig.update_layout(
        title=title + (" (bars: ±2 SE)" if errors else ""),
        template="plotly_white",
        height=360,
        xaxis_title=xaxis,
        yaxis_title=yaxis,
    )
    if log_x:
        fig.update_xaxes(type="log")
    return fig


def bar_compare_figure(
    table: pd.DataFrame, *, title: str = "", yaxis: str = "", errors: pd.DataFrame | None = None
) -> go.Figure:
    """Grouped bars: rows = variants (x), columns = metrics (one bar colour each).

    ``errors``: standard errors with the same index and columns, drawn as ±2 SE bars.
    """
    same = errors is None or (
        list(errors.index) == list(table.index) and list(errors.columns) == list(table.columns)
    )
    if not same:
        raise ValueError("errors must have the same index and columns as table")
    fig = go.Figure()
    for column in table.columns:
        se = None if errors is None else errors[column]
        fig.add_trace(
            go.Bar(
                x=[str(i) for i in table.index], y=table[column], name=str(column), error_y=_error_bars(se)
            )
        )
    fig.update_layout(
        barmode="group",
        title=title + (" (bars: ±2 SE)" if errors is not None else ""),
        template="plotly_white",
        height=360,
        yaxis_title=yaxis,
    )
    return fig
