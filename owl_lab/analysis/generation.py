"""Attention of the tokens that *produce the answer*, the quantity of the Owl2 paper's Figs. 4 and 5.

Under ``generate`` the capture records step 0 (the whole prompt) and one step per fed-back token.
The answer-producing queries are the **last prompt position** (it predicts the first answer token)
and every **generated token** fed back afterwards. :func:`answer_rows` picks exactly those rows from
``rec.attention_mass`` of one ``generate`` call; :func:`answer_mass` runs one capture per example
(so decode-step numbering restarts for each prompt) and averages the per-layer tables.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from hooks.capture import capture
from owl_lab.analysis.mass import layer_mass


def answer_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of ``rec.attention_mass`` from ONE ``generate`` call whose query produces an answer token:
    at step 0 the last prompt position of each batch row, and every row of later steps."""
    if df.empty:
        raise ValueError("the attention-mass table is empty; capture a model.generate(...) call first")
    prefill = df[df["step"] == 0]
    last = prefill.groupby("batch")["query"].max()  # [B] last real prompt position
    is_last = prefill["query"].to_numpy() == last.reindex(prefill["batch"]).to_numpy()
    return pd.concat([prefill[is_last], df[df["step"] > 0]])


@torch.no_grad()
def answer_mass(
    model,
    processor,
    examples: Sequence,
    *,
    max_new_tokens: int = 3,
    level: str = "modality",
    groups: list[str] | None = None,
    per_example: bool = False,
):
    """Mean [layer × group] attention mass of the answer-producing queries over ``examples``.

    Each example is generated greedily on its own (batch 1, ``max_new_tokens``) inside its own capture;
    per example the table is the mean over heads and answer queries (:func:`layer_mass`), then the
    tables are averaged, so every example weighs the same however long its answer.

    Args:
        examples: :class:`owl_lab.synth.Example` objects (``text`` with placeholders, ``images``).
        level: ``modality`` (visual / text) or ``token`` (bos, question, image:0, generated, ...).
        groups: columns to keep (missing groups count as 0), default all that occur.
        per_example: return the list of per-example [layer × group] tables instead of their mean
            (for standard errors over prompts).
    """
    if not examples:
        raise ValueError("answer_mass needs at least one example")
    tables = []
    for ex in examples:
        batch = processor(text=ex.text, images=list(ex.images) or None)
        with capture(model, abstractor=False) as rec:
            model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        tables.append(layer_mass(answer_rows(rec.attention_mass), level=level, groups=groups))
    if per_example:
        return tables
    table = pd.concat(tables).fillna(0.0).groupby(level="layer").sum() / len(tables)
    return table if groups is None else table[groups]


__all__ = ["answer_rows", "answer_mass"]
