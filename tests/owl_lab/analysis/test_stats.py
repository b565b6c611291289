"""owl_lab.analysis.stats: binomial and paired standard errors of accuracy differences."""

from __future__ import annotations

import math

import pytest

from owl_lab.analysis.stats import binomial_se, paired_difference


def test_binomial_se_from_flags_and_from_percent():
    flags = [True] * 30 + [False] * 70
    assert binomial_se(flags) == pytest.approx(100 * math.sqrt(0.3 * 0.7 / 100))
    assert binomial_se(30.0, 100) == pytest.approx(binomial_se(flags))
    assert binomial_se([1, 1, 1]) == 0.0
    with pytest.raises(ValueError, match="percentage"):
        binomial_se(130, 10)
    with pytest.raises(ValueError, match="empty"):
        binomial_se([])


def test_paired_difference_counts_only_discordant_pairs():
    # 10 examples: a wins 3, b wins 1, 6 ties → diff 20 points
    a = [1, 1, 1, 0, 1, 1, 0, 0, 1, 0]
    b = [0, 0, 0, 1, 1, 1, 0, 0, 1, 0]
    r = paired_difference(a, b)
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(d) / 10
    se = 100 * math.sqrt(sum((x - mean) ** 2 for x in d) / 9 / 10)
    assert r["diff"] == pytest.approx(20.0) and r["se"] == pytest.approx(se)
    assert r["a"] == pytest.approx(60.0) and r["b"] == pytest.approx(40.0)
    assert r["z"] == pytest.approx(20.0 / se) and r["beyond_noise"] is (20.0 > 2 * se)
    assert r["se_unpaired"] > r["se"]  # the shared ties make pairing tighter here


def test_paired_difference_identical_and_clear_cases():
    same = paired_difference([1, 0, 1], [1, 0, 1])
    assert same["diff"] == 0 and same["se"] == 0 and same["z"] == 0 and not same["beyond_noise"]
    clear = paired_difference([1] * 50, [0] * 50)
    assert clear["diff"] == 100 and clear["z"] == math.inf and clear["beyond_noise"]
    small = paired_difference([1, 0] * 50, [0, 1] * 50)  # 50 vs 50 with all pairs discordant
    assert not small["beyond_noise"]
    drops = paired_difference([0, -1, -1, 0], [-1, -1, -1, -1])  # per-example drops, not flags
    assert drops["diff"] == pytest.approx(50.0) and drops["a"] == pytest.approx(-50.0)
    with pytest.raises(ValueError, match="same length"):
        paired_difference([1, 0], [1])
