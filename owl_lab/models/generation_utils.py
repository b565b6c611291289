"""Generation plumbing shared by the Owl families: the KV-cache prologue and padded prompts.

* :func:`prepare_cache`: the cache passed as ``past_key_values=`` or ``cache=`` (see
  :mod:`owl_lab.models.cache_compat`), a fresh one when caching is on and none was given.
* :func:`left_align` / :func:`restore_prompt`: ``generate`` appends new tokens after each row's last
  column, so a right-padded prompt (what the processors produce) would continue after its pads. The
  prompt is moved to left padding for decoding (a stable sort keeps the token order; rotary
  positions come from the attention mask, so the numbers are those of the unpadded prompt) and the
  caller's ``input_ids`` are put back in front of the generated tokens.

(The losses stay in each family's modeling file: each shipped checkpoint's recipe regenerates it
bit for bit with its family's loss, and the two reduce in a different order.)
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, DynamicCache

from .cache_compat import resolve_cache


def prepare_cache(
    config: PretrainedConfig,
    use_cache: bool | None,
    past_key_values: Cache | None = None,
    cache: Cache | None = None,
    cache_class: type[DynamicCache] = DynamicCache,
) -> tuple[Cache | None, bool]:
    """(the cache to use or None, use_cache): a new ``cache_class`` when caching is on and none was given."""
    past_key_values = resolve_cache(past_key_values, cache)
    use_cache = config.use_cache if use_cache is None else use_cache
    if use_cache and past_key_values is None:
        past_key_values = cache_class(config=config)
    return past_key_values, use_cache


def left_align(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Move every row's padding to the left, keeping the order of its tokens.

    Args:
        input_ids, attention_mask: [B, L]; mask 1 = real token.

    Returns:
        (input_ids, attention_mask, order): ``order`` [B, L] is the gather index (new column j holds
        old column ``order[b, j]``), or None when nothing moved (no padding, or left padding only);
        then the inputs are returned unchanged.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return input_ids, attention_mask, None
    order = torch.sort(attention_mask.long(), dim=1, stable=True).indices  # pads first, order kept
    if bool((order == torch.arange(order.shape[1], device=order.device)).all()):
        return input_ids, attention_mask, None  # already left-padded
    return input_ids.gather(1, order), attention_mask.gather(1, order), order


def restore_prompt(out, input_ids: torch.Tensor):
    """Put the caller's prompt ``input_ids`` [B, L] back in front of the generated tokens, in place.

    ``out`` is what ``generate`` returned (a tensor [B*n, L+new] or an output with ``.sequences``);
    with ``num_return_sequences`` = n every prompt row is repeated n times.
    """
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    prompt = input_ids.repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)
    sequences[:, : input_ids.shape[1]] = prompt.to(sequences.device)
    return out
