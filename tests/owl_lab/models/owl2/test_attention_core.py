"""Owl2 through the attention core: eager == SDPA, the knockout slot and the writable sites."""

from __future__ import annotations

import re

import pytest
import torch

from owl_lab.families import FAMILIES
from owl_lab.models.owl2 import IMAGE_TOKEN_INDEX

IMG = IMAGE_TOKEN_INDEX


def batch(owl2, seed=5):
    """Left-, right- and un-padded rows, 0, 1 and 2 images."""
    ids = torch.tensor([[1, 5, IMG, 6, 7, IMG, 8], [1, 9, 10, 0, 0, 0, 0], [0, 0, 0, 1, IMG, 11, 12]])
    mask = torch.tensor([[1] * 7, [1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1]])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=owl2.rand_pixels(3, seed=seed))


def prefill_and_step(model, inputs):
    """Logits of a padded prefill and of one decode step with the KV cache."""
    with torch.no_grad():
        pre = model(**inputs, use_cache=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones(3, 1, dtype=torch.long)], 1)
        step = model(
            input_ids=torch.tensor([[3], [4], [5]]), attention_mask=mask, past_key_values=pre.past_key_values
        )
    return pre.logits, step.logits


def site_modules(model, family: str) -> dict[str, torch.nn.Module]:
    """Every module named by the family's ``sites`` patterns (owl_lab.families)."""
    regexes = [
        re.compile("^" + re.escape(p).replace(r"\{i\}", r"\d+") + "$")
        for p in FAMILIES[family].sites.values()
    ]
    return {n: m for n, m in model.named_modules() if any(r.match(n) for r in regexes)}


@pytest.mark.parametrize("num_kv", [4, 2])
def test_eager_equals_sdpa_padded_and_decode(owl2, num_kv):
    outs = {}
    for attn in ("eager", "sdpa"):
        model = owl2.make_model(attn=attn, num_key_value_heads=num_kv).double()
        outs[attn] = prefill_and_step(model, batch(owl2))
    for a, b in zip(outs["eager"], outs["sdpa"], strict=True):
        assert (a - b).abs().max() < 1e-6  # fp64: measured ~1e-15
    fp32 = {
        attn: prefill_and_step(owl2.make_model(attn=attn, num_key_value_heads=num_kv), batch(owl2))
        for attn in ("eager", "sdpa")
    }
    for a, b in zip(fp32["eager"], fp32["sdpa"], strict=True):
        assert (a - b).abs().max() < 1e-5  # fp32, O(1) random weights: measured ~3e-6


def test_unknown_attn_implementation_raises(owl2):
    model = owl2.make_model()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="supported: 'eager', 'sdpa'"):
        model(**batch(owl2))


def _knock_out_images(model):
    for layer in model.model.layers:
        layer.self_attn.attention_edit = lambda ev: (ev.key_image < 0)[:, None, :]  # [B, 1, Lk]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_knockout_of_image_rows_makes_text_independent_of_the_image(owl2, attn):
    model = owl2.make_model(attn=attn).double()
    text_rows = None
    logits = []
    for seed in (5, 6):
        inputs = batch(owl2, seed)
        with torch.no_grad():
            seq = model.model.build_sequence(**inputs)
            text_rows = (seq.modality_indicators == 0) & seq.attention_mask.bool()
            logits.append(model(**inputs).logits)
    assert (logits[0] - logits[1])[text_rows].abs().max() > 1e-3  # the image matters
    _knock_out_images(model)
    knocked = [model(**batch(owl2, seed)).logits.detach() for seed in (5, 6)]
    assert (knocked[0] - knocked[1])[text_rows].abs().max() < 1e-6


def test_knockout_eager_equals_sdpa_and_empty_knockout_is_bitwise(owl2):
    outs = {}
    for attn in ("eager", "sdpa"):
        model = owl2.make_model(attn=attn).double()
        plain = prefill_and_step(model, batch(owl2))
        for layer in model.model.layers:
            layer.self_attn.attention_edit = lambda ev: None  # nothing to knock out
        assert all(
            torch.equal(a, b) for a, b in zip(plain, prefill_and_step(model, batch(owl2)), strict=True)
        )
        _knock_out_images(model)
        outs[attn] = prefill_and_step(model, batch(owl2))
    for a, b in zip(outs["eager"], outs["sdpa"], strict=True):
        assert (a - b).abs().max() < 1e-6


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_identity_hooks_on_every_site_leave_logits_bitwise_equal(owl2, attn):
    model = owl2.make_model(attn=attn)
    sites = site_modules(model, "owl2")
    assert len(sites) == 2 * 6 + 1  # 2 layers x (5 block sites + hook_z) + hook_image_embeds
    plain = prefill_and_step(model, batch(owl2))
    fired = []
    handles = [
        m.register_forward_hook(lambda m, a, o, n=n: (fired.append(n), o.clone())[1])
        for n, m in sites.items()
    ]
    try:
        hooked = prefill_and_step(model, batch(owl2))
    finally:
        for h in handles:
            h.remove()
    assert set(fired) == set(sites)
    assert all(torch.equal(a, b) for a, b in zip(plain, hooked, strict=True))


def test_returned_values_are_used(owl2):
    model = owl2.make_model()
    plain = model(**batch(owl2)).logits.detach()
    layer0 = model.model.layers[0]
    for site in (layer0.hook_attn_out, layer0.self_attn.hook_z, model.model.hook_image_embeds):
        h = site.register_forward_hook(lambda m, a, o: torch.zeros_like(o))
        try:
            edited = model(**batch(owl2)).logits.detach()
        finally:
            h.remove()
        assert (edited - plain).abs().max() > 1e-3
    assert torch.equal(model(**batch(owl2)).logits.detach(), plain)


def test_sites_fire_on_every_generate_step(owl2):
    model = owl2.make_model()
    calls = []
    sites = site_modules(model, "owl2")
    handles = [
        sites[n].register_forward_hook(lambda m, a, o, n=n: calls.append((n, o.shape[1])))
        for n in ("model.layers.1.hook_resid_post", "model.layers.0.self_attn.hook_z")
    ]
    try:
        model.generate(**batch(owl2), max_new_tokens=3, do_sample=False)
    finally:
        for h in handles:
            h.remove()
    lengths = [length for n, length in calls if n.endswith("hook_resid_post")]
    assert len(lengths) == 3 and lengths[1:] == [1, 1]  # prefill, then two single-token decode steps
    assert len(calls) == 6


def test_knockout_of_the_last_query_row_only_eager_equals_sdpa(owl2):
    """Few edited rows take the SDPA split path (fast kernel + edited rows); it must match eager."""
    outs = {}
    for attn in ("eager", "sdpa"):
        model = owl2.make_model(attn=attn).double()
        with torch.no_grad():
            plain = model(**batch(owl2)).logits
            real = model.model.build_sequence(**batch(owl2)).attention_mask.bool()[:, :-1]
        for layer in model.model.layers:
            layer.self_attn.attention_edit = lambda ev: (
                ~((ev.key_image >= 0)[:, None, :] & (ev.query_index == ev.query_index.max())[None, :, None])
            )
        outs[attn] = model(**batch(owl2)).logits.detach()
        assert torch.equal(outs[attn][:, :-1][real], plain[:, :-1][real])  # earlier real rows: bitwise
        assert (outs[attn][:, -1] - plain[:, -1]).abs().max() > 1e-6
    assert (outs["eager"] - outs["sdpa"]).abs().max() < 1e-6
