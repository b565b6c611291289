"""Shared pytest fixtures: where the reference goldens are, and deterministic CPU settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# CI runs the property tests on a fixed sequence of examples, so a run is reproducible; set
# HYPOTHESIS_PROFILE=explore locally to draw fresh examples.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _find_reference() -> Path:
    env = os.environ.get("OWL_LAB_REFERENCE")
    candidates = [Path(env)] if env else []
    candidates.append(PROJECT_ROOT / "tests" / "fixtures" / "reference")
    for c in candidates:
        if c.is_dir():
            return c
    raise FileNotFoundError(
        "The golden fixtures were not found: expected tests/fixtures/reference inside the project "
        "(or set OWL_LAB_REFERENCE to another directory of the same layout)."
    )


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """``tests/fixtures/reference`` (owl2/, owl3/ with key manifests and goldens), or
    ``$OWL_LAB_REFERENCE``. The architecture notes the code cites are in ``data/reference/``."""
    return _find_reference()


@pytest.fixture(scope="session")
def owl2_golden_dir(reference_dir) -> Path:
    return reference_dir / "owl2" / "goldens" / "owl2-tiny-a"


@pytest.fixture(scope="session")
def owl3_golden_dir(reference_dir) -> Path:
    return reference_dir / "owl3" / "goldens" / "owl3-tiny-a"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of tiny-model tests: far faster and more stable on a shared
    CPU (threads only add overhead on such small tensors). Restored afterwards. Folders opt in with an
    autouse fixture that requests this one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_configs() -> dict[str, dict]:
    """Config kwargs (no vocabulary / special ids) of tiny Owl2 and Owl3 (gated) models: 2 decoder
    layers, 28-px images on a 4×4 patch grid. Shared by the analysis tests and the widget checkpoints;
    treat as read-only (``{**tiny_configs[family], **overrides}`` for variants)."""
    vision = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, image_size=28, patch_size=7)
    return {
        "owl2": dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=256,
            visual_config={
                "visual_model": dict(vision, num_hidden_layers=1, hidden_act="quick_gelu"),
                "visual_abstractor": dict(
                    hidden_size=16,
                    encoder_hidden_size=16,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    intermediate_size=32,
                    num_learnable_queries=4,
                    grid_size=4,
                ),
            },
        ),
        "owl3": dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            hyper_layers=[1],
            hyper_attention="gated",
            projector="linear",
            tie_word_embeddings=False,
            vision_config=dict(vision, num_hidden_layers=2),
        ),
    }
