"""Attention-mass tables from ``rec.attention_mass`` (columns: batch, step, layer, head, query, kind,
level, group, mass).

Head aggregation is a *choice* the papers never state (Owl2 Fig. 4/5): every function here averages
over heads unless told otherwise, and says so in its output's name.
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd


def _select(
    df: pd.DataFrame, *, kind=None, level=None, steps=None, queries=None, batch=None, layers=None, call=None
):
    mask = pd.Series(True, index=df.index)
    if kind is not None:
        mask &= df["kind"].isin([kind] if isinstance(kind, str) else kind)
    if level is not None and "level" in df:
        mask &= df["level"] == level
    if call is not None and "call" not in df:
        raise ValueError("call= needs a table with a 'call' column (rec.attention_mass from hooks.capture)")
    for column, wanted in (
        ("step", steps),
        ("query", queries),
        ("batch", batch),
        ("layer", layers),
        ("call", call),
    ):
        if wanted is None:
            continue
        if callable(wanted):
            mask &= wanted(df[column])
        else:
            mask &= df[column].isin(list(wanted) if isinstance(wanted, Iterable) else [wanted])
    out = df[mask]
    if out.empty:
        raise ValueError(
            f"No attention-mass rows match kind={kind!r} level={level!r} steps={steps!r} "
            f"queries={queries!r} batch={batch!r} layers={layers!r} call={call!r}; available kinds "
            f"{sorted(df['kind'].unique())}, layers {sorted(df['layer'].unique())}."
        )
    return out


def _per_softmax(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per softmax (call, batch, step, layer, head, query, kind), one column per group.

    Every softmax contributes one row per group, so a plain mean over rows is the mean share; groups
    absent from some softmax (e.g. image:1 before image 1) count as 0.
    """
    keys = ["batch", "step", "layer", "head", "query", "kind", "group"]
    if "call" in rows:  # several forward / generate calls in one capture: each is its own softmax
        keys.insert(0, "call")
    return rows.groupby(keys)["mass"].sum().unstack("group", fill_value=0.0)


def layer_mass(
    df: pd.DataFrame,
    *,
    kind: str | list[str] = "self",
    level: str = "modality",
    steps=None,
    queries=None,
    batch=None,
    groups: list[str] | None = None,
    call=None,
) -> pd.DataFrame:
    """Mean attention mass per layer and group: a [layers × groups] table.

    Averages over batch, step, head and query (in that order of irrelevance: every row is one
    softmax, so the mean is the average share of attention one query-head spends on the group).

    Args:
        df: ``rec.attention_mass``.
        kind: attention kind(s) to keep (``self``, ``cross``, ``joint``).
        level: ``modality`` (visual/text) or ``token`` (bos, question, image:i, generated, ...).
        steps, queries, batch, call: values (or a predicate on the column) to keep; None = all.
            ``call`` is the capture call (each prefill starts one, see ``hooks.capture``).
        groups: columns to keep, in this order (missing groups become 0).
    """
    rows = _select(df, kind=kind, level=level, steps=steps, queries=queries, batch=batch, call=call)
    table = _per_softmax(rows).groupby(level="layer").mean()
    table.columns.name = "group"
    if groups is not None:
        table = table.reindex(columns=groups, fill_value=0.0)
    return table


def modality_share(df: pd.DataFrame, *, kind="self", steps=None, queries=None, batch=None) -> pd.Series:
    """Visual share of attention per layer (mean over batch, steps, heads and queries)."""
    table = layer_mass(df, kind=kind, level="modality", steps=steps, queries=queries, batch=batch)
    return table.get("visual", pd.Series(0.0, index=table.index)).rename("visual_share")


def depth_rise(
    df: pd.DataFrame, *, group: str = "visual", kind="self", level: str = "modality", steps=None, queries=None
) -> pd.Series:
    """Per capture call: how much ``group``'s share grows from the first third of the layers to the last.

    ``late - early``, where ``early`` / ``late`` are the mean share of ``group`` over the first /
    last ``n_layers // 3`` layers (mean over heads, steps and queries within the call). One value
    per call, so a capture that ran one ``generate`` per image gives one rise per image, which
    :func:`owl_lab.analysis.stats.paired_difference` can compare between two models on the same
    images. Owl2 Fig. 4 reads "attention moves to the visual tokens in later layers" as a positive
    rise of ``visual``.

    Returns:
        Series indexed by ``call`` (``rise``, in share units: -1..1).
    """
    if "call" not in df:
        raise ValueError(
            "depth_rise needs a table with a 'call' column (rec.attention_mass from hooks.capture)"
        )
    rows = _select(df, kind=kind, level=level, steps=steps, queries=queries)
    layers = sorted(rows["layer"].unique())
    third = len(layers) // 3
    if third == 0:
        raise ValueError(f"depth_rise needs at least 3 layers to compare thirds, got {len(layers)}")
    per_softmax = _per_softmax(rows)
    if group not in per_softmax:
        raise ValueError(f"no group {group!r} at level {level!r}; available {sorted(per_softmax.columns)}")
    share = per_softmax[group].groupby(level=["call", "layer"]).mean().unstack("layer")  # [calls, layers]
    early, late = share[layers[:third]].mean(axis=1), share[layers[-third:]].mean(axis=1)
    return (late - early).rename("rise")


def call_share(
    df: pd.DataFrame, *, group: str = "visual", kind="self", level: str = "modality", steps=None, queries=None
) -> pd.DataFrame:
    """``group``'s share per capture call and layer: [calls × layers] (mean over heads, steps, queries).

    One row per call (e.g. one ``generate`` per image), so ``table.sem()`` is the standard error over
    images of each layer's mean share, the error bar of :func:`layer_mass`'s line.
    """
    if "call" not in df:
        raise ValueError(
            "call_share needs a table with a 'call' column (rec.attention_mass from hooks.capture)"
        )
    per_softmax = _per_softmax(_select(df, kind=kind, level=level, steps=steps, queries=queries))
    if group not in per_softmax:
        raise ValueError(f"no group {group!r} at level {level!r}; available {sorted(per_softmax.columns)}")
    return per_softmax[group].groupby(level=["call", "layer"]).mean().unstack("layer")


def query_mass(
    df: pd.DataFrame, *, layer: int, kind="self", level="modality", batch: int = 0, steps=None, call=None
):
    """Mass per (step, query) and group for one layer, averaged over heads: a tidy table to plot.

    ``call`` keeps one capture call (an int, a list, or a predicate). With None and a table that holds
    several calls, rows of one (step, query) from different calls are averaged together, so pass
    ``call=`` whenever a capture ran more than one prompt batch.
    """
    rows = _select(df, kind=kind, level=level, batch=batch, layers=[layer], steps=steps, call=call)
    return rows.groupby(["step", "query", "group"], as_index=False)["mass"].mean()
