"""Checkpoint resolution, family detection of directories, and load_owl's options (owl_lab.zoo)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import owl_lab
from owl_lab import zoo


def test_detects_owl2_and_owl3_goldens(owl2_golden_dir, owl3_golden_dir):
    assert zoo.detect_family(owl2_golden_dir) == "owl2"
    assert zoo.detect_family(owl3_golden_dir) == "owl3"
    assert owl_lab.detect_family is zoo.detect_family  # public API: a directory (or shipped name)


def test_detects_family_from_keys_when_config_is_silent(owl3_golden_dir, tmp_path):
    shutil.copy(owl3_golden_dir / "model.safetensors", tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    assert zoo.detect_family(tmp_path) == "owl3"


def test_unknown_family_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="Unknown model family.*llama.*owl2.*owl3"):
        zoo.detect_family(tmp_path)


def test_unknown_name_lists_shipped_checkpoints():
    with pytest.raises(FileNotFoundError, match="Shipped checkpoints"):
        zoo.resolve_checkpoint("no-such-owl")


def test_checkpoint_keys_reads_headers_only(owl2_golden_dir):
    keys = zoo.checkpoint_keys(owl2_golden_dir)
    assert "model.visual_abstractor.vit_eos" in keys
    assert len(keys) == 108  # the golden README's count (buffers omitted)


@pytest.mark.parametrize("golden", ["owl2_golden_dir", "owl3_golden_dir"])
def test_dtype_auto_keeps_a_bf16_checkpoint_bf16(golden, request, tmp_path):
    model, _ = zoo.load_owl(request.getfixturevalue(golden))
    assert model.dtype == torch.float32  # the default stays fp32
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    auto, _ = zoo.load_owl(tmp_path, dtype="auto")
    assert auto.dtype == torch.bfloat16 and auto.config.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in auto.parameters())
    alias, _ = zoo.load_owl(tmp_path, torch_dtype="auto")  # torch_dtype is dtype's alias
    assert alias.dtype == torch.bfloat16
    wide, _ = zoo.load_owl(tmp_path, dtype="float32")
    assert wide.dtype == torch.float32
    with pytest.raises(ValueError, match="not both"):
        zoo.load_owl(tmp_path, dtype="float32", torch_dtype="bfloat16")
    with pytest.raises(ValueError, match="dtype must be"):
        zoo.load_owl(tmp_path, dtype="float77")


@pytest.mark.parametrize("golden", ["owl2_golden_dir", "owl3_golden_dir"])
def test_dict_device_map_means_one_device_for_both_families(golden, request):
    directory = request.getfixturevalue(golden)
    model, _ = zoo.load_owl(directory, device_map={"": "cpu"})
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert {b.device.type for b in model.buffers()} == {"cpu"}
    model, _ = zoo.load_owl(directory, device_map="cpu")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    # several devices means accelerate dispatch (tests/owl_lab/test_dispatch.py);
    # 'meta' is no place for weights
    with pytest.raises(ValueError, match="'meta' holds no weights"):
        zoo.load_owl(directory, device_map={"model.layers.0": "cpu", "lm_head": "meta"})


@pytest.mark.parametrize("golden", ["owl2_golden_dir", "owl3_golden_dir"])
def test_attn_implementation_passes_through(golden, request):
    directory = request.getfixturevalue(golden)
    eager, _ = zoo.load_owl(directory, attn_implementation="eager")
    sdpa, _ = zoo.load_owl(directory, attn_implementation="sdpa")
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match=r"'flash_attention_2' is not supported.*\('eager', 'sdpa'\)"):
        zoo.load_owl(directory, attn_implementation="flash_attention_2")


def test_native_render_size_reads_the_recipe_world(tmp_path):
    assert zoo.native_render_size("owl2-tiny") == 112
    (tmp_path / "recipe.json").write_text(json.dumps({"world": {"render_size": 96}}))
    assert zoo.native_render_size(tmp_path) == 96
    (tmp_path / "recipe.json").write_text(json.dumps({"world": {}}))
    assert zoo.native_render_size(tmp_path, default=84) == 84
    (tmp_path / "recipe.json").unlink()
    assert zoo.native_render_size(tmp_path) == 112
