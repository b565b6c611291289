"""Plotly figures for the lab. Every function returns a ``plotly.graph_objects.Figure``."""

from owl_lab.viz.figures import (
    abstractor_map_figure,
    bar_compare_figure,
    curve_figure,
    gate_heatmap_figure,
    layer_mass_figure,
    query_mass_figure,
)

__all__ = [
    "abstractor_map_figure",
    "bar_compare_figure",
    "curve_figure",
    "gate_heatmap_figure",
    "layer_mass_figure",
    "query_mass_figure",
]
