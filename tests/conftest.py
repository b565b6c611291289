"""Shared pytest fixtures: where the reference goldens are, and deterministic CPU settings."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _find_reference() -> Path:
    env = os.environ.get("OWL_LAB_REFERENCE")
    candidates = [Path(env)] if env else []
    candidates.append(PROJECT_ROOT.parent / "shared" / "reference")
    for c in candidates:
        if c.is_dir():
            return c
    raise FileNotFoundError(
        "The golden fixtures were not found: expected ../shared/reference beside the project "
        "(or set OWL_LAB_REFERENCE)."
    )


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """``shared/reference`` (owl2/, owl3/ with SPEC.md, key manifests and goldens)."""
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
