"""Slow benchmark: one forward with 32 images on a mid-size random Owl3 (fresh process for max RSS).

Not part of the default run (about a minute on 2 shared cores): ``pytest -m slow tests/owl_lab/models/owl3``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("kind", ("gated", "fused"))
def test_32_image_forward_time_and_memory(kind, request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("benchmark: select it with -m slow")
    proc = subprocess.run(
        [sys.executable, "-m", "owl_lab.models.owl3.bench_owl3", "--images", "32", "--kind", kind],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(result)
    assert result["image_keys"] == 32 * 256
    # image K/V are never materialised per query: the forward itself stays well under 1 GB
    assert result["peak_rss_MB"] - result["rss_before_MB"] < 1024
