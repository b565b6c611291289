"""``auto_map`` + a remote-code shim: a checkpoint saved by the lab loads through transformers' Auto classes.

Two ways in:

1. ``import owl_lab`` registers every family with ``AutoConfig``, ``AutoModelForCausalLM``,
   ``AutoProcessor`` and ``AutoImageProcessor`` (the family packages do it on import). That loads any lab
   or official checkpoint, including the shipped ones, whose files carry no ``auto_map``.
2. Without importing owl_lab: ``save_pretrained`` (config, model and processor) writes ``auto_map``
   entries pointing at :data:`SHIM_FILE`, a five-line module saved beside the weights, so
   ``Auto*.from_pretrained(directory, trust_remote_code=True)`` works in a plain transformers session.

Why a shim and not the modeling code itself: transformers' remote code copies the module named in
``auto_map`` (and the files it imports *relatively*) into its module cache and imports the copy. The lab's
modeling files import ``owl_lab`` absolutely (shared attention kernels, the observation points that
``hooks`` uses, loading plumbing), so a copy would be a second, unregistered class that ``hooks`` and
the family registry do not know. The shim instead imports the installed package, so the classes are the
lab's own. **Requirement: the ``owl_lab`` package must be importable** (installed, or its source tree on
``PYTHONPATH``); otherwise transformers stops with "This modeling file requires the following packages
that were not found in your environment: owl_lab". A checkpoint that needs no owl_lab at all would need
the modeling code flattened into self-contained files with relative imports (see the README).
"""

from __future__ import annotations

import json
from pathlib import Path

#: module name of the shim (the file is ``SHIM_MODULE + ".py"`` in the checkpoint directory)
SHIM_MODULE = "owl_lab_remote"
SHIM_FILE = f"{SHIM_MODULE}.py"
SHIM_SOURCE = '''"""transformers remote-code entry points of an owl-lab checkpoint (written on save).

``trust_remote_code=True`` runs this file; it imports the installed ``owl_lab`` package, so the classes are
owl-lab's own (nothing is copied). Requirement: ``owl_lab`` importable (installed or on PYTHONPATH).
"""

from owl_lab.models.owl2 import Owl2Config, Owl2ForCausalLM, Owl2ImageProcessor, Owl2Processor
from owl_lab.models.owl3 import Owl3Config, Owl3ForCausalLM, Owl3ImageProcessor, Owl3Processor

__all__ = [
    "Owl2Config", "Owl2ForCausalLM", "Owl2ImageProcessor", "Owl2Processor",
    "Owl3Config", "Owl3ForCausalLM", "Owl3ImageProcessor", "Owl3Processor",
]
'''


def remote(class_name: str) -> str:
    """``auto_map`` value for a lab class: ``"owl_lab_remote.<class_name>"``."""
    return f"{SHIM_MODULE}.{class_name}"


def write_shim(directory: str | Path) -> Path:
    """Write :data:`SHIM_FILE` into ``directory`` (created if needed); returns its path."""
    path = Path(directory) / SHIM_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(SHIM_SOURCE)
    return path


def add_auto_map(json_file: str | Path, auto_map: dict[str, str]) -> None:
    """Merge ``auto_map`` into the ``auto_map`` entry of a saved JSON file."""
    path = Path(json_file)
    data = json.loads(path.read_text())
    data["auto_map"] = {**data.get("auto_map", {}), **auto_map}
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


class AutoMapConfigMixin:
    """For a lab ``PretrainedConfig``: ``save_pretrained`` also writes ``auto_map`` and the shim.

    Subclasses set :attr:`auto_map_model` to the name of the class ``AutoModelForCausalLM`` should build.
    The in-memory config is left as it was (``auto_map`` is only added to the saved ``config.json``).
    """

    auto_map_model: str = ""

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        previous = self.__dict__.get("auto_map")
        self.auto_map = {
            **(previous or {}),
            "AutoConfig": remote(type(self).__name__),
            "AutoModelForCausalLM": remote(self.auto_map_model),
        }
        try:
            super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        finally:
            if previous is None:
                del self.auto_map
            else:
                self.auto_map = previous
        write_shim(save_directory)


class AutoMapProcessorMixin:
    """For a lab ``ProcessorMixin``: ``save_pretrained`` writes the tokenizer files,
    ``processor_config.json`` (image processor nested), ``preprocessor_config.json`` and the ``auto_map``
    + shim for ``trust_remote_code``."""

    def save_pretrained(self, save_directory, **kwargs) -> list[str]:
        directory = str(save_directory)
        files = super().save_pretrained(directory, **kwargs)
        self.image_processor.save_pretrained(directory)
        save_processor_auto_map(directory, type(self).__name__)
        return files


def save_processor_auto_map(directory: str | Path, processor_class: str) -> None:
    """After a processor's ``save_pretrained``: ``auto_map`` for AutoProcessor + the shim. (The lab's image
    processors put their own ``AutoImageProcessor`` entry in their ``to_dict``.)"""
    add_auto_map(Path(directory) / "processor_config.json", {"AutoProcessor": remote(processor_class)})
    write_shim(directory)
