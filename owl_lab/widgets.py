"""The notebook-12 explorer as ipywidgets: a thin shell over :func:`owl_lab.explorer.explore`.

``explorer_app()`` wires controls (model dropdown of the shipped checkpoints plus a free path, task,
scene, layer, head, ...) to an :class:`~owl_lab.explorer.ExplorerState` and renders ``explore``'s
figures into Output widgets as plain display data (no FigureWidget, so no frontend is needed to build
or update it). The engine's names are re-exported here for notebooks written against this module.
"""

from __future__ import annotations

from owl_lab.explorer import (
    DEFAULT_CACHE,
    PIXEL_MAPS,
    ExplorerState,
    ExplorerView,
    ModelCache,
    decoder_shape,
    example,
    explore,
    sequence_labels,
)
from owl_lab.model_picker import model_picker
from owl_lab.synth import ALL_TASKS
from owl_lab.viz.display import figure_output
from owl_lab.zoo import list_checkpoints

#: the head dropdown's value for "mean over heads" ("mean" is a real value: a Dropdown whose value is
#: None shows no selection at all)
HEAD_MEAN = "mean"


class ExplorerApp:
    """Controls + outputs. ``state()`` reads the controls, ``update()`` runs :func:`explore` and
    renders; tests drive both directly. ``widget`` is the ipywidgets box to display."""

    def __init__(self, model: str | None = None, cache: ModelCache | None = None):
        import ipywidgets as w

        self.cache = cache if cache is not None else DEFAULT_CACHE
        names = list_checkpoints()
        self.model = model_picker(str(model or (names[0] if names else "")), names)
        self.task = w.Dropdown(options=sorted(ALL_TASKS), value="color", description="task")
        self.scene = w.BoundedIntText(value=0, min=0, max=9999, description="scene")
        self.seed = w.BoundedIntText(value=0, min=0, max=10**6, description="seed")
        self.prompt = w.Text(value="", description="prompt", placeholder="(the example's question)")
        self.layer = w.IntSlider(value=0, min=0, max=0, description="layer", continuous_update=False)
        # "mean" is a real value: a Dropdown whose value is None shows no selection at all.
        self.head = w.Dropdown(options=[("mean", HEAD_MEAN)], value=HEAD_MEAN, description="head")
        self.head.observe(self._head_none_to_mean, names="value")  # before _changed (observer order)
        self.token = w.IntText(value=-1, description="token", tooltip="-1 = last prompt position")
        self.answer_token = w.IntText(value=0, description="answer token", tooltip="pixels panel; -1 = end")
        self.pixel_map = w.Dropdown(options=PIXEL_MAPS, value="composed", description="pixel map")
        self.text = w.HTML()
        self.outputs = {
            k: w.Output()
            for k in ("image", "layer_mass", "token_mass", "token_keys", "abstractor", "gates", "pixels")
        }
        self.view: ExplorerView | None = None
        self._busy = False  # control changes made by update() itself must not re-enter it
        controls = [
            self.model,
            self.task,
            self.scene,
            self.seed,
            self.prompt,
            self.layer,
            self.head,
            self.token,
            self.answer_token,
            self.pixel_map,
        ]
        for c in controls:
            c.observe(self._changed, names="value")
        rows = [w.HBox(controls[:5]), w.HBox(controls[5:8]), w.HBox(controls[8:])]
        self.widget = w.VBox([*rows, self.text, *self.outputs.values()])
        if self.model.value:  # fill the layer range and head choice on load, before the first render
            self._busy = True  # (no update() from the range changes themselves)
            try:
                self._sync_model_controls()
            except (ValueError, FileNotFoundError, KeyError):
                pass  # update() shows the error
            finally:
                self._busy = False

    def state(self) -> ExplorerState:
        return ExplorerState(
            model=self.model.value,
            task=self.task.value,
            scene=int(self.scene.value),
            seed=int(self.seed.value),
            prompt=self.prompt.value,
            layer=int(self.layer.value),
            head=None if self.head.value in (None, HEAD_MEAN) else int(self.head.value),
            token=None if self.token.value < 0 else int(self.token.value),
            answer_token=int(self.answer_token.value),
            pixel_map=self.pixel_map.value,
        )

    def _sync_model_controls(self) -> None:
        """Layer/head ranges follow the loaded model's config."""
        model, _ = self.cache.get(self.model.value)
        n_layers, n_heads = decoder_shape(model)
        self.layer.max = n_layers - 1
        options = [("mean", HEAD_MEAN)] + [(str(h), h) for h in range(n_heads)]
        if list(self.head.options) != options:
            keep = self.head.value if self.head.value in range(n_heads) else HEAD_MEAN
            self.head.options = options
            self.head.value = keep

    def _head_none_to_mean(self, change) -> None:
        if change["new"] is None:  # `app.head.value = None` (mean) shows as "mean", not as no selection
            self.head.value = HEAD_MEAN

    def update(self) -> ExplorerView | None:
        """Read controls → explore → render. Errors are shown in the app (and returned as None)."""
        if self._busy:
            return self.view
        self._busy = True
        try:
            self._sync_model_controls()
            view = explore(self.state(), self.cache)
        except (ValueError, FileNotFoundError, KeyError) as err:
            self.text.value = f"<b style='color:#c0392b'>error:</b> {err}"
            for out in self.outputs.values():
                out.outputs = ()
            return None
        finally:
            self._busy = False
        self.view = view
        self.text.value = f"<b>{view.family}</b> prompt <code>{view.prompt}</code> — {view.summary()}"
        for key, out in self.outputs.items():
            fig = view.figures.get(key)
            out.outputs = (figure_output(fig),) if fig is not None else ()
        return view

    def _changed(self, change) -> None:
        if change["owner"] is self.head and change["new"] is None:
            return  # _head_none_to_mean already re-set it to HEAD_MEAN, which ran update()
        self.update()


def explorer_app(model: str | None = None, cache: ModelCache | None = None, run: bool = True) -> ExplorerApp:
    """Build the explorer (``display(app.widget)`` in a notebook); ``run`` renders the first view."""
    app = ExplorerApp(model, cache)
    if run and app.model.value:
        app.update()
    return app


__all__ = [
    "ExplorerState",
    "ExplorerView",
    "ExplorerApp",
    "ModelCache",
    "explore",
    "explorer_app",
    "example",
    "sequence_labels",
    "figure_output",
    "model_picker",
]
