"""owl-lab: interpretability lab for the mPLUG-Owl2 and mPLUG-Owl3 multimodal LLMs.

Public entry point::

    from owl_lab import load_owl
    model, processor = load_owl("owl2-tiny")        # a shipped checkpoint, by name
    model, processor = load_owl("/path/to/ckpt")    # any official or saved checkpoint directory

``detect_family(name_or_dir)`` names the family of a checkpoint directory; for a loaded model use
``family_of(model)``, which returns the registry entry (:mod:`owl_lab.families`).
"""

from owl_lab.families import FAMILIES, FamilySpec, family_of, family_of_checkpoint, get_family
from owl_lab.zoo import detect_family, list_checkpoints, load_owl, resolve_checkpoint

__all__ = [
    "load_owl",
    "detect_family",
    "list_checkpoints",
    "resolve_checkpoint",
    "FAMILIES",
    "FamilySpec",
    "get_family",
    "family_of",
    "family_of_checkpoint",
]
__version__ = "0.1.0"
