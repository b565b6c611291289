"""Interventions: temporary, exactly-restored edits of a model, for causal questions.

Observation (``hooks``) never changes the numbers; an intervention changes them on purpose, inside a
``with`` block, and puts every weight back bit for bit on exit (also when the block raises).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from owl_lab.models.owl2.modality_adaptive_owl2 import Owl2Multiway


def multiway_modules(model) -> list[tuple[str, Owl2Multiway]]:
    """(name, module) of every modality-adaptive module of an Owl2 model (K, V and the two norms of
    each decoder layer); empty for a model trained without the MAM."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Owl2Multiway)]


@contextmanager
def text_branch_for_images(model):
    """Route Owl2 image rows through the *text* branch of every modality-adaptive module.

    Inside the block the vision-branch weights (``multiway.1``) hold copies of the text-branch
    weights (``multiway.0``), so image rows are projected and normalised exactly as text would be.
    This asks what the MAM's separate vision parameters contribute to a trained model.

    Raises:
        ValueError: the model has no modality-adaptive modules (e.g. ``owl2-tiny-nomam``).
    """
    modules = multiway_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no modality-adaptive (multiway) modules to ablate")
    saved = []
    with torch.no_grad():
        for _, m in modules:
            vision, text = m.multiway[1], m.multiway[0]
            saved.append({k: v.detach().clone() for k, v in vision.state_dict().items()})
            vision.load_state_dict(text.state_dict())
    try:
        yield model
    finally:
        with torch.no_grad():
            for (_, m), state in zip(modules, saved, strict=True):
                m.multiway[1].load_state_dict(state)


def branch_divergence(model) -> list[dict]:
    """How far each layer's vision branch moved from its text branch: relative Frobenius distance
    ``|W_vision - W_text| / |W_text|`` per multiway module (0 = identical branches)."""
    rows = []
    for name, m in multiway_modules(model):
        a, b = m.multiway[0].weight.detach(), m.multiway[1].weight.detach()
        parts = name.split(".")
        layer = int(parts[parts.index("layers") + 1])
        rows.append(
            {
                "layer": layer,
                "module": parts[-1],
                "relative_distance": float((b - a).norm() / a.norm().clamp_min(1e-12)),
            }
        )
    return rows
