"""Figures for notebook 16: pixel maps laid over the image, and how much of each map lands on the object."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from owl_lab.viz.figures import TEXT, VISUAL


def _grid(m) -> np.ndarray:
    arr = np.asarray(m.detach().float() if hasattr(m, "detach") else m, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"a pixel map must be 2-D [grid_h, grid_w]; got shape {arr.shape}.")
    return arr


def _png_source(rgb: np.ndarray) -> str:
    """A PNG data URI of an RGB array: a few kB in the figure instead of one JSON number per pixel."""
    import base64
    import io

    from PIL import Image

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
        z = np.clip(_grid(m), 0, None)
        z = z / z.max() if z.max() > 0 else z
        gh, gw = z.shape
        fig.add_trace(go.Image(source=source), row=1, col=col)
        fig.add_trace(
            go.Heatmap(
                z=z,
                x0=w / gw / 2,
                dx=w / gw,
                y0=h / gh / 2,
                dy=h / gh,
                zmin=0,
                zmax=1,
                colorscale="Inferno",
                opacity=opacity,
                showscale=col == 2,
                colorbar_title="share of max",
                name=name,
            ),
            row=1,
            col=col,
        )
    if cover is not None:
        c = _grid(cover)
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


# ------------------------------------------------------------------------------- the picker
@dataclass
class PixelView:
    """What :func:`answer_pixels_view` returns: the figure, the numbers and one printable line."""

    question: str
    token: str
    numbers: dict
    figure: go.Figure

    @property
    def text(self) -> str:
        nums = ", ".join(f"{k}={v:.3f}" for k, v in self.numbers.items())
        return f"{self.question!r} → {self.token!r}: {nums}"


def answer_pixels_view(
    model, processor, example, *, token: int = 0, layer="all", occlusion: bool = True
) -> PixelView:
    """Maps of one answer token of one question over its (first) image, with their object shares.

    Args:
        token: answer-token index (0 = the first; the end-of-answer token is last).
        layer: ``"all"`` (mean over the decoder layers) or one decoder layer of the path.
        occlusion: also compute the occlusion map (a batched forward per image, ~0.3 s on a tiny model).

    Numbers: per map, the share of its weight on the asked-about object; ``chance`` its area share.
    """
    from owl_lab.analysis.occlusion import asked_object, object_cover, object_share, occlusion_map
    from owl_lab.analysis.pixels import answer_to_pixels

    path = answer_to_pixels(model, processor, example, tokens="all")
    if not -len(path.tokens) <= int(token) < len(path.tokens):
        raise ValueError(f"token must be in [0, {len(path.tokens)}); got {token}")
    if layer == "all":
        maps = {k: v[token, 0] for k, v in path.maps.items()}
    elif layer in path.layers:
        maps = {k: v[path.layers.index(layer), token, 0] for k, v in path.per_layer.items()}
    else:
        raise ValueError(f"layer must be 'all' or one of {path.layers}; got {layer!r}")
    if occlusion:
        maps["occlusion"] = occlusion_map(
            model, processor, example, tokens=[token], perturbations_per_eval=64
        )[0]
    obj = asked_object(example)
    cover = None if obj is None else object_cover(obj, tuple(maps["composed"].shape))
    numbers = {} if cover is None else {k: object_share(v, cover) for k, v in maps.items()}
    if cover is not None:
        numbers["chance"] = float(cover.mean())
    tok = path.tokens[token]
    fig = pixel_overlay_figure(
        example.images[0],
        maps,
        cover=cover,
        title=f"{example.text!r} → {tok!r} (layer {layer}); cyan: the asked-about object",
    )
    return PixelView(example.text, tok, numbers, fig)


class AnswerPixelPicker:
    """Model / question / token / layer controls over :func:`answer_pixels_view`; ``widget`` is the box.
    ``update()`` re-renders from the controls (tests call it; control changes call it too)."""

    def __init__(self, models: dict, examples: list, occlusion: bool = True):
        import ipywidgets as w

        if not models or not examples:
            raise ValueError("the picker needs at least one model and one example")
        self.models, self.examples, self.occlusion = models, examples, occlusion
        self.model = w.Dropdown(options=list(models), description="model")
        self.question = w.Dropdown(
            options=[
                (f"{i}: {e.text.replace('<|image|>', '')} ({e.answer})", i) for i, e in enumerate(examples)
            ],
            value=0,
            description="question",
        )
        self.token = w.IntSlider(value=0, min=0, max=4, description="answer token", continuous_update=False)
        self.layer = w.Dropdown(options=["all"], value="all", description="layer")
        self.text = w.HTML()
        self.output = w.Output()
        self.view: PixelView | None = None
        self._sync()
        for c in (self.model, self.question, self.token, self.layer):
            c.observe(lambda _change: self.update(), names="value")
        self.widget = w.VBox(
            [w.HBox([self.model, self.question]), w.HBox([self.token, self.layer]), self.text, self.output]
        )

    def _sync(self) -> None:
        """Bound the token slider by the answer's length and the layer menu by the model's path layers."""
        model, processor = self.models[self.model.value]
        ex = self.examples[self.question.value]
        n_tokens = len(processor.tokenizer(ex.answer, add_special_tokens=False).input_ids) + 1  # + end token
        self.token.max = n_tokens - 1
        from owl_lab.families import family_of

        options = ["all", *family_of(model).image_layers(model.config)]
        if list(self.layer.options) != options:
            self.layer.options = options
            self.layer.value = "all"

    def update(self) -> PixelView:
        from owl_lab.widgets import figure_output

        self._sync()
        model, processor = self.models[self.model.value]
        self.view = answer_pixels_view(
            model,
            processor,
            self.examples[self.question.value],
            token=self.token.value,
            layer=self.layer.value,
            occlusion=self.occlusion,
        )
        self.text.value = f"<code>{self.view.text}</code>"
        self.output.outputs = (figure_output(self.view.figure),)
        return self.view


def answer_pixel_picker(models: dict, examples: list, occlusion: bool = True) -> AnswerPixelPicker:
    """Build the picker (``models``: name → (model, processor)) and render its first view."""
    picker = AnswerPixelPicker(models, examples, occlusion)
    picker.update()
    return picker


__all__ = [
    "AnswerPixelPicker",
    "PixelView",
    "answer_pixel_picker",
    "answer_pixels_view",
    "object_hit_figure",
    "pixel_overlay_figure",
]
