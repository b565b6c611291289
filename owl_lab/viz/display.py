"""Plotly figures as notebook display data, for ipywidgets ``Output`` widgets updated without a frontend."""

from __future__ import annotations

import plotly.graph_objects as go


def figure_output(fig: go.Figure) -> dict:
    """A notebook display-data output for a plotly figure (plotly mimetype + static HTML fallback)."""
    return {
        "output_type": "display_data",
        "metadata": {},
        "data": {
            "application/vnd.plotly.v1+json": fig.to_plotly_json(),
            "text/html": fig.to_html(full_html=False, include_plotlyjs="cdn"),
            "text/plain": f"<plotly figure: {fig.layout.title.text or ''}>",
        },
    }


__all__ = ["figure_output"]
