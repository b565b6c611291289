"""hooks.capture on the real Owl3 implementation, checked against the official goldens (owl3-tiny-a)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import owl_lab.models.owl3 as owl3
from hooks import capture

HYPER = (0, 2)


@pytest.fixture(scope="module")
def golden(owl3_golden_dir):
    model, _ = owl3.load_checkpoint(owl3_golden_dir)
    return (
        model,
        load_file(owl3_golden_dir / "inputs.safetensors"),
        load_file(owl3_golden_dir / "outputs.safetensors"),
    )


def mm_batch(inputs, prefix=""):
    return dict(
        input_ids=inputs[prefix + "input_ids"],
        pixel_values=inputs[prefix + "pixel_values"],
        media_offset=inputs[prefix + "media_offset"],
    )


@pytest.fixture(scope="module")
def mm(golden):
    model, inputs, _ = golden
    with torch.no_grad():
        plain = model(**mm_batch(inputs)).logits
        with capture(model, gate_vectors=True) as rec:
            hooked = model(**mm_batch(inputs)).logits
    return rec, plain, hooked


def test_capture_does_not_change_logits(mm):
    _, plain, hooked = mm
    assert torch.equal(plain, hooked)


def test_self_masses_equal_golden(golden, mm):
    _, inputs, out = golden
    rec = mm[0]
    worst = 0.0
    for layer in HYPER:
        p = out[f"mm.layers.{layer}.self_attn_probs"].double()  # [B, H, L, L]
        r = rec.mass(layer, "self")
        for b in range(2):
            starts = inputs[f"image_placeholder_positions.sample{b}"]
            expected = {"bos": p[b, :, :, 0], "placeholder": p[b][..., starts].sum(-1)}
            expected["question"] = p[b].sum(-1) - expected["bos"] - expected["placeholder"]
            for name, e in expected.items():
                worst = max(worst, (r.mass[b, ..., r.group_index(name)].double() - e).abs().max().item())
        # self-attention has no image keys: no visual/image group, modality text carries everything
        assert "visual" not in r.groups and not any(g.startswith("image:") for g in r.groups)
        torch.testing.assert_close(
            r.mass[..., r.group_index("text", "modality")][r.valid[:, None].expand(-1, 4, -1)],
            torch.ones(int(r.valid.sum()) * 4),
            rtol=0,
            atol=1e-6,
        )
    assert worst < 1e-5
    print(f"owl3 self max |captured - golden| = {worst:.2e}")


def test_cross_mass_per_image_equals_golden(golden, mm):
    _, _, out = golden
    rec = mm[0]
    worst = 0.0
    for layer in HYPER:
        r = rec.mass(layer, "cross")
        for b, n_img in ((0, 2), (1, 1)):
            per_image = out[f"mm.layers.{layer}.sample{b}.cross_mass_per_image"].double()  # [H, L, N_b]
            rows = out[f"mm.layers.{layer}.sample{b}.cross_rows_valid"]  # [L]
            assert r.valid[b].tolist() == rows.tolist()  # rows that see no image are dropped
            for n in range(n_img):
                got = r.mass[b, :, :, r.group_index(f"image:{n}")].double()
                worst = max(worst, (got[:, rows] - per_image[:, rows, n]).abs().max().item())
    assert worst < 1e-5
    print(f"owl3 cross max |captured - golden| = {worst:.2e}")
    df = rec.attention_mass
    cross = df[df.kind == "cross"]
    assert set(cross[cross.batch == 1].group) == {"visual", "image:0"}
    sums = df.groupby(["batch", "step", "layer", "head", "query", "kind", "level"], observed=True).mass.sum()
    assert (sums - 1).abs().max() < 1e-5


def test_gates_equal_golden(golden, mm):
    _, _, out = golden
    rec = mm[0]
    g = rec.gates
    assert list(g.columns) == ["batch", "step", "layer", "query", "head", "gate", "applied", "call"]
    worst = 0.0
    for layer in HYPER:
        gold = out[f"mm.layers.{layer}.gate"]  # [B, L, H, D]
        r = rec.gate_vectors(layer)
        worst = max(worst, (r.gate - gold).abs().max().item(), (r.mean - gold.mean(-1)).abs().max().item())
        sub = g[g.layer == layer].sort_values(["batch", "query", "head"])
        torch.testing.assert_close(torch.tensor(sub.gate.values), gold.mean(-1).flatten(), rtol=0, atol=1e-6)
        # exact text/vision split: the two parts add up to the layer's attention output
        torch.testing.assert_close(
            r.text_out + r.vision_out, out[f"mm.layers.{layer}.attn_out"], rtol=0, atol=1e-5
        )
        assert r.applied[0].tolist() == out[f"mm.layers.{layer}.sample0.cross_rows_valid"].tolist()
    assert worst < 1e-6
    split = rec.gate_split
    assert ((split.vision_norm == 0) == ~split.applied).all()


def test_mixed_batch_text_only_row(golden):
    model, inputs, out = golden
    with torch.no_grad(), capture(model) as rec:
        model(**mm_batch(inputs, "mixed."))
    r = rec.mass(0, "cross")
    assert not r.valid[0].any()  # row 0 has no image: no cross softmax
    rows = out["mm.layers.0.sample1.cross_rows_valid"]
    assert r.valid[1].tolist() == rows.tolist()
    torch.testing.assert_close(
        torch.tensor(rec.gates[(rec.gates.layer == 0)].sort_values(["batch", "query", "head"]).gate.values),
        out["mixed.layers.0.gate"].mean(-1).flatten(),
        rtol=0,
        atol=1e-6,
    )


def test_generate_decode_steps_see_all_images(golden):
    model, inputs, out = golden
    with torch.no_grad(), capture(model) as rec:
        seq = model.generate(**mm_batch(inputs, "sample0."), max_new_tokens=5, do_sample=False)
    assert seq[0, 29:].tolist() == out["gen.sample0.new_tokens"][0].tolist()
    assert rec.n_steps == 5
    df = rec.attention_mass
    step4 = df[(df.step == 4) & (df.kind == "cross")]
    assert sorted(step4["query"].unique()) == [32]
    assert set(step4.group) == {"visual", "image:0", "image:1"}
    assert "generated" in set(df[(df.step == 4) & (df.kind == "self")].group)
    assert sorted(rec.gates[rec.gates.step == 4]["query"].unique()) == [32]


@pytest.fixture(scope="module")
def fused(golden):
    model, _, _ = golden
    config = copy.deepcopy(model.config)
    config.hyper_attention = "fused"
    torch.manual_seed(0)
    return owl3.Owl3ForCausalLM(config).eval()


def fused_batch(inputs):
    return dict(
        input_ids=inputs["input_ids"],
        pixel_values=inputs["pixel_values"],
        media_offset=[
            inputs["image_placeholder_positions.sample0"],
            inputs["image_placeholder_positions.sample1"],
        ],
    )


def test_fused_joint_masses_and_gate_error(golden, fused):
    _, inputs, _ = golden
    with pytest.raises(ValueError, match="no gate"):
        capture(fused, gates=True)
    with pytest.raises(ValueError, match="abstractor"):
        capture(fused, abstractor=True)
    both = capture(fused, attention=True, gates=True, abstractor=True)  # DESIGN form: no error
    assert both._gate_sites == [] and both._abs_sites == []
    batch = fused_batch(inputs)
    with torch.no_grad():
        plain = fused(**batch).logits
        with capture(fused) as rec:
            hooked = fused(**batch).logits
        eager = fused(**batch, output_attentions=True)
    assert torch.equal(plain, hooked)
    assert rec.gates.empty
    r = rec.mass(0, "joint")
    # eager probabilities: text part in attentions, image part in cross_attentions
    txt, img = (
        eager.attentions[0].double(),
        eager.cross_attentions[0].double(),
    )  # [B, H, L, L], [B, H, L, N*T]
    torch.testing.assert_close(
        r.mass[..., r.group_index("text", "modality")].double(), txt.sum(-1), rtol=0, atol=1e-5
    )
    torch.testing.assert_close(
        r.mass[..., r.group_index("image:1")].double()[0], img[0, ..., 16:32].sum(-1), rtol=0, atol=1e-5
    )
    df = rec.attention_mass
    sums = df.groupby(["batch", "step", "layer", "head", "query", "kind", "level"], observed=True).mass.sum()
    assert (sums - 1).abs().max() < 1e-5
    assert set(df.kind) == {"self", "joint"}


def test_design_form_captures_the_gates_of_gated_owl3(golden):
    model, inputs, _ = golden
    with torch.no_grad(), capture(model, attention=True, gates=True, abstractor=True) as rec:
        model(**mm_batch(inputs))
    assert not rec.gates.empty and not rec.attention_mass.empty


def test_gate_split_from_the_output_equals_the_two_product_split(golden, mm):
    """The gate event fires after o_proj with the layer's output; with hook_z hooked (it could have
    changed the o_proj input) the model withholds it and the split falls back to two products."""
    model, inputs, _ = golden
    seen = []
    layers = model.language_model.model.layers
    spy = [
        layers[i].self_attn.hook_gate_event.register_forward_hook(lambda m, a, o: seen.append(o))
        for i in HYPER
    ]
    try:
        with torch.no_grad():
            model(**mm_batch(inputs))
    finally:
        for h in spy:
            h.remove()
    assert len(seen) == len(HYPER) and all(ev.output is not None for ev in seen)
    handles = [layers[i].self_attn.hook_z.register_forward_hook(lambda m, a, o: None) for i in HYPER]
    try:
        with torch.no_grad(), capture(model, gate_vectors=True) as direct:
            model(**mm_batch(inputs))
    finally:
        for h in handles:
            h.remove()
    one = mm[0]
    for layer in HYPER:
        a, b = one.gate_vectors(layer), direct.gate_vectors(layer)
        scale = float(a.text_out.abs().max() + a.vision_out.abs().max())
        torch.testing.assert_close(a.text_out, b.text_out, rtol=0, atol=1e-6 * scale)
        torch.testing.assert_close(a.vision_out, b.vision_out, rtol=0, atol=1e-6 * scale)
        assert torch.equal(a.mean, b.mean)
