"""Information flow by attention knockout, in the style of Zhang et al. (CVPR 2025) and Geva et al. (2023).

For a window of ``k`` consecutive decoder layers sliding over the depth, attention along one *flow*
is blocked inside the window only, and the probability of the correct answer's first token at the
last prompt position is compared with the unblocked run:

    relative change = (p_knocked - p) / p          (per example; -1 = the answer is gone)

Flows (``query group ← key group``, named ``keys→queries`` as in the paper):

=====================  ============================================================================
``visual→question``    question tokens (every prompt token but the last) may not read the image
``visual→last``        the last position may not read the image
``question→last``      the last position may not read the question tokens (its own key stays)
``visual→text``        no text position (question tokens and the last) may read the image: the image
                       is gone for the layers of the window (FastV's pruning of every visual token);
                       not in the default set
``image:k→last``       (``per_image=True``) the last position may not read image k's keys
=====================  ============================================================================

In Owl2 the image is a run of rows in the sequence; in Owl3 it exists only as keys of the hyper
layers, so a window without a hyper layer cannot block an image flow there (its change is 0 by
construction, reported like any other).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

import hooks
from hooks.sites import n_layers
from owl_lab.analysis.causal import answer_logprob, last_positions, layouts, position_groups
from owl_lab.synth.tasks import Example

FLOWS = ("visual→question", "visual→last", "question→last")
#: every flow :func:`knockout_sweep` knows (the default sweep is :data:`FLOWS`)
ALL_FLOWS = (*FLOWS, "visual→text")


def _flow_groups(flow: str, layout) -> tuple[object, object]:
    """(queries, keys) arguments of ``hooks.knockout`` for ``flow`` on one batch's layout."""
    groups = position_groups(layout)
    keys, queries = flow.split("→")
    q = {"question": groups["question"], "text": groups["question"] | groups["last"]}.get(queries, "last")
    k = groups["question"] if keys == "question" else keys
    return q, k


def answer_ids(processor, examples: Sequence[Example]) -> torch.Tensor:
    """[B] id of each answer's first word."""
    tok = processor.tokenizer
    return torch.tensor([tok.convert_tokens_to_ids(e.answer.split()[0]) for e in examples])


@torch.no_grad()
def knockout_sweep(
    model: nn.Module,
    processor,
    examples: Sequence[Example],
    window: int = 2,
    flows: Sequence[str] = FLOWS,
    per_image: bool = False,
    batch_size: int = 64,
    progress: bool = True,
) -> pd.DataFrame:
    """Relative change of the answer's probability when each flow is blocked in each layer window.

    Args:
        examples: prompts with answers (e.g. ``synth.eval_set("color", 100)``); the answer's first
            word is the target token.
        window: layers blocked at once; windows start at 0 .. n_layers - window.
        flows: subset of :data:`ALL_FLOWS` (default :data:`FLOWS`).
        per_image: also block ``image:k→last`` for every image index k of the examples.

    Returns:
        DataFrame: flow, start, end (inclusive), center, example, p, p_knocked, relative_change,
        correct (the unblocked greedy answer token is right).
    """
    n = n_layers(model)
    if not 1 <= window <= n:
        raise ValueError(f"window must be in 1..{n}, got {window}")
    bad = sorted(set(flows) - set(ALL_FLOWS))
    if bad:
        raise ValueError(f"unknown flows {bad}; expected a subset of {ALL_FLOWS}")
    flows = list(flows)
    if per_image:
        flows += [f"image:{k}→last" for k in range(max(len(e.images) for e in examples))]
    starts = range(0, n - window + 1)
    chunks = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    rows = []
    bar = tqdm(total=len(chunks) * len(flows) * len(starts), desc="knockout", disable=not progress)
    offset = 0
    for chunk in chunks:
        batch = processor(text=[e.text for e in chunk], images=[e.images for e in chunk], return_tensors="pt")
        ids = answer_ids(processor, chunk)
        with layouts(model) as seen:
            logits = model(**batch).logits
        layout = seen[0]
        pos = last_positions(layout)
        base = answer_logprob(logits, pos, ids).exp()
        correct = (logits[torch.arange(len(chunk)), pos].argmax(-1) == ids).tolist()
        for flow in flows:
            queries, keys = _flow_groups(flow, layout)
            for s in starts:
                with hooks.knockout(model, queries=queries, keys=keys, layers=range(s, s + window)):
                    p = answer_logprob(model(**batch).logits, pos, ids).exp()
                rel = (p - base) / base
                rows.extend(
                    (
                        flow,
                        s,
                        s + window - 1,
                        s + (window - 1) / 2,
                        offset + b,
                        float(base[b]),
                        float(p[b]),
                        float(rel[b]),
                        correct[b],
                    )
                    for b in range(len(chunk))
                )
                bar.update()
        offset += len(chunk)
    bar.close()
    return pd.DataFrame(
        rows,
        columns=["flow", "start", "end", "center", "example", "p", "p_knocked", "relative_change", "correct"],
    )


def summarize(df: pd.DataFrame, correct_only: bool = True) -> pd.DataFrame:
    """Mean relative change (in %) with its per-example standard error, per flow and window."""
    d = df[df.correct] if correct_only else df
    g = d.groupby(["flow", "start", "end", "center"], observed=True).relative_change
    out = g.agg(["mean", "std", "count"]).reset_index()
    out["mean"] *= 100
    out["se"] = 100 * out["std"] / out["count"].clip(lower=1) ** 0.5
    return out.rename(columns={"mean": "change_pct", "count": "n"}).drop(columns="std")


__all__ = ["ALL_FLOWS", "FLOWS", "answer_ids", "knockout_sweep", "summarize"]
