"""Capture utilities for Owl models (attention mass, gates, abstractor maps).

    from hooks import capture
    with capture(model) as rec:
        model(**batch)
    rec.attention_mass   # DataFrame: batch, step, layer, head, query, kind, level, group, mass

See :mod:`hooks.capture` for the arguments and :mod:`hooks.groups` for the token groups. Where each
observation point lives in each family is the registry's knowledge (:mod:`owl_lab.families`:
``family_of(model)``, ``find_sites(model, spec, component)``).
"""

from hooks.attention import MassResult, grouped_mass
from hooks.capture import capture
from hooks.groups import group_vocabulary
from hooks.knockout import knockout
from hooks.recording import AttentionRecord, FullMap, Recording
from hooks.sites import edit, record, sites

__all__ = [
    "capture",
    "Recording",
    "AttentionRecord",
    "FullMap",
    "grouped_mass",
    "MassResult",
    "group_vocabulary",
    "sites",
    "record",
    "edit",
    "knockout",
]
