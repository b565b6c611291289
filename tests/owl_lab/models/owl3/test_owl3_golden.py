"""Owl3 vs the official 240728 goldens (owl3-tiny-a): weights loaded from the golden folder, every
reference tensor reproduced within 1e-5 (token ids exactly)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers.models.qwen2.modeling_qwen2 import repeat_kv

from owl_lab.models.owl3 import Owl3Processor, build_word_tokenizer, load_checkpoint

ATOL = 1e-5
HYPER = (0, 2)
T = 16  # tokens per image


@pytest.fixture(scope="module")
def golden(owl3_golden_dir):
    model, processor = load_checkpoint(owl3_golden_dir)
    assert processor is None  # the golden folder has no tokenizer files
    return {
        "model": model,
        "inp": load_file(str(owl3_golden_dir / "inputs.safetensors")),
        "out": load_file(str(owl3_golden_dir / "outputs.safetensors")),
        "summary": json.loads((owl3_golden_dir / "summary.json").read_text()),
        "vocab": json.loads((owl3_golden_dir / "toy_vocab.json").read_text()),
    }


def close(a, b, atol=ATOL):
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= atol, f"max abs error {err:.3g} > {atol}"
    return err


def capture(model, run, eager=True):
    """Run ``run()`` with hooks recording per-layer events, o_proj inputs/outputs, v_kv_proj io."""
    rec = {"attn": {}, "gate": {}, "o_in": {}, "o_out": {}, "kv_in": {}, "kv_out": {}, "layer_out": {}}
    handles = []

    def store(*pairs):  # forward hooks must return None (a return value would replace the output)
        for table, key, value in pairs:
            rec[table][key] = value

    for i, layer in enumerate(model.language_model.model.layers):
        attn = layer.self_attn
        handles.append(
            attn.hook_attn.register_forward_hook(
                lambda m, a, o, i=i: rec["attn"].setdefault(i, {}).__setitem__(o.kind, o)
            )
        )
        handles.append(
            attn.o_proj.register_forward_hook(lambda m, a, o, i=i: store(("o_in", i, a[0]), ("o_out", i, o)))
        )
        handles.append(
            layer.register_forward_hook(lambda m, a, o, i=i: rec["layer_out"].__setitem__(i, o[0]))
        )
        if layer.is_hyper:
            handles.append(
                attn.hook_gate_event.register_forward_hook(lambda m, a, o, i=i: rec["gate"].__setitem__(i, o))
            )
            handles.append(
                attn.v_kv_proj.register_forward_hook(
                    lambda m, a, o, i=i: store(("kv_in", i, a[0]), ("kv_out", i, o))
                )
            )
    try:
        with torch.no_grad():
            rec["output"] = run()
    finally:
        for h in handles:
            h.remove()
    return rec


@pytest.fixture(scope="module")
def mm(golden):
    model, inp = golden["model"], golden["inp"]
    return capture(
        model,
        lambda: model(
            input_ids=inp["input_ids"],
            pixel_values=inp["pixel_values"],
            media_offset=inp["media_offset"],
            output_hidden_states=True,
            output_attentions=True,
        ),
    )


def test_image_embeddings_and_vision_hidden_state(golden):
    model, inp, out = golden["model"], golden["inp"], golden["out"]
    with torch.no_grad():
        close(model.encode_images(inp["pixel_values"]), out["mm.image_embeds"])


def test_mm_logits_hidden_states_layer_outputs(golden, mm):
    out, o = golden["out"], mm["output"]
    close(o.logits, out["mm.logits"])
    assert len(o.hidden_states) == 5
    for k in range(5):
        close(o.hidden_states[k], out[f"mm.hidden_states.{k}"])
    for i in range(4):
        close(mm["layer_out"][i], out[f"mm.layer_out.{i}"])


@pytest.mark.parametrize("layer", HYPER)
def test_hyper_layer_internals(golden, mm, layer):
    out, o, p = golden["out"], mm["output"], f"mm.layers.{layer}."
    groups = 2
    self_ev, cross_ev = mm["attn"][layer]["self"], mm["attn"][layer]["cross"]
    close(self_ev.query, out[p + "q_rot"])
    close(repeat_kv(self_ev.key, groups), out[p + "k_rot"])
    close(o.attentions[layer], out[p + "self_attn_probs"])
    gate = mm["gate"][layer]
    close(gate.gate, out[p + "gate"])
    close(gate.self_context.flatten(2), out[p + "self_ctx"])
    close(mm["o_in"][layer], out[p + "fused_ctx"])
    close(mm["o_out"][layer], out[p + "attn_out"])
    # shared input norm + v_kv_proj run on the batch-global image list (sample 0 owns images 0, 1;
    # sample 1 image 2), not on padding slots
    close(mm["kv_in"][layer], out[p + "image_embeds_normed"])
    close(mm["kv_out"][layer], out[p + "image_kv"])
    for b, n in ((0, 2), (1, 1)):
        s = f"{p}sample{b}."
        t0 = int(out[s + "query_shift"])
        applied = gate.applied[b]
        assert int(torch.nonzero(applied)[0]) == t0 and bool(applied[t0:].all())
        assert torch.equal(cross_ev.image_rope_positions[b, :n], out[s + "mi_rope_positions"])
        close(cross_ev.query[b, :, t0:], out[s + "cross_q"])
        close(repeat_kv(cross_ev.key, groups)[b, :, : n * T], out[s + "cross_k_rot"])
        assert torch.equal(cross_ev.allowed(t0, o.logits.shape[1])[b, :, : n * T], out[s + "cross_mask"])
        close(o.cross_attentions[layer][b, :, :, : n * T], out[s + "cross_attn_probs"])
        mass = o.cross_attentions[layer][b, :, :, : n * T].unflatten(-1, (n, T)).sum(-1)
        close(mass, out[s + "cross_mass_per_image"])
        close(gate.cross_context[b].flatten(1), out[s + "cross_ctx"])


def test_gate_raw_row_order(golden, mm):
    """gate_raw is [L*B*nH, D] with rows (token, sample, head)."""
    for layer in HYPER:
        g = mm["gate"][layer].gate  # [B, L, H, D]
        close(g.transpose(0, 1).reshape(-1, g.shape[-1]), golden["out"][f"mm.layers.{layer}.gate_raw"])


def test_text_only_forward(golden):
    model, inp, out = golden["model"], golden["inp"], golden["out"]
    rec = capture(
        model,
        lambda: model(
            input_ids=inp["text.input_ids"],
            media_offset=inp["text.media_offset"],
            output_hidden_states=True,
            output_attentions=True,
        ),
    )
    o = rec["output"]
    close(o.logits, out["text.logits"])
    for k in range(5):
        close(o.hidden_states[k], out[f"text.hidden_states.{k}"])
    for i in range(4):
        close(rec["layer_out"][i], out[f"text.layer_out.{i}"])
    for layer in HYPER:
        close(o.attentions[layer], out[f"text.layers.{layer}.self_attn_probs"])
    assert rec["gate"] == {}  # as in the official code, text-only batches never run the gate


def test_mixed_batch(golden):
    model, inp, out = golden["model"], golden["inp"], golden["out"]
    rec = capture(
        model,
        lambda: model(
            input_ids=inp["mixed.input_ids"],
            pixel_values=inp["mixed.pixel_values"],
            media_offset=inp["mixed.media_offset"],
            output_attentions=True,
        ),
    )
    o = rec["output"]
    close(o.logits, out["mixed.logits"])
    for layer in HYPER:
        p = f"mixed.layers.{layer}."
        gate = rec["gate"][layer]
        close(gate.gate, out[p + "gate"])
        close(gate.self_context.flatten(2), out[p + "self_ctx"])
        close(rec["o_in"][layer], out[p + "fused_ctx"])
        assert torch.equal(rec["o_in"][layer][0], gate.self_context[0].flatten(1))  # text row untouched
        assert not gate.applied[0].any()
        assert int(torch.nonzero(gate.applied[1])[0]) == int(out[p + "sample1.query_shift"])
        close(o.cross_attentions[layer][1, :, :, :T], out[p + "sample1.cross_attn_probs"])


def test_greedy_generation_tokens_and_step_logits(golden):
    model, inp, out = golden["model"], golden["inp"], golden["out"]
    res = model.generate(
        input_ids=inp["sample0.input_ids"],
        pixel_values=inp["sample0.pixel_values"],
        media_offset=inp["sample0.media_offset"],
        max_new_tokens=5,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    new = res.sequences[:, inp["sample0.input_ids"].shape[1] :]
    assert torch.equal(new, out["gen.sample0.new_tokens"])
    assert torch.equal(new, out["gen.sample0.new_tokens_manual_loop"])
    close(torch.cat(res.logits), out["gen.sample0.step_logits"])
    text = model.generate(input_ids=inp["text.input_ids"], max_new_tokens=5, do_sample=False)
    assert torch.equal(text[:, -5:], out["gen.text.new_tokens"])


def test_batch_equals_single_samples(golden):
    model, inp = golden["model"], golden["inp"]
    with torch.no_grad():
        batch = model(
            input_ids=inp["input_ids"], pixel_values=inp["pixel_values"], media_offset=inp["media_offset"]
        )
        for b in (0, 1):
            single = model(
                input_ids=inp[f"sample{b}.input_ids"],
                pixel_values=inp[f"sample{b}.pixel_values"],
                media_offset=inp[f"sample{b}.media_offset"],
            )
            close(batch.logits[b], single.logits[0], atol=1e-5)


def test_processor_reproduces_golden_inputs(golden):
    inp, prompts = golden["inp"], golden["summary"]["prompt_text"]
    processor = Owl3Processor.from_config(golden["model"].config, build_word_tokenizer(golden["vocab"]))
    images = [Image.fromarray(inp[f"raw_image.{i}"].numpy()) for i in range(3)]
    batch = processor([prompts["sample0"], prompts["sample1"]], images=[images[:2], images[2:]])
    for key in ("input_ids", "media_offset", "pixel_values"):
        assert torch.equal(batch[key], inp[key]), key
    assert bool(batch["attention_mask"].all())
    for b, imgs in ((0, images[:2]), (1, images[2:])):
        single = processor(prompts[f"sample{b}"], images=imgs)
        assert torch.equal(single["media_offset"], inp[f"sample{b}.media_offset"])
        starts = torch.nonzero(single["input_ids"][0] == 396).flatten()
        assert torch.equal(starts, inp[f"image_placeholder_positions.sample{b}"])
    text = processor(prompts["text_only"])
    assert torch.equal(text["input_ids"], inp["text.input_ids"]) and torch.equal(
        text["media_offset"], inp["text.media_offset"]
    )
    assert "pixel_values" not in text
    mixed = processor([prompts["mixed_text_row"], prompts["sample1"]], images=[[], images[2:]])
    for key in ("input_ids", "media_offset", "pixel_values"):
        assert torch.equal(mixed[key], inp[f"mixed.{key}"]), key
