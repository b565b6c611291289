"""The explorer's model control: a Dropdown of the shipped checkpoints plus a checkpoint-directory entry.

The widget class is built on first use (``ipywidgets`` / ``traitlets`` are imported then), so importing
``owl_lab.widgets`` stays cheap where no app is built.
"""

from __future__ import annotations

from functools import lru_cache

PATH_CHOICE = "checkpoint directory…"


@lru_cache(maxsize=1)
def _model_picker_class():
    import ipywidgets as w
    import traitlets

    class ModelPicker(w.HBox):
        """A Dropdown of the shipped checkpoints plus a free checkpoint-directory entry.

        ``value`` (observable) is what to load: a shipped name or the typed path. Setting ``value``
        to anything that is not a shipped name selects the path entry and shows it there.
        """

        value = traitlets.Unicode("")

        def __init__(self, value: str, names: list[str]):
            self.choice = w.Dropdown(options=[*names, PATH_CHOICE], description="model")
            self.path = w.Text(
                placeholder="/path/to/checkpoint", continuous_update=False, layout=w.Layout(width="16em")
            )
            super().__init__([self.choice, self.path])
            self._names = list(names)
            self._syncing = False
            self.choice.observe(self._from_choice, names="value")
            self.path.observe(self._from_path, names="value")
            self.observe(self._to_children, names="value")
            self.value = value
            self._to_children({"new": value})

        @property
        def options(self) -> list[str]:
            """The shipped checkpoint names offered."""
            return list(self._names)

        def _to_children(self, change) -> None:
            self._syncing = True
            try:
                new = change["new"]
                shipped = new in self._names
                self.choice.value = new if shipped else PATH_CHOICE
                if not shipped:
                    self.path.value = new
                self.path.layout.display = "none" if shipped else None
            finally:
                self._syncing = False

        def _from_choice(self, change) -> None:
            if self._syncing:
                return
            if change["new"] == PATH_CHOICE:
                self.path.layout.display = None
                if self.path.value:
                    self.value = self.path.value
            else:
                self.value = change["new"]

        def _from_path(self, change) -> None:
            if not self._syncing and self.choice.value == PATH_CHOICE:
                self.value = change["new"].strip()

    return ModelPicker


def model_picker(value: str, names: list[str]):
    """The explorer's model control (see ``ModelPicker`` in :func:`_model_picker_class`)."""
    return _model_picker_class()(value, names)


__all__ = ["PATH_CHOICE", "model_picker"]
