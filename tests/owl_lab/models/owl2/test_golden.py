"""Equivalence with the official mPLUG-Owl2 numbers (goldens/owl2-tiny-a) and the 7B key manifest."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from owl_lab.models.owl2 import Owl2Config, Owl2ForCausalLM, load_checkpoint, read_state_dict

ATOL = 1e-5
PROB_ATOL = 2e-6  # the golden README's suggestion for attention probabilities


def close(name, mine, golden, errors):
    mine = mine.detach().float()
    assert mine.shape == golden.shape, f"{name}: shape {list(mine.shape)} vs golden {list(golden.shape)}"
    err = (mine - golden.float()).abs().max().item()
    errors[name] = err
    atol = PROB_ATOL if "attentions" in name else ATOL
    torch.testing.assert_close(mine, golden.float(), rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def golden(owl2_golden_dir):
    model, processor = load_checkpoint(owl2_golden_dir)
    return {
        "model": model,
        "processor": processor,
        "inputs": load_file(str(owl2_golden_dir / "inputs.safetensors")),
        "outputs": load_file(str(owl2_golden_dir / "outputs.safetensors")),
        "errors": {},
    }


def test_loads_eval_fp32_without_processor(golden):
    model = golden["model"]
    assert golden["processor"] is None  # the golden folder has no tokenizer files
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.modality_adaptive is True  # absent from the official config


def test_recomputed_buffers_match_official_values(golden, owl2_golden_dir):
    buffers = load_file(str(owl2_golden_dir / "buffers.safetensors"))
    ours = dict(golden["model"].named_buffers())
    pos = {k: v for k, v in buffers.items() if "pos_embed" in k}
    assert len(pos) == 4
    for k, v in pos.items():
        assert torch.equal(ours[k], v), k  # bit-exact sin-cos tables
    inv = golden["model"].model.rotary_emb.inv_freq
    for k, v in buffers.items():
        if k.endswith("inv_freq"):
            torch.testing.assert_close(inv, v, rtol=0, atol=0)


def test_vision_tower(golden):
    out, x, err = golden["outputs"], golden["inputs"]["pixel_values"], golden["errors"]
    with torch.no_grad():
        vo = golden["model"].model.vision_model(x, output_attentions=True, output_hidden_states=True)
    for i in range(3):
        close(f"vision.hidden_states.{i}", vo.hidden_states[i], out[f"vision.hidden_states.{i}"], err)
    for i in range(2):
        close(f"vision.attentions.{i}", vo.attentions[i], out[f"vision.attentions.{i}"], err)
    close("vision.last_hidden_state", vo.last_hidden_state, out["vision.last_hidden_state"], err)
    close("vision.pooler_output", vo.pooler_output, out["vision.pooler_output"], err)


def test_abstractor_under_no_grad(golden):
    out, x, err = golden["outputs"], golden["inputs"]["pixel_values"], golden["errors"]
    model = golden["model"].model
    with torch.no_grad():  # the official save_attention hook crashes here
        ao = model.visual_abstractor(model.vision_model(x).last_hidden_state, output_attentions=True)
    for i in range(2):
        close(f"abstractor.layer_outputs.{i}", ao.layer_outputs[i], out[f"abstractor.layer_outputs.{i}"], err)
        close(f"abstractor.attentions.{i}", ao.attentions[i], out[f"abstractor.attentions.{i}"], err)
    close("abstractor.output", ao.features, out["abstractor.output"], err)
    torch.testing.assert_close(model.encode_images(x), ao.features, rtol=0, atol=0)


def test_sequence_building(golden):
    inp, out, err = golden["inputs"], golden["outputs"], golden["errors"]
    with torch.no_grad():
        seq = golden["model"].model.build_sequence(
            inp["input_ids"], inp["pixel_values"], inp["attention_mask"]
        )
    assert torch.equal(seq.modality_indicators, out["llm.modality_indicators"])
    assert torch.equal(seq.attention_mask, out["llm.attention_mask"])
    close("llm.inputs_embeds", seq.inputs_embeds, out["llm.inputs_embeds"], err)
    assert seq.image_index[0, 3:12].eq(0).all() and seq.image_index[1, 1:10].eq(0).all()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_multimodal_forward(golden, impl):
    inp, out, err = golden["inputs"], golden["outputs"], golden["errors"]
    model = golden["model"]
    model.config._attn_implementation = impl
    try:
        with torch.no_grad():
            o = model(
                input_ids=inp["input_ids"],
                attention_mask=inp["attention_mask"],
                images=inp["pixel_values"],
                output_attentions=impl == "eager",
                output_hidden_states=True,
                use_cache=False,
            )
    finally:
        model.config._attn_implementation = "sdpa"
    suffix = "" if impl == "eager" else f" ({impl})"
    close("logits" + suffix, o.logits, out["logits"], err)  # every position, pads included
    assert len(o.hidden_states) == 3
    for i in range(3):
        close(f"llm.hidden_states.{i}" + suffix, o.hidden_states[i], out[f"llm.hidden_states.{i}"], err)
    if impl == "eager":
        for i in range(2):
            close(f"llm.attentions.{i}", o.attentions[i], out[f"llm.attentions.{i}"], err)


def test_text_only_forward(golden):
    inp, out, err = golden["inputs"], golden["outputs"], golden["errors"]
    with torch.no_grad():
        o = golden["model"](
            input_ids=inp["text_input_ids"],
            attention_mask=inp["text_attention_mask"],
            output_attentions=True,
            output_hidden_states=True,
        )
    close("text.logits", o.logits, out["text.logits"], err)
    for i in range(3):
        close(f"text.hidden_states.{i}", o.hidden_states[i], out[f"text.hidden_states.{i}"], err)
    for i in range(2):
        close(f"text.attentions.{i}", o.attentions[i], out[f"text.attentions.{i}"], err)


def test_greedy_generation(golden):
    inp, out, err = golden["inputs"], golden["outputs"], golden["errors"]
    with torch.no_grad():  # exactly the official call: no attention_mask, images=
        g = golden["model"].generate(
            inp["input_ids"][0:1],
            images=inp["pixel_values"][0:1],
            do_sample=False,
            num_beams=1,
            max_new_tokens=5,
            use_cache=True,
            output_scores=True,
            return_dict_in_generate=True,
        )
    assert torch.equal(g.sequences, out["generate.sequences"])
    assert torch.equal(g.sequences[:, -5:], out["generate.new_tokens"])
    close("generate.step_logits", torch.stack(g.scores), out["generate.step_logits"], err)


def test_real_checkpoint_layout_with_inv_freq_loads(golden, owl2_golden_dir, tmp_path):
    """The real HF checkpoint carries rotary_emb.inv_freq: merge them in; loading must ignore them."""
    state = load_file(str(owl2_golden_dir / "model.safetensors"))
    buffers = load_file(str(owl2_golden_dir / "buffers.safetensors"))
    inv = {k: v for k, v in buffers.items() if k.endswith("rotary_emb.inv_freq")}
    assert len(inv) == 2
    save_file({**state, **inv}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(owl2_golden_dir / "config.json", tmp_path / "config.json")
    model, _ = load_checkpoint(tmp_path)
    inp = golden["inputs"]
    with torch.no_grad():
        logits = model(
            input_ids=inp["input_ids"], attention_mask=inp["attention_mask"], pixel_values=inp["pixel_values"]
        ).logits
    torch.testing.assert_close(logits, golden["outputs"]["logits"], rtol=0, atol=ATOL)


def test_sharded_bin_checkpoint_loads(golden, owl2_golden_dir, tmp_path):
    """The official release format: pickle shards + pytorch_model.bin.index.json (bf16 storage)."""
    import json

    state = read_state_dict(owl2_golden_dir)
    names = sorted(state)
    shards = {
        "pytorch_model-1-of-2.bin": names[: len(names) // 2],
        "pytorch_model-2-of-2.bin": names[len(names) // 2 :],
    }
    weight_map = {}
    for fname, keys in shards.items():
        torch.save({k: state[k].to(torch.bfloat16) for k in keys}, tmp_path / fname)
        weight_map.update({k: fname for k in keys})
    (tmp_path / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    shutil.copy(owl2_golden_dir / "config.json", tmp_path / "config.json")
    model, _ = load_checkpoint(tmp_path)
    assert model.dtype == torch.float32
    assert torch.equal(model.lm_head.weight, state["lm_head.weight"].to(torch.bfloat16).float())
    auto, _ = load_checkpoint(tmp_path, torch_dtype="auto")
    assert auto.dtype == torch.bfloat16


def test_sharded_safetensors_checkpoint_loads(golden, owl2_golden_dir, tmp_path):
    import json

    state = read_state_dict(owl2_golden_dir)
    names = sorted(state)
    weight_map = {}
    for i, keys in enumerate((names[:40], names[40:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in keys}, str(tmp_path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    shutil.copy(owl2_golden_dir / "config.json", tmp_path / "config.json")
    model, _ = load_checkpoint(tmp_path)
    inp = golden["inputs"]
    with torch.no_grad():
        logits = model(input_ids=inp["text_input_ids"]).logits
    torch.testing.assert_close(logits, golden["outputs"]["text.logits"], rtol=0, atol=ATOL)


def _normalise(key: str) -> str:
    return re.sub(r"\.\d+\.", ".N.", key)


def test_7b_meta_keys_match_manifest(reference_dir):
    rows = (reference_dir / "owl2" / "keys-mplug-owl2-llama2-7b.tsv").read_text().strip().splitlines()
    manifest = {}
    for row in rows:
        key, shape, kind, in_checkpoint = row.split("\t")
        if key == "key":
            continue
        manifest[key] = [int(s) for s in re.findall(r"\d+", shape)]
    assert len(manifest) == 894
    omitted = {k for k in manifest if k.endswith(("rotary_emb.inv_freq", "q_pos_embed", "k_pos_embed"))}
    assert len(omitted) == 32 + 12
    with torch.device("meta"):
        model = Owl2ForCausalLM(Owl2Config())
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = {k: v for k, v in manifest.items() if k not in omitted}
    assert sorted(ours) == sorted(expected)
    assert ours == expected
    # the sin-cos tables exist as (non-persistent) buffers with the manifest's shapes
    buffers = dict(model.named_buffers())
    for k in omitted - {k for k in omitted if k.endswith("inv_freq")}:
        assert list(buffers[k].shape) == manifest[k]
    assert sum(p.numel() for p in model.parameters()) == 8_197_859_328  # SPEC §0: the paper's "8.2B"


def test_report_golden_errors(golden):
    """Runs last in this file: prints the max-abs-error table (pytest -s shows it)."""
    errors = golden["errors"]
    assert len(errors) >= 30, sorted(errors)
    width = max(map(len, errors))
    print("\nowl2-tiny-a golden max |Δ|:")
    for name, err in sorted(errors.items()):
        print(f"  {name:<{width}}  {err:.3e}")
    assert max(errors.values()) <= ATOL
