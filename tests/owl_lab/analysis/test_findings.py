"""The one verdict rule of owl_lab.analysis.findings, case by case."""

import pandas as pd
import pytest

from owl_lab.analysis.findings import Effect, finding, findings_table, from_paired, from_samples, judge
from owl_lab.analysis.stats import paired_difference


def E(value, se=1.0, n=200, label=""):
    return Effect(value, se, n, label)


@pytest.mark.parametrize(
    "effects, verdict",
    [
        ([E(3.0), E(2.5)], "reproduced"),  # both beyond 2 SE for the claim
        ([E(-3.0), E(-2.5)], "opposite"),  # both beyond 2 SE against
        ([E(3.0), E(-3.0)], "inconclusive"),  # opposite signs across seeds (notebook 03's MAM shift)
        ([E(3.0), E(1.0)], "inconclusive"),  # one seed for, one within noise
        ([E(0.5), E(-1.0)], "not reproduced"),  # both within noise, enough data
        ([E(-3.0), E(1.0)], "not reproduced"),  # against and noise: not all against, none for
        ([E(2.0), E(2.0)], "not reproduced"),  # exactly 2 SE is not beyond 2 SE
        ([E(0.5, n=20), E(-1.0)], "inconclusive"),  # a null on too few examples could have missed it
    ],
)
def test_the_rule(effects, verdict):
    assert judge(effects)[0] == verdict


def test_a_null_counts_as_not_reproduced_only_if_it_excludes_the_claimed_size():
    assert judge([E(0.5), E(0.0)], expected=5.0)[0] == "not reproduced"  # upper bounds 2.5, 2.0 < 5
    assert judge([E(0.5), E(0.0)], expected=2.2)[0] == "inconclusive"  # 2.5 ≥ 2.2: could have been it


def test_caveats_flag_one_seed_and_few_examples():
    assert judge([E(5.0)])[1] == ["one seed"]
    assert judge([E(5.0, n=12), E(5.0)])[1] == ["n < 50"]
    assert judge([E(5.0), E(5.0)])[1] == []


def test_bad_input_raises():
    with pytest.raises(ValueError):
        judge([])
    with pytest.raises(ValueError):
        Effect(1.0, -0.1, 10)
    with pytest.raises(ValueError):
        Effect(float("nan"), 0.1, 10)
    with pytest.raises(ValueError):
        judge([E(1.0)], expected=-1.0)
    with pytest.raises(ValueError):
        finding("c", "s", [E(3.0)], {"holds": "x"})


def test_effects_from_paired_flags_and_samples():
    d = paired_difference([1, 1, 1, 0], [0, 1, 0, 0])
    e = from_paired(d, "seed 0", sign=-1)
    assert e.value == pytest.approx(-50.0) and e.se == pytest.approx(d["se"]) and e.n == 4
    s = from_samples([1.0, 2.0, 3.0])
    assert s.value == pytest.approx(2.0) and s.se == pytest.approx(1 / 3**0.5)


def test_the_interpretation_follows_the_computed_verdict():
    text = {"reproduced": "it holds", "inconclusive": "seeds disagree"}
    assert finding("c", "s", [E(3.0), E(3.0)], text).interpretation == "it holds"
    assert finding("c", "s", [E(3.0), E(-3.0)], text).interpretation == "seeds disagree"
    assert "no sentence" in finding("c", "s", [E(-3.0), E(-3.0)], text).interpretation


def test_findings_table_columns_and_printed_text(capsys):
    rows = [
        finding(
            "the MAM helps images",
            "Owl2 Table 5",
            [E(4.345, 0.61, 2000, "seed 0"), E(2.1, 0.6, 2000, "seed 1")],
            "the gain survives a retrain",
        ),
        finding("x rises", "exploration", [E(0.0971, 0.0142, 24, "seed 0")], "one draw", digits=3),
    ]
    table = findings_table(rows)
    assert isinstance(table, pd.DataFrame)
    assert list(table.columns) == [
        "claim",
        "source",
        "ours",
        "n",
        "seeds",
        "verdict",
        "caveats",
        "interpretation",
    ]
    assert table.loc[0, "ours"] == "+4.3 ± 0.6 (seed 0); +2.1 ± 0.6 (seed 1)"
    assert table.loc[0, "verdict"] == "reproduced" and table.loc[0, "seeds"] == "2 of 2 for"
    assert table.loc[1, "ours"] == "+0.097 ± 0.014 (seed 0)" and table.loc[1, "caveats"] == "one seed, n < 50"
    out = capsys.readouterr().out
    assert "1. the MAM helps images [Owl2 Table 5]" in out
    assert "   verdict: reproduced (2 of 2 for)" in out
    assert "verdict: reproduced (1 of 1 for); caveat: one seed, n < 50" in out


def test_printed_findings_parse_back(capsys):
    from owl_lab.analysis.findings import parse_findings

    rows = [
        finding(
            "a claim [with brackets]",
            "Owl3 Table 10 (GQA +2.4)",
            [E(3.0, 1.0, 40, "seed 0"), E(-3.0)],
            "seeds disagree",
        ),
        finding("b", "Owl2 Fig. 4", [E(5.0)], "holds"),
    ]
    table = findings_table(rows)
    parsed = parse_findings(capsys.readouterr().out)
    assert [p["claim"] for p in parsed] == ["a claim [with brackets]", "b"]
    assert parsed[0]["source"] == "Owl3 Table 10 (GQA +2.4)"
    for p, (_, r) in zip(parsed, table.iterrows(), strict=True):
        assert (p["ours"], p["n"], p["verdict"], p["seeds"], p["caveats"], p["interpretation"]) == (
            r["ours"],
            r["n"],
            r["verdict"],
            r["seeds"],
            r["caveats"],
            r["interpretation"],
        )
    assert parsed[0]["verdict"] == "inconclusive" and parsed[0]["caveats"] == "n < 50"


def test_per_model_judges_each_model_on_its_own_seeds():
    from owl_lab.analysis.findings import SEEDS_TEXT, per_model

    values = {"a0": [3.0, 3.1, 2.9], "a1": [2.0, 2.2, 1.8], "b0": [1.0, -1.0, 0.5], "b1": [-3.0, -3.1, -2.9]}
    rows = per_model("x rises", "method check", {"A": ["a0", "a1"], "B": ["b0", "b1"]}, values.__getitem__)
    assert [r.claim for r in rows] == ["x rises — A", "x rises — B"]
    assert [r.verdict for r in rows] == ["reproduced", "inconclusive"]
    assert [e.label for e in rows[0].effects] == ["seed 0", "seed 1"]
    assert rows[0].effects[1].value == pytest.approx(2.0) and rows[0].effects[1].n == 3
    assert rows[0].interpretation == SEEDS_TEXT["reproduced"]


def test_per_model_keeps_ready_effects_and_rejects_bad_checkpoints():
    from owl_lab.analysis.findings import per_model

    rows = per_model("r > 0", "lab", {"A": ["x", "y"]}, lambda name: E(0.5, 0.1, 80), expected=None)
    assert [(e.value, e.se, e.n, e.label) for e in rows[0].effects] == [
        (0.5, 0.1, 80, "seed 0"),
        (0.5, 0.1, 80, "seed 1"),
    ]
    with pytest.raises(ValueError):
        per_model("c", "s", {}, lambda name: [1.0])
    with pytest.raises(ValueError):
        per_model("c", "s", {"A": "owl2-tiny"}, lambda name: [1.0])
