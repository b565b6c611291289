"""Speed of the text-only decoder vs stock LlamaForCausalLM (slow; opt in with OWL_LAB_BENCH=1).

The full comparison (hidden 512, 8 layers, L=512) is ``python -m owl_lab.models.owl2.benchmark_owl2``.
"""

from __future__ import annotations

import os

import pytest

from owl_lab.models.owl2.benchmark_owl2 import run


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("OWL_LAB_BENCH"), reason="timing benchmark; set OWL_LAB_BENCH=1")
def test_text_only_decoder_is_as_fast_as_stock_llama():
    r = run(hidden=256, layers=4, length=256, repeats=7, vocab=8000)
    print(r)
    assert r["max_abs_diff"] == 0.0  # the text path is LLaMA, bit for bit
    assert r["ratio"] >= 0.9
