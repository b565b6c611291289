"""Owl3 through the attention core: eager == SDPA, the knockout slot and the writable sites."""

from __future__ import annotations

import re

import pytest
import torch

from owl_lab.families import FAMILIES

KINDS = ("gated", "fused", "static_gate", "sum")
PROMPTS = ["<|image|>what is it ?", "compare <|image|>and <|image|>now please"]


def make(owl3, kind, attn="sdpa", dtype=torch.float64, seed=11):
    model = owl3.model(kind, seed=seed).to(dtype)
    model.config._attn_implementation = attn
    return model


def inputs(owl3, make_processor, model, seed=2):
    """A right-padded batch of two samples with 1 and 2 images."""
    return make_processor(model)(PROMPTS, images=owl3.images(3, seed=seed))


def run(model, batch):
    """Logits of a padded forward and of three greedy generate steps (left-aligned, KV cache)."""
    with torch.no_grad():
        logits = model(**batch).logits
        gen = model.generate(
            **batch, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    return logits * batch["attention_mask"][..., None], torch.stack(gen.logits)


def site_modules(model) -> dict[str, torch.nn.Module]:
    sites = FAMILIES["owl3"].sites.values()
    regexes = [re.compile("^" + re.escape(p).replace(r"\{i\}", r"\d+") + "$") for p in sites]
    return {n: m for n, m in model.named_modules() if any(r.match(n) for r in regexes)}


@pytest.mark.parametrize("kind", KINDS)
def test_eager_equals_sdpa_padded_and_decode(owl3, make_processor, kind):
    outs = {
        attn: run(make(owl3, kind, attn), inputs(owl3, make_processor, make(owl3, kind)))
        for attn in ("eager", "sdpa")
    }
    for a, b in zip(outs["eager"], outs["sdpa"], strict=True):
        assert (a - b).abs().max() < 1e-6  # fp64: measured ~1e-15


def test_unknown_attn_implementation_raises(owl3, make_processor):
    model = make(owl3, "gated", dtype=torch.float32)
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="supported: 'eager', 'sdpa'"):
        model(**inputs(owl3, make_processor, model))


def _knock_out_images(model):
    for layer in model.language_model.model.layers:
        layer.self_attn.attention_edit = lambda ev: (ev.key_image < 0)[:, None, :]  # [B, 1, Lk]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_knockout_of_image_keys_makes_logits_independent_of_the_images(owl3, make_processor, kind, attn):
    model = make(owl3, kind, attn)
    batches = [inputs(owl3, make_processor, model, seed) for seed in (2, 3)]
    with torch.no_grad():
        plain = [model(**b).logits for b in batches]
        assert (plain[0] - plain[1]).abs().max() > 1e-3
        _knock_out_images(model)
        knocked = [model(**b).logits for b in batches]
        text_only = model(
            input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"]
        ).logits
    assert (knocked[0] - knocked[1]).abs().max() < 1e-6
    # a query left with no image key behaves as a token that saw no image
    assert (knocked[0] - text_only).abs().max() < 1e-6


@pytest.mark.parametrize("kind", ["gated", "fused"])
def test_knockout_eager_equals_sdpa_and_empty_knockout_is_bitwise(owl3, make_processor, kind):
    outs = {}
    for attn in ("eager", "sdpa"):
        model = make(owl3, kind, attn)
        batch = inputs(owl3, make_processor, model)
        plain = run(model, batch)
        for layer in model.language_model.model.layers:
            layer.self_attn.attention_edit = lambda ev: torch.ones(1, 1, 1, dtype=torch.bool)
        assert all(torch.equal(a, b) for a, b in zip(plain, run(model, batch), strict=True))
        for layer in model.language_model.model.layers:  # late queries see no image
            layer.self_attn.attention_edit = lambda ev: (
                ~((ev.key_image >= 0)[:, None, :] & (ev.query_index >= 12)[None, :, None])
            )
        outs[attn] = run(model, batch)
        assert not all(torch.equal(a, b) for a, b in zip(plain, outs[attn], strict=True))
    for a, b in zip(outs["eager"], outs["sdpa"], strict=True):
        assert (a - b).abs().max() < 1e-6


@pytest.mark.parametrize("kind", ["gated", "fused"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_identity_hooks_on_every_site_leave_logits_bitwise_equal(owl3, make_processor, kind, attn):
    model = make(owl3, kind, attn, dtype=torch.float32)
    sites = site_modules(model)
    assert len(sites) == 4 * 6 + 1 + (2 * 2 if kind == "gated" else 0)
    batch = inputs(owl3, make_processor, model)
    plain = run(model, batch)
    fired = []
    handles = [
        m.register_forward_hook(lambda m, a, o, n=n: (fired.append(n), o.clone())[1])
        for n, m in sites.items()
    ]
    try:
        hooked = run(model, batch)
    finally:
        for h in handles:
            h.remove()
    assert set(fired) == set(sites)
    assert all(torch.equal(a, b) for a, b in zip(plain, hooked, strict=True))


def test_returned_values_are_used_and_sites_fire_every_step(owl3, make_processor):
    model = make(owl3, "gated", dtype=torch.float32)
    batch = inputs(owl3, make_processor, model)
    plain = model(**batch).logits.detach()
    attn = next(layer.self_attn for layer in model.language_model.model.layers if layer.is_hyper)
    for site in (
        model.language_model.model.layers[0].hook_attn_out,
        attn.hook_z,
        attn.hook_gate,
        attn.hook_cross_z,
        model.hook_image_embeds,
    ):
        h = site.register_forward_hook(lambda m, a, o: torch.zeros_like(o))
        try:
            edited = model(**batch).logits.detach()
        finally:
            h.remove()
        assert (edited - plain).abs().max() > 1e-3
    lengths = []
    h = model.language_model.model.layers[3].hook_resid_pre.register_forward_hook(
        lambda m, a, o: lengths.append(o.shape[1])
    )
    try:
        model.generate(**batch, max_new_tokens=3, do_sample=False)
    finally:
        h.remove()
    assert len(lengths) == 3 and lengths[1:] == [1, 1]
