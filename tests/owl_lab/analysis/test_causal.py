"""The verdict rule of the causal notebooks and the position groups."""

from __future__ import annotations

import pytest

from owl_lab.analysis.causal import mean_se, verdict


def test_verdict_rule():
    assert verdict([(1.0, 0.1, 60), (0.5, 0.2, 60)]) == "reproduced"
    assert verdict([(-1.0, 0.1, 60), (-0.5, 0.2, 60)]) == "opposite"
    assert verdict([(0.1, 0.1, 60), (-0.1, 0.1, 60)]) == "not reproduced"
    assert verdict([(0.1, 0.1, 20), (-0.1, 0.1, 60)]) == "inconclusive"  # too few to rule it out
    assert verdict([(1.0, 0.1, 60), (0.1, 0.1, 60)]) == "inconclusive"  # seeds disagree
    # a stated cut-off is judged on the margin over it (findings' rule, as for "above chance"):
    # 0.3 ± 0.01 is clearly below 0.5 -> opposite; one seed within noise of it, one below -> not reproduced
    assert verdict([(0.3, 0.01, 60), (0.3, 0.01, 60)], threshold=0.5) == "opposite"
    assert verdict([(0.45, 0.05, 60), (0.3, 0.01, 60)], threshold=0.5) == "not reproduced"
    assert verdict([(0.45, 0.05, 20), (0.3, 0.01, 60)], threshold=0.5) == "inconclusive"
    assert verdict([(0.8, 0.01, 60), (0.7, 0.05, 60)], threshold=0.5) == "reproduced"
    # the same answers as findings.judge on the same effects
    from owl_lab.analysis.findings import Effect, judge

    cases = [[(0.2, 0.05, 60), (0.02, 0.05, 60)], [(0.2, 0.05, 60)], [(-0.2, 0.05, 10), (0.0, 0.1, 60)]]
    for case in cases:
        assert verdict(case) == judge([Effect(m, se, n) for m, se, n in case])[0]
    with pytest.raises(ValueError):
        verdict([])


def test_mean_se():
    m, se, n = mean_se([1.0, 2.0, 3.0])
    assert (m, n) == (2.0, 3) and abs(se - (1 / 3) ** 0.5) < 1e-12
