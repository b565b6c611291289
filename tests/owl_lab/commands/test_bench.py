"""``owl-lab bench``'s timing schedule and paired ratios (the command itself: tests/hooks/test_bench.py)."""

from __future__ import annotations

import math

from owl_lab.commands.bench import paired_ratios, round_order


def test_plain_and_capture_swap_places_every_round_and_eager_runs_last():
    modes = ["plain", "capture", "eager"]
    assert round_order(modes, 0) == ["plain", "capture", "eager"]
    assert round_order(modes, 1) == ["capture", "plain", "eager"]
    assert round_order(modes, 2) == ["plain", "capture", "eager"]
    assert round_order(["plain", "capture"], 3) == ["capture", "plain"]


def test_paired_ratios_pair_each_round_with_the_same_rounds_plain_time():
    plain = [1.0, 2.0, 1.0, 4.0]  # load drifts between rounds; each pair sees the same load
    capture = [1.2, 2.2, 1.3, 4.4]
    r = paired_ratios(capture, plain)
    assert math.isclose(r["ratio_min"], 1.1) and math.isclose(r["ratio_max"], 1.3)
    assert math.isclose(r["ratio_median"], (1.1 + 1.2) / 2)  # even count: mean of the middle two
    assert math.isclose(paired_ratios([3.0, 1.0, 2.0], [1.0, 1.0, 1.0])["ratio_median"], 2.0)
    # best / best would say 1.2 / 1.0 here; the pairs say capture costs 10-30 % per round
    assert paired_ratios(plain, plain) == {"ratio_median": 1.0, "ratio_min": 1.0, "ratio_max": 1.0}


def test_paired_ratios_of_a_failed_mode_are_nan():
    r = paired_ratios([], [1.0, 1.0])
    assert all(math.isnan(v) for v in r.values())
    assert math.isnan(paired_ratios([math.nan], [1.0])["ratio_median"])
