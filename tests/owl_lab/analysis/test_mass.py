"""owl_lab.analysis.mass: per-layer tables are means of per-softmax group masses."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from owl_lab.analysis import depth_rise, layer_mass, modality_share, query_mass


def _frame(rng, layers=3, heads=2, queries=4, image_groups=("image:0",)):
    rows = []
    for layer in range(layers):
        for head in range(heads):
            for q in range(queries):
                v = rng.random()
                rows += [
                    dict(
                        batch=0,
                        step=0,
                        layer=layer,
                        head=head,
                        query=q,
                        kind="self",
                        level="modality",
                        group="visual",
                        mass=v,
                    ),
                    dict(
                        batch=0,
                        step=0,
                        layer=layer,
                        head=head,
                        query=q,
                        kind="self",
                        level="modality",
                        group="text",
                        mass=1 - v,
                    ),
                ]
                # a token-level group that only exists for later queries (counts as 0 before)
                gen = 0.5 if q >= 2 else 0.0
                if q >= 2:
                    rows.append(
                        dict(
                            batch=0,
                            step=0,
                            layer=layer,
                            head=head,
                            query=q,
                            kind="self",
                            level="token",
                            group="generated",
                            mass=gen,
                        )
                    )
                rows.append(
                    dict(
                        batch=0,
                        step=0,
                        layer=layer,
                        head=head,
                        query=q,
                        kind="self",
                        level="token",
                        group="question",
                        mass=1 - gen,
                    )
                )
    return pd.DataFrame(rows)


def test_layer_mass_rows_sum_to_one_and_match_direct_mean():
    df = _frame(np.random.default_rng(0))
    table = layer_mass(df)
    np.testing.assert_allclose(table.sum(axis=1), 1.0, atol=1e-12)
    direct = df[(df.layer == 1) & (df.group == "visual")].mass.mean()
    assert table.loc[1, "visual"] == pytest.approx(direct)
    assert modality_share(df).loc[1] == pytest.approx(direct)


def test_missing_groups_count_as_zero_in_the_mean():
    table = layer_mass(_frame(np.random.default_rng(1)), level="token")
    assert table.loc[0, "generated"] == pytest.approx(0.25)  # 0.5 on half of the queries


def test_filters_and_clear_error_when_nothing_matches():
    df = _frame(np.random.default_rng(2))
    assert set(query_mass(df, layer=2)["query"]) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="available kinds"):
        layer_mass(df, kind="cross")


def test_several_calls_in_one_capture_are_separate_softmaxes():
    rng = np.random.default_rng(2)
    a, b = _frame(rng).assign(call=0), _frame(rng).assign(call=1)  # same (batch, step, query) keys
    table = layer_mass(pd.concat([a, b], ignore_index=True))
    np.testing.assert_allclose(table.sum(axis=1), 1.0, atol=1e-12)
    both = pd.concat([layer_mass(a), layer_mass(b)]).groupby(level="layer").mean()
    pd.testing.assert_frame_equal(table, both, check_names=False)


def test_call_filter_keeps_one_capture_call():
    rng = np.random.default_rng(3)
    a, b = _frame(rng).assign(call=0), _frame(rng).assign(call=1)
    df = pd.concat([a, b], ignore_index=True)
    only_b = query_mass(df, layer=1, call=1)
    pd.testing.assert_frame_equal(only_b, query_mass(b, layer=1))
    assert not only_b.equals(query_mass(df, layer=1))  # unfiltered mixes both calls
    pd.testing.assert_frame_equal(layer_mass(df, call=0), layer_mass(a))
    with pytest.raises(ValueError, match="call"):
        query_mass(_frame(rng), layer=0, call=0)  # a table without a call column


def test_depth_rise_is_late_third_minus_early_third_per_call():
    rng = np.random.default_rng(4)
    calls = [_frame(rng, layers=7).assign(call=c) for c in range(3)]  # 7 layers: thirds of 2 layers
    df = pd.concat(calls, ignore_index=True)
    rise = depth_rise(df)
    assert list(rise.index) == [0, 1, 2]
    for c, frame in enumerate(calls):
        share = layer_mass(frame)["visual"]
        assert rise.loc[c] == pytest.approx(share.loc[[5, 6]].mean() - share.loc[[0, 1]].mean())
    # a model whose visual share grows with depth has a positive rise, and text mirrors it
    grows = df.assign(mass=np.where(df.group == "visual", df.layer / 6, 1 - df.layer / 6))
    assert depth_rise(grows).tolist() == pytest.approx([5.5 / 6 - 0.5 / 6] * 3)
    assert depth_rise(grows, group="text").tolist() == pytest.approx([-(5.5 / 6 - 0.5 / 6)] * 3)


def test_depth_rise_errors_name_the_problem():
    rng = np.random.default_rng(5)
    with pytest.raises(ValueError, match="call"):
        depth_rise(_frame(rng))
    with pytest.raises(ValueError, match="at least 3 layers"):
        depth_rise(_frame(rng, layers=2).assign(call=0))
    with pytest.raises(ValueError, match="available"):
        depth_rise(_frame(rng).assign(call=0), group="image:0")


def test_call_share_has_one_row_per_call_matching_layer_mass():
    from owl_lab.analysis.mass import call_share

    rng = np.random.default_rng(6)
    calls = [_frame(rng, layers=3).assign(call=c) for c in range(4)]
    table = call_share(pd.concat(calls, ignore_index=True))
    assert table.shape == (4, 3)
    for c, frame in enumerate(calls):
        assert table.loc[c].tolist() == pytest.approx(layer_mass(frame)["visual"].tolist())
    with pytest.raises(ValueError, match="call"):
        call_share(_frame(rng))
    with pytest.raises(ValueError, match="available"):
        call_share(calls[0], group="image:7")
