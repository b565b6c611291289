"""Checkpoint resolution and family detection (owl_lab.zoo)."""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest

from owl_lab import zoo


def test_detects_owl2_and_owl3_goldens(owl2_golden_dir, owl3_golden_dir):
    assert zoo.detect_family(owl2_golden_dir) == "owl2"
    assert zoo.detect_family(owl3_golden_dir) == "owl3"


def test_detects_family_from_keys_when_config_is_silent(owl3_golden_dir, tmp_path):
    shutil.copy(owl3_golden_dir / "model.safetensors", tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    assert zoo.detect_family(tmp_path) == "owl3"


def test_unknown_family_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="Unknown model family.*llama"):
        zoo.detect_family(tmp_path)


def test_unknown_name_lists_shipped_checkpoints():
    with pytest.raises(FileNotFoundError, match="Shipped checkpoints"):
        zoo.resolve_checkpoint("no-such-owl")


def test_checkpoint_keys_reads_headers_only(owl2_golden_dir):
    keys = zoo.checkpoint_keys(owl2_golden_dir)
    assert "model.visual_abstractor.vit_eos" in keys
    assert len(keys) == 108  # the golden README's count (buffers omitted)


def test_model_family_reads_the_config_and_names_what_it_got():
    def model(model_type):
        return SimpleNamespace(config=SimpleNamespace(model_type=model_type))

    assert zoo.model_family(model("mplug_owl2")) == "owl2"
    assert zoo.model_family(model("mplugowl3")) == "owl3"

    class Stranger:
        class config:
            model_type = "llama"

    with pytest.raises(ValueError, match="Stranger with model_type='llama'"):
        zoo.model_family(Stranger())
    with pytest.raises(ValueError, match="model_type=None"):
        zoo.model_family(object())
