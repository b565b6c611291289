"""hooks.capture on the real Owl2 implementation, checked against the official goldens (owl2-tiny-a)."""

from __future__ import annotations

import gc

import pytest
import torch
from safetensors.torch import load_file

import owl_lab.models.owl2 as owl2
from hooks import capture
from owl_lab.models.observe import HookPoint


@pytest.fixture(scope="module")
def golden(owl2_golden_dir):
    model, _ = owl2.load_checkpoint(owl2_golden_dir)
    return (
        model,
        load_file(owl2_golden_dir / "inputs.safetensors"),
        load_file(owl2_golden_dir / "outputs.safetensors"),
    )


def mm_batch(inputs):
    return dict(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        pixel_values=inputs["pixel_values"],
        use_cache=False,
    )


def test_masses_equal_golden_probability_sums(golden):
    model, inputs, out = golden
    with torch.no_grad(), capture(model) as rec:
        model(**mm_batch(inputs))
    modality = out["llm.modality_indicators"]  # [B, L]
    mask = out["llm.attention_mask"].bool()  # [B, L]
    worst = 0.0
    for layer in range(2):
        probs = out[f"llm.attentions.{layer}"].double()  # [B, H, L, L]
        r = rec.mass(layer)
        assert r.query_index.tolist() == list(range(15))
        assert r.valid.tolist() == mask.tolist()  # the pad query of row 1 is dropped
        vis = (probs * (modality == 1)[:, None, None]).sum(-1)  # [B, H, L]
        bos = probs[..., 0]
        txt = (probs * ((modality == 0) & mask)[:, None, None]).sum(-1)
        for name, level, expected in (
            ("visual", "modality", vis),
            ("text", "modality", txt),
            ("image:0", "token", vis),
            ("bos", "token", bos),
            ("question", "token", txt - bos),
        ):
            got = r.mass[..., r.group_index(name, level)].double()
            keep = mask[:, None, :].expand_as(got)
            diff = (got - expected)[keep].abs().max().item()
            worst = max(worst, diff)
            assert diff < 1e-5, (layer, name, diff)
    df = rec.attention_mass
    sums = df.groupby(["batch", "step", "layer", "head", "query", "kind", "level"], observed=True).mass.sum()
    assert (sums - 1).abs().max() < 1e-5
    print(f"owl2 max |captured - golden| = {worst:.2e}")


def test_abstractor_maps_equal_golden(golden):
    model, inputs, out = golden
    with torch.no_grad(), capture(model, attention=False) as rec:
        model(**mm_batch(inputs))
    maps = rec.abstractor_maps  # [layer, image, head, query, 4, 4]
    assert maps.shape == (2, 2, 2, 8, 4, 4)
    summary = rec.abstractor_summary.set_index(["abstractor_layer", "image", "head", "query"]).sort_index()
    for k in range(2):
        p = out[f"abstractor.attentions.{k}"]  # [N, heads, Q, Q + 1 + 16]
        torch.testing.assert_close(maps[k], p[..., 9:].reshape(2, 2, 8, 4, 4), rtol=0, atol=1e-6)
        s = summary.loc[k]
        torch.testing.assert_close(torch.tensor(s.cls.values), p[..., 8].flatten(), rtol=0, atol=1e-6)
        torch.testing.assert_close(
            torch.tensor(s.queries.values), p[..., :8].sum(-1).flatten(), rtol=0, atol=1e-6
        )


def test_capture_does_not_change_logits(golden):
    model, inputs, _ = golden
    with torch.no_grad():
        plain = model(**mm_batch(inputs)).logits
        with capture(model, full_maps={1: slice(10, None)}) as rec:
            hooked = model(**mm_batch(inputs)).logits
    assert torch.equal(plain, hooked)
    assert rec.full_maps[(0, 1, "self")].probs.shape == (2, 4, 5, 15)


def test_eager_path_gives_the_same_masses(golden):
    model, inputs, _ = golden
    with torch.no_grad():
        with capture(model) as sdpa:
            model(**mm_batch(inputs))
        with capture(model) as eager:
            model(**mm_batch(inputs), output_attentions=True)
    for layer in range(2):
        torch.testing.assert_close(sdpa.mass(layer).mass, eager.mass(layer).mass, rtol=0, atol=1e-6)


def test_generate_steps_match_a_no_cache_forward(golden):
    model, inputs, out = golden
    ids, pix = inputs["input_ids"][:1], inputs["pixel_values"][:1]
    with torch.no_grad(), capture(model) as rec:
        seq = model.generate(input_ids=ids, pixel_values=pix, max_new_tokens=5, do_sample=False)
    assert seq[0, 7:].tolist() == out["generate.new_tokens"][0].tolist()
    assert rec.n_steps == 5  # prefill + 4 decode steps (the 5th token is never fed back)
    df = rec.attention_mass
    assert [sorted(df[df.step == s]["query"].unique()) for s in range(1, 5)] == [[15], [16], [17], [18]]
    assert "generated" in set(df[df.step == 4].group)
    # the same queries in one no-cache forward over prompt + fed-back tokens
    with torch.no_grad(), capture(model) as full:
        model(input_ids=seq[:, :-1], pixel_values=pix, use_cache=False)
    for step in range(1, 5):
        for layer in range(2):
            a, b = rec.mass(layer, step=step), full.mass(layer)
            for name in ("visual", "text"):
                ga, gb = (
                    a.mass[..., a.group_index(name, "modality")],
                    b.mass[..., b.group_index(name, "modality")],
                )
                torch.testing.assert_close(ga[:, :, 0], gb[:, :, 14 + step], rtol=0, atol=1e-5)


def test_gates_on_owl2_is_a_clear_error(golden):
    model, _, _ = golden
    with pytest.raises(ValueError, match="no gate"):
        capture(model, gates=True)


def test_design_form_captures_the_abstractor_of_owl2(golden):
    model, inputs, _ = golden
    with torch.no_grad(), capture(model, attention=True, gates=True, abstractor=True) as rec:
        model(**mm_batch(inputs))
    assert rec.gates.empty and not rec.attention_mass.empty
    assert rec.abstractor_maps is not None and rec.abstractor_maps.numel() > 0


def test_no_hooks_left_and_no_growth(golden):
    model, inputs, _ = golden
    batch = mm_batch(inputs)
    with pytest.raises(KeyError):
        with torch.no_grad(), capture(model):
            model(**batch)
            raise KeyError("inside the block")
    hookpoints = [m for m in model.modules() if isinstance(m, HookPoint)]
    assert hookpoints and not any(m.active for m in hookpoints)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())

    def n_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))

    def once():
        with torch.no_grad(), capture(model) as rec:
            model(**batch)
        return len(rec.attention_mass)

    once()
    before = n_tensors()
    for _ in range(100):
        once()
    assert n_tensors() <= before
    assert not any(m.active for m in hookpoints)
