"""In-hook reductions of capture(): heads="mean" | list, queries="last" | positions | slice | callable."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from hooks import capture
from owl_lab.models.observe import TOKEN_IMAGE

KEY = ["batch", "step", "layer", "query", "kind", "level", "group"]


def batch():
    """Sample 1 is right-padded: its last real position is 3, sample 0's is 5."""
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [1, 7, 8, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    images = [[(1, 2)], [(2, 1)]]
    return ids, images, mask


def run(toy, **kw):
    ids, images, mask = batch()
    with torch.no_grad(), capture(toy, **kw) as rec:
        logits = toy(ids, images, mask)
    return logits, rec


@pytest.fixture
def full(toy):
    logits, rec = run(toy)
    return logits, rec.attention_mass


def _indexed(df: pd.DataFrame) -> pd.Series:
    return df.set_index([*KEY, "head"]).mass.sort_index()


def assert_same_rows(reduced: pd.DataFrame, full: pd.DataFrame) -> None:
    """Equal masses on the reduced table's rows; a group the chosen queries never see is not reported
    (the full table lists it for them with mass 0, because other queries see it)."""
    rows = ["batch", "step", "layer", "head", "query", "kind"]
    full = full.merge(reduced[rows].drop_duplicates(), on=rows)  # the same (query, head) rows only
    got, want = _indexed(reduced), _indexed(full)
    assert got.index.isin(want.index).all()
    torch.testing.assert_close(
        torch.tensor(got.values), torch.tensor(want.loc[got.index].values), rtol=0, atol=1e-6
    )
    assert (want.drop(got.index) == 0).all()


def test_default_output_is_unchanged_by_the_new_arguments(toy, full):
    _, rec = run(toy, heads=None, queries=None)
    pd.testing.assert_frame_equal(rec.attention_mass, full[1])


def test_mean_over_heads_equals_the_mean_of_the_unreduced_table(toy, full):
    logits, rec = run(toy, heads="mean")
    df = rec.attention_mass
    assert set(df["head"]) == {-1} and len(df) * 4 == len(full[1])  # the toy has 4 heads
    expected = full[1].groupby(KEY, observed=True).mass.mean()
    got = df.set_index(KEY).mass
    torch.testing.assert_close(
        torch.tensor(got.sort_index().values), torch.tensor(expected.sort_index().values), rtol=0, atol=1e-6
    )
    sums = df.groupby([*KEY[:-1]], observed=True).mass.sum()
    assert (sums - 1).abs().max() < 1e-5  # a mean of distributions is a distribution
    assert torch.equal(logits, full[0])


def test_a_list_of_heads_keeps_exactly_those_heads(toy, full):
    logits, rec = run(toy, heads=[3, 0])
    df = rec.attention_mass
    assert set(df["head"]) == {0, 3}
    assert_same_rows(df, full[1][full[1]["head"].isin([0, 3])])
    assert len(df) * 2 == len(full[1])
    assert torch.equal(logits, full[0])


def test_last_picks_each_samples_last_real_position_with_padding(toy, full):
    logits, rec = run(toy, queries="last")
    df = rec.attention_mass
    assert df.groupby("batch")["query"].unique().map(list).to_dict() == {0: [5], 1: [3]}
    f = full[1]
    assert_same_rows(df, f[((f.batch == 0) & (f["query"] == 5)) | ((f.batch == 1) & (f["query"] == 3))])
    assert torch.equal(logits, full[0])


def test_last_follows_decode_steps(toy):
    ids, images, mask = batch()
    cache: dict = {}
    with torch.no_grad(), capture(toy, queries="last", heads="mean") as rec:
        toy(ids, images, mask, cache)
        toy(torch.tensor([[3], [4]]), None, torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1), cache)
    df = rec.attention_mass
    assert df[df.step == 1]["query"].unique().tolist() == [6]
    assert len(df) < 100


