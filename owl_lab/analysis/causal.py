"""Shared plumbing of the causal analyses (logit lens, knockout, patching, pruning).

Positions are those of the sequence the decoder sees (Owl2: image rows expanded in place), taken
from the model's own :class:`SequenceLayout`, so every analysis agrees on what "last" or "image"
means for both families.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from hooks.sites import family_spec
from owl_lab.analysis.findings import MIN_N, Effect, K, judge
from owl_lab.models.observe import TOKEN_IMAGE, TOKEN_PAD, TOKEN_PLACEHOLDER, TOKEN_TEXT, SequenceLayout
from owl_lab.synth.tokenizer import vocabulary

#: Position groups of activation patching (each a [B, L] boolean mask of the prompt).
POSITION_GROUPS = ("image", "question", "last")


@contextmanager
def layouts(model: nn.Module):
    """Yield a list that fills with the :class:`SequenceLayout` of every forward call in the block."""
    seen: list[SequenceLayout] = []
    point = model.get_submodule(family_spec(model).paths["layout"])
    handle = point.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    try:
        yield seen
    finally:
        handle.remove()


def last_positions(layout: SequenceLayout) -> torch.Tensor:
    """[B] long: each sample's last real position in this call's sequence."""
    real = layout.token_kind != TOKEN_PAD  # [B, L]
    idx = torch.arange(real.shape[1], device=real.device).expand_as(real)
    return torch.where(real, idx, -1).amax(1)


def position_groups(layout: SequenceLayout) -> dict[str, torch.Tensor]:
    """``image`` / ``question`` / ``last`` → [B, L] bool masks over this call's positions.

    ``image``: Owl2 image rows; Owl3 ``<|image|>`` placeholder tokens (the only positions that carry
    an image in its sequence). ``question``: every other real prompt token except the last.
    ``last``: the last real token (where the answer is predicted).
    """
    kind = layout.token_kind
    last = torch.zeros_like(kind, dtype=torch.bool)
    last[torch.arange(kind.shape[0]), last_positions(layout)] = True
    image = (kind == TOKEN_IMAGE) | (kind == TOKEN_PLACEHOLDER)
    question = (kind == TOKEN_TEXT) & ~last
    return {"image": image & ~last, "question": question, "last": last}


def token_strings(model: nn.Module, tokenizer=None) -> list[str]:
    """id → token string for the model's vocabulary.

    With ``tokenizer`` its tokens; otherwise the lab worlds' word list when the vocabulary size matches
    (the shipped tiny checkpoints), else ``"<id>"`` strings.
    """
    size = model.get_output_embeddings().weight.shape[0]
    if tokenizer is not None:
        return [tokenizer.convert_ids_to_tokens(i) for i in range(size)]
    vocab = vocabulary(family_spec(model).name)
    if len(vocab) == size:
        inverse = {i: t for t, i in vocab.items()}
        return [inverse[i] for i in range(size)]
    return [f"<{i}>" for i in range(size)]


def gather_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [B, L, ...], positions [B] → [B, ...] (one position per sample)."""
    return x[torch.arange(x.shape[0], device=x.device), positions.to(x.device)]


def answer_logprob(logits: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[B] log-probability of token ``ids[b]`` at ``positions[b]`` of ``logits`` [B, L, V]."""
    logp = torch.log_softmax(gather_positions(logits, positions).float(), dim=-1)
    return logp.gather(1, ids.to(logp.device)[:, None])[:, 0]


def verdict(effects: list[tuple[float, float, int]], threshold: float = 0.0, k: float = K) -> str:
    """The lab's one verdict rule (:func:`owl_lab.analysis.findings.judge`) on ``(effect, se, n)`` tuples
    from :func:`mean_se`, one per seed, oriented so that positive = the claim's direction.

    ``threshold``: the cut-off the claim itself states ("recovered > 0.1"; 0 = none). As in the findings
    notebooks (e.g. "above chance" judged on ``share − 0.5``), the claim's effect is then the margin over
    it, ``effect − threshold``: *reproduced* when every seed exceeds the cut-off by more than ``k`` SE,
    *opposite* when every seed is more than ``k`` SE below it, *not reproduced* / *inconclusive* otherwise.
    """
    if not effects:
        raise ValueError("verdict needs at least one (effect, se, n)")
    seeds = [
        Effect(float(m) - threshold, float(se), int(n), f"seed {i}") for i, (m, se, n) in enumerate(effects)
    ]
    return judge(seeds, k=k)[0]


def mean_se(values) -> tuple[float, float, int]:
    """(mean, standard error, n) of per-example values."""
    t = torch.as_tensor(list(values), dtype=torch.float64)
    n = t.numel()
    return float(t.mean()), float(t.std() / n**0.5) if n > 1 else 0.0, n


__all__ = [
    "MIN_N",
    "POSITION_GROUPS",
    "mean_se",
    "verdict",
    "answer_logprob",
    "gather_positions",
    "last_positions",
    "layouts",
    "position_groups",
    "token_strings",
]
