"""Notebook 16's interactive picker: model / question / answer token / layer → maps over the image.

``answer_pixels_view`` is the callback (a plain function tests call); ``AnswerPixelPicker`` wires
ipywidgets controls to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import plotly.graph_objects as go

from owl_lab.analysis.occlusion import asked_object, object_cover, object_share, occlusion_map
from owl_lab.analysis.pixels import answer_to_pixels
from owl_lab.families import family_of
from owl_lab.viz.display import figure_output
from owl_lab.viz.pixels import pixel_overlay_figure


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
    model, processor, example, *, token: int = 0, layer="all", occlusion: bool = True, kinds=None
) -> PixelView:
    """Maps of one answer token of one question over its (first) image, with their object shares.

    Args:
        token: answer-token index (0 = the first; the end-of-answer token is last).
        layer: ``"all"`` (mean over the decoder layers) or one decoder layer of the path.
        occlusion: also compute the occlusion map (a batched forward per image, ~0.3 s on a tiny model).
        kinds: path maps to show and score (``raw`` / ``composed`` / ``rollout``); None = all of them.

    Numbers: per map, the share of its weight on the asked-about object; ``chance`` its area share.
    """
    path = answer_to_pixels(model, processor, example, tokens="all")
    if not -len(path.tokens) <= int(token) < len(path.tokens):
        raise ValueError(f"token must be in [0, {len(path.tokens)}); got {token}")
    if layer == "all":
        maps = {k: v[token, 0] for k, v in path.maps.items()}
    elif layer in path.layers:
        maps = {k: v[path.layers.index(layer), token, 0] for k, v in path.per_layer.items()}
    else:
        raise ValueError(f"layer must be 'all' or one of {path.layers}; got {layer!r}")
    if kinds is not None:
        unknown = sorted(set(kinds) - set(maps))
        if unknown or not kinds:
            raise ValueError(f"kinds must be a non-empty subset of {sorted(maps)}; got {list(kinds)}")
        maps = {k: maps[k] for k in kinds}
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
        options = ["all", *family_of(model).image_layers(model.config)]
        if list(self.layer.options) != options:
            self.layer.options = options
            self.layer.value = "all"

    def update(self) -> PixelView:
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


__all__ = ["AnswerPixelPicker", "PixelView", "answer_pixel_picker", "answer_pixels_view"]
