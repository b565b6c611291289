"""Interactive look at the Owl2 abstractor's query → patch maps (notebook 07).

The widget's callback is the plain function :func:`abstractor_view`, so tests and nbval call it
directly; :func:`abstractor_picker` only wires ipywidgets controls (layer, query, image) to it and
renders its figure as display data (no FigureWidget, no frontend needed to build or update it)::

    view = abstractor_view(rec.abstractor_maps, layer=1, query=3, image=0, images=pil_images)
    print(view.text); view.figure
    picker = abstractor_picker(rec.abstractor_maps, images=pil_images, summary=rec.abstractor_summary)
    display(picker.widget)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from owl_lab.analysis.abstractor import query_map_stats
from owl_lab.viz.display import figure_output
from owl_lab.viz.figures import abstractor_map_figure


@dataclass
class AbstractorView:
    """What :func:`abstractor_view` returns: a figure, its numbers and one printable line."""

    layer: int
    query: int | None
    image: int
    numbers: dict
    figure: go.Figure

    @property
    def text(self) -> str:
        who = "all queries" if self.query is None else f"query {self.query}"
        nums = ", ".join(
            f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in self.numbers.items()
        )
        return f"abstractor layer {self.layer}, image {self.image}, {who}: {nums}"


def _index(value: int, size: int, name: str) -> int:
    if not -size <= int(value) < size:
        raise ValueError(f"{name} must be in [0, {size}) (or negative from the end); got {value}")
    return int(value) % size


def abstractor_view(
    maps, *, layer: int = -1, query: int | None = None, image: int = 0, images=None, summary=None, scenes=None
) -> AbstractorView:
    """Figure + numbers for one abstractor layer and image: all queries, or one query and its heads.

    Args:
        maps: [abstractor_layer, image, head, query, grid_h, grid_w] (``rec.abstractor_maps``).
        layer, image: indices (negative counts from the end); query: an index or None = all queries.
        images: optional PIL images (in ``maps`` order), drawn beside the maps.
        summary: optional ``rec.abstractor_summary`` (adds the CLS and query-to-query shares).
        scenes: optional scenes (in ``maps`` order), to say whether the peak cell holds an object.

    Numbers (means over heads; for "all queries" also over queries): ``patch_share``, ``entropy``
    (1 = uniform), ``peak_lift`` (1 = uniform) and, for one query, its ``peak_cell`` (row, col) and
    centre of mass; with ``summary`` the ``cls`` and ``queries`` shares.
    """
    A, N, H, Q = maps.shape[:4]
    layer, image = _index(layer, A, "layer"), _index(image, N, "image")
    q = None if query is None else _index(query, Q, "query")
    one = maps[layer : layer + 1, image : image + 1]  # [1, 1, H, Q, gh, gw]
    sc = None if scenes is None else [scenes[image]]
    stats = query_map_stats(one, sc)
    rows = stats if q is None else stats[stats["query"] == q]
    numbers = {
        "patch_share": float(rows["patch_share"].mean()),
        "entropy": float(rows["entropy"].mean()),
        "peak_lift": float(rows["peak_lift"].mean()),
    }
    if summary is not None:
        s = summary[(summary["abstractor_layer"] == layer) & (summary["image"] == image)]
        if q is not None:
            s = s[s["query"] == q]
        numbers |= {"cls": float(s["cls"].mean()), "queries": float(s["queries"].mean())}
    pil = None if images is None else images[image]
    if q is None:
        fig = abstractor_map_figure(
            maps,
            image=pil,
            layer=layer,
            batch=image,
            title=f"abstractor layer {layer}, image {image}: every query (mean over heads)",
        )
        return AbstractorView(layer, None, image, numbers, fig)

    r = rows.iloc[0]
    numbers |= {
        "peak_cell": (int(r["peak_row"]), int(r["peak_col"])),
        "com": (round(float(r["com_row"]), 3), round(float(r["com_col"]), 3)),
    }
    if sc is not None:
        numbers["peak_has_object"] = bool(r["occupied"])
    per_head = np.asarray(one[0, 0, :, q].float())  # [H, gh, gw]
    panels = (["image"] if pil is not None else []) + ["mean over heads"] + [f"head {h}" for h in range(H)]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=panels, horizontal_spacing=0.02)
    col = 1
    if pil is not None:
        fig.add_trace(go.Image(z=np.asarray(pil.convert("RGB"))), row=1, col=1)
        col = 2
    vmax = float(per_head.max()) or 1.0
    for k, z in enumerate([per_head.mean(0), *per_head]):
        fig.add_trace(
            go.Heatmap(z=z, zmin=0, zmax=vmax, colorscale="Oranges", showscale=k == 0), row=1, col=col + k
        )
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    fig.update_layout(
        title=f"abstractor layer {layer}, image {image}, query {q}", template="plotly_white", height=260
    )
    return AbstractorView(layer, q, image, numbers, fig)


class AbstractorPicker:
    """Layer / query / image controls over :func:`abstractor_view`; ``widget`` is the box to display.
    ``update()`` re-renders from the controls (tests call it; control changes call it too)."""

    def __init__(self, maps, images=None, summary=None, scenes=None, layer: int = -1):
        import ipywidgets as w

        self.maps, self.images, self.summary, self.scenes = maps, images, summary, scenes
        A, N, _, Q = maps.shape[:4]
        self.layer = w.IntSlider(
            value=_index(layer, A, "layer"), min=0, max=A - 1, description="layer", continuous_update=False
        )
        self.query = w.Dropdown(
            options=[("all", None)] + [(str(q), q) for q in range(Q)], value=None, description="query"
        )
        self.image = w.IntSlider(value=0, min=0, max=N - 1, description="image", continuous_update=False)
        self.text = w.HTML()
        self.output = w.Output()
        self.view: AbstractorView | None = None
        for c in (self.layer, self.query, self.image):
            c.observe(lambda _change: self.update(), names="value")
        self.widget = w.VBox([w.HBox([self.layer, self.query, self.image]), self.text, self.output])

    def update(self) -> AbstractorView:
        self.view = abstractor_view(
            self.maps,
            layer=self.layer.value,
            query=self.query.value,
            image=self.image.value,
            images=self.images,
            summary=self.summary,
            scenes=self.scenes,
        )
        self.text.value = f"<code>{self.view.text}</code>"
        self.output.outputs = (figure_output(self.view.figure),)
        return self.view


def abstractor_picker(maps, images=None, summary=None, scenes=None, layer: int = -1) -> AbstractorPicker:
    """Build the picker and render its first view (``display(picker.widget)`` in a notebook)."""
    picker = AbstractorPicker(maps, images, summary, scenes, layer)
    picker.update()
    return picker


__all__ = ["AbstractorView", "AbstractorPicker", "abstractor_view", "abstractor_picker"]