def test_slices_positions_and_negative_bounds(toy, full):
    for queries, kept in [
        (slice(2, 5), {2, 3, 4}),
        (slice(0, None, 2), {0, 2, 4}),
        (slice(-2, None), {4, 5}),
        (3, {3}),
        ([0, -1], {0, 5}),
    ]:
        _, rec = run(toy, queries=queries)
        df = rec.attention_mass
        assert set(df["query"]) == kept, queries
        assert_same_rows(df, full[1][full[1]["query"].isin(kept)])


def test_callable_chooses_rows_per_sample(toy, full):
    def image_rows(query_index, token_kind):  # [Lq], [B, Lq] -> [B, Lq]
        return token_kind == TOKEN_IMAGE

    _, rec = run(toy, queries=image_rows)
    df = rec.attention_mass
    assert df.groupby("batch")["query"].unique().map(sorted).to_dict() == {0: [1, 2], 1: [2]}
    assert_same_rows(df, full[1])
    _, rec = run(toy, queries=lambda qi, kind: qi >= 4)
    assert set(rec.attention_mass["query"]) == {4, 5} and set(rec.attention_mass.batch) == {
        0
    }  # 4, 5 pad in 1


def test_reductions_combine_with_full_maps(toy, full):
    _, rec = run(toy, queries="last", full_maps={1: [3, 5]})
    assert rec.full_maps[(0, 1, "self")].query_index.tolist() == [3, 5]
    assert rec.full_maps[(0, 1, "self")].probs.shape == (2, 4, 2, 6)
    assert set(rec.attention_mass["query"]) == {3, 5}


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"heads": "max"}, "heads must be"),
        ({"heads": [0, 0]}, "twice"),
        ({"heads": [9]}, "out of range"),
        ({"heads": []}, "non-empty"),
        ({"queries": "first"}, "queries must be"),
        ({"queries": slice(0, 4, -1)}, "step must be positive"),
        ({"queries": [1.5]}, "must be ints"),
    ],
)
def test_bad_values_raise_clearly(toy, kw, match):
    with pytest.raises(ValueError, match=match):
        if kw.get("heads") == [9]:
            run(toy, **kw)  # the toy has no config.num_attention_heads: checked at the first event
        else:
            capture(toy, **kw)


def test_a_callable_returning_the_wrong_shape_raises(toy):
    with pytest.raises(ValueError, match="bool tensor of shape"):
        run(toy, queries=lambda qi, kind: qi[:2] > 0)


def test_memory_per_row_is_about_60_bytes(full):
    df = full[1]
    per_row = df.memory_usage(deep=True, index=False).sum() / len(df)
    assert 50 <= per_row <= 70, per_row  # hooks/reductions.py documents ~60 bytes per row


@pytest.mark.parametrize("name", ["owl2-tiny", "owl3-tiny"])
def test_real_models_mean_and_last_match_the_full_table(name):
    """Owl2 (image rows in the sequence) and Owl3 (self + cross attention with image keys)."""
    from PIL import Image

    from owl_lab import load_owl

    model, processor = load_owl(name)
    images = [Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (64, 64), (30, 30, 200))]
    batch = processor(text=["<|image|>what color is the circle ?", "<|image|>is it blue ?"], images=images)
    with torch.no_grad():
        plain = model(**batch).logits
        with capture(model) as rec:
            model(**batch)
        with capture(model, heads="mean", queries="last") as small:
            reduced = model(**batch).logits
    assert torch.equal(plain, reduced)
    full, df = rec.attention_mass, small.attention_mass
    assert set(df.kind) == set(full.kind) and len(df) * 50 < len(full)
    last = full.groupby("batch")["query"].transform("max")  # the full table holds real queries only
    expected = full[full["query"] == last].groupby(KEY, observed=True).mass.mean()
    got = df.set_index(KEY).mass.sort_index()
    torch.testing.assert_close(
        torch.tensor(got.values), torch.tensor(expected.loc[got.index].values), rtol=0, atol=1e-6
    )
    assert set(df["query"]) <= set(last)
