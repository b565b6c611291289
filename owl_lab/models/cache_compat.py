"""The KV-cache argument under both of its transformers names.

transformers 5.24 renamed the cache argument ``past_key_values`` to ``cache``: ``generate`` now passes
``cache=`` to ``forward`` and reads ``outputs.cache`` back (the ModelOutput field was renamed too; the
old name survives there only as a deprecated alias that logs a warning). Up to 5.23 both are
``past_key_values``. Our models accept both names and fill whichever output field the installed
transformers defines, so they run unchanged on either side of the rename.
"""

from __future__ import annotations

from dataclasses import fields

from transformers.modeling_outputs import CausalLMOutputWithPast

# Name of the cache field on transformers' ModelOutputs: "cache" from 5.24 on, "past_key_values" before.
CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"


def resolve_cache(past_key_values=None, cache=None):
    """The cache passed as ``past_key_values=`` (transformers <= 5.23) or ``cache=`` (>= 5.24)."""
    if cache is None:
        return past_key_values
    if past_key_values is not None and past_key_values is not cache:
        raise ValueError(
            "Got two different caches, past_key_values= and cache= (its transformers >= 5.24 "
            "name); pass only one."
        )
    return cache
