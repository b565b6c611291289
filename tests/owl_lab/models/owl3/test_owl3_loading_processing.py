"""Owl3 checkpoint I/O (save_pretrained / load_checkpoint / Auto classes, tolerated and reported key
differences, shards, tied embeddings) and the processor (templates, cutting, formats, labels)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from owl_lab import load_owl
from owl_lab.models.owl3 import Owl3ForCausalLM, Owl3Processor, load_checkpoint
from owl_lab.models.owl3.processing_owl3 import cut_prompt, select_anchor


def saved(tmp_path, model, processor=None):
    model.save_pretrained(tmp_path)
    if processor is not None:
        processor.save_pretrained(tmp_path)
    return tmp_path


def logits(model, ids, pixels, media):
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels, media_offset=media).logits


@pytest.mark.parametrize("kind", ("gated", "static_gate", "fused", "sum"))
def test_save_then_load_roundtrip(tmp_path, owl3, make_processor, kind):
    model = owl3.model(kind, seed=20, mi_rope=kind != "sum")
    processor = make_processor(model)
    saved(tmp_path, model, processor)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "mplugowl3" and config["hyper_attention"] == kind
    assert config["hyper_layers"] == [1, 3] and config["rope_theta"] == 1e6
    loaded, proc = load_checkpoint(tmp_path)
    assert not loaded.training and loaded.dtype == torch.float32 and loaded.config.mi_rope == (kind != "sum")
    batch = proc("<|image|>what is it ?", images=owl3.images(1))
    assert proc.media_offset_format == ("list" if kind == "fused" else "dense")
    assert torch.equal(
        logits(model, batch["input_ids"], batch["pixel_values"], batch["media_offset"]),
        logits(loaded, batch["input_ids"], batch["pixel_values"], batch["media_offset"]),
    )
    auto = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(auto) is Owl3ForCausalLM and isinstance(
        AutoConfig.from_pretrained(tmp_path), type(model.config)
    )
    assert torch.equal(
        logits(auto, batch["input_ids"], batch["pixel_values"], batch["media_offset"]),
        logits(model, batch["input_ids"], batch["pixel_values"], batch["media_offset"]),
    )
    via_zoo, _ = load_owl(tmp_path)
    assert type(via_zoo) is Owl3ForCausalLM


def test_official_layout_tied_sharded_and_tolerated_keys(tmp_path, owl3):
    """Official-style config (no owl-lab fields), tied lm_head absent, no SigLIP head, 2 shards."""
    model = owl3.model("static_gate", seed=21, tie_word_embeddings=True)
    assert model.language_model.lm_head.weight is model.language_model.model.embed_tokens.weight
    state = {
        k: v.clone()
        for k, v in model.state_dict().items()
        if not k.startswith(("vision_model.head.", "vision_model.post_layernorm."))
        and k != "language_model.lm_head.weight"
    }
    names = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / file))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}})
    )
    config = model.config.to_dict()
    for field in ("hyper_attention", "projector", "mi_rope"):
        config.pop(field)
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded, processor = load_checkpoint(tmp_path)
    assert processor is None
    assert loaded.config.hyper_attention == "static_gate" and loaded.config.projector == "linear"
    assert loaded.language_model.lm_head.weight is loaded.language_model.model.embed_tokens.weight
    ids, pixels, media = torch.randint(1, 390, (1, 9)), torch.randn(1, 3, 28, 28), [torch.tensor([2])]
    assert torch.equal(logits(model, ids, pixels, media), logits(loaded, ids, pixels, media))
    assert not any(p.device.type == "meta" for p in loaded.parameters())


def test_key_mismatches_are_listed(tmp_path, owl3):
    model = owl3.model("gated", seed=22)
    saved(tmp_path, model)
    state = load_file(str(tmp_path / "model.safetensors"))
    state.pop("language_model.model.layers.1.mlp.up_proj.weight")
    state["language_model.model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    state["vision2text_model.bias"] = torch.zeros(7)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as err:
        load_checkpoint(tmp_path)
    msg = str(err.value)
    assert "layers.1.mlp.up_proj.weight" in msg and "self_attn.extra.weight" in msg
    assert "vision2text_model.bias: checkpoint (7,) vs model (32,)" in msg


def test_unknown_key_layout_is_an_error(tmp_path, owl3):
    model = owl3.model("gated", seed=23)
    saved(tmp_path, model)
    state = {k: v for k, v in load_file(str(tmp_path / "model.safetensors")).items() if "v_kv_proj" not in k}
    save_file(state, str(tmp_path / "model.safetensors"))
    config = json.loads((tmp_path / "config.json").read_text())
    del config["hyper_attention"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="Unknown mPLUG-Owl3 key layout"):
        load_checkpoint(tmp_path)


def test_cut_anchor_selection_and_prompts():
    assert select_anchor(400, 400, 14) == (2, 2)
    assert select_anchor(1200, 300, 14) == (1, 4)
    assert select_anchor(300, 900, 14) == (3, 1)
    assert select_anchor(600, 400, 14) == (2, 3)
    assert cut_prompt(1, 3, "v2") == (
        "Cut to 1 rows 3 columns with a global view\nsubimg(0,0)<|image|> "
        "subimg(0,1)<|image|> subimg(0,2)<|image|>\nglobal_view<|image|>"
    )
    assert (
        cut_prompt(2, 2, "v3")
        == "<|start_cut|>2*2\n<|image|> <|image|>\n<|image|> <|image|>\n<|image|><|end_cut|>"
    )


def test_processor_cutting_formats_labels_and_decode(tmp_path, owl3, make_processor):
    model = owl3.model("fused", seed=24)
    processor = make_processor(model, cut_enable=True)
    wide = Image.new("RGB", (120, 30), (200, 10, 10))
    batch = processor(["<|image|>and <|image|>", "plain text"], images=[wide, wide])
    assert batch["pixel_values"].shape == (5 + 5, 3, 28, 28)  # 1x4 tiles + global for each image
    assert [s.numel() for s in batch["media_offset"]] == [10, 0]
    starts = batch["media_offset"][0]
    assert torch.equal(batch["input_ids"][0, starts], torch.full((10,), 396))
    assert torch.allclose(
        batch["pixel_values"][0], torch.tensor([200 / 255, 10 / 255, 10 / 255])[:, None, None] * 2 - 1
    )
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()
    labelled = processor(
        ["<|image|>what color ?", "which shape ?"],
        images=[wide],
        answers=["red", "a circle"],
        cut_enable=False,
    )
    lab = labelled["labels"]
    assert (
        lab[0][lab[0] != -100].tolist()
        == processor.tokenizer("red<|im_end|>", add_special_tokens=False)["input_ids"]
    )
    assert lab[1][lab[1] != -100].tolist() == [221, 1, 397]  # "a", unknown word, <|im_end|>
    assert (lab[labelled["attention_mask"] == 0] == -100).all()
    assert processor.batch_decode(labelled["input_ids"][:, :4]) == ["<|im_start|> system \n <|im_end|>"] * 2
    assert model(**labelled).loss is not None
    processor.save_pretrained(tmp_path)
    again = Owl3Processor.from_pretrained(tmp_path)
    assert again.to_dict() == processor.to_dict()
    assert torch.equal(
        again("<|image|>hi", images=[wide])["input_ids"], processor("<|image|>hi", images=[wide])["input_ids"]
    )


def test_auto_classes_on_the_official_golden_folder(owl3_golden_dir):
    """The official config has no owl-lab fields: from_pretrained detects the variant from the keys;
    attn_implementation selects the eager path; torch_dtype casts weights but keeps RoPE tables fp32."""
    inp = load_file(str(owl3_golden_dir / "inputs.safetensors"))
    ref = load_file(str(owl3_golden_dir / "outputs.safetensors"))["mm.logits"]
    eager = AutoModelForCausalLM.from_pretrained(owl3_golden_dir, attn_implementation="eager")
    assert eager.config.hyper_attention == "gated" and eager.config._attn_implementation == "eager"
    out = logits(eager, inp["input_ids"], inp["pixel_values"], inp["media_offset"])
    assert (out - ref).abs().max() < 1e-5
    half, _ = load_checkpoint(owl3_golden_dir, torch_dtype=torch.bfloat16)
    assert (
        half.dtype == torch.bfloat16 and half.language_model.model.rotary_emb.inv_freq.dtype == torch.float32
    )
    out = logits(half, inp["input_ids"], inp["pixel_values"], inp["media_offset"])
    assert out.dtype == torch.float32 and (out - ref).abs().max() < 0.5


def test_processor_follow_up_turns_label_every_answer(owl3, make_processor):
    from owl_lab.models.owl3.processing_owl3 import ASSISTANT, USER

    processor = make_processor(owl3.model("gated", seed=3))
    im = Image.new("RGB", (30, 30), (10, 200, 10))
    one = processor(["<|image|>what color ?"], images=[im], answers=["red"])
    two = processor(
        ["<|image|>what color ?"], images=[im], answers=["red"], turns=[[("which shape ?", "a circle")]]
    )
    n = one["input_ids"].shape[1]
    assert torch.equal(two["input_ids"][0, :n], one["input_ids"][0]) and torch.equal(
        two["labels"][0, :n], one["labels"][0]
    )
    enc = lambda text: processor.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    ask = enc(USER.format("which shape ?")) + enc(ASSISTANT)
    assert two["input_ids"][0, n:].tolist() == ask + enc("a circle<|im_end|>")
    assert two["labels"][0, n:].tolist() == [-100] * len(ask) + enc("a circle<|im_end|>")
    with pytest.raises(ValueError, match="need answers"):
        processor(["<|image|>what ?"], images=[im], turns=[[("x ?", "y")]])
