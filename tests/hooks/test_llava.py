"""hooks on a stock transformers LlavaForConditionalGeneration (observed through the attention registry)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlavaForConditionalGeneration

import hooks
from hooks import capture
from owl_lab.models.llava import LlavaProcessor, llava_config
from owl_lab.models.transformers_attention import OBSERVED, install
from owl_lab.synth.shapes import render, sample_scene
from owl_lab.synth.tokenizer import build_tokenizer

CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "initializer_range": 0.5,
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 28,
        "patch_size": 7,
    },
}


def _model(attn: str = "sdpa", seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A plain stock LLaVA (no observer installed), text decoder on ``attn``; the vision tower keeps SDPA."""
    tokenizer = build_tokenizer("llava")
    config = llava_config(
        CONFIG,
        vocab_size=len(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image|>"),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation({"text_config": attn})
    return model.eval(), LlavaProcessor.from_config(config, tokenizer)


def _images(seed: int, n: int = 1):
    return [render(sample_scene(random.Random(f"{seed}/{i}")), 28) for i in range(n)]


@pytest.fixture(scope="module")
def batch():
    _, processor = _model()
    texts = ["<|image|> what color is the circle ?", "how many <|image|> objects are there ? <|image|>"]
    return processor(text=texts, images=[_images(1), _images(2, 2)])


def test_capture_leaves_logits_bitwise_equal(batch):
    plain, _ = _model()
    reference = plain(**batch).logits
    model, _ = _model()
    install(model)
    assert model.config.get_text_config()._attn_implementation == "owl_lab_sdpa"
    assert torch.equal(model(**batch).logits, reference)  # installed, nothing listening
    with capture(model) as rec:
        logits = model(**batch).logits
    assert torch.equal(logits, reference)
    df = rec.attention_mass
    assert {"batch", "step", "layer", "head", "query", "kind", "group", "mass"} <= set(df.columns)
    assert set(df.layer) == {0, 1, 2} and set(df.kind) == {"self"}
    groups = set(df.group)
    assert {"visual", "text", "bos", "question", "image:0", "image:1"} <= groups


def test_masses_sum_to_one_and_visual_split(batch):
    model, _ = _model()
    with capture(model) as rec:
        model(**batch)
    df = rec.attention_mass
    keys = ["batch", "step", "layer", "head", "query"]
    for level, groups in (("modality", ["visual", "text"]), ("token", None)):
        part = df[df.level == level] if "level" in df else df[df.group.isin(groups)]
        total = part.groupby(keys).mass.sum()
        assert (total - 1).abs().max() < 1e-5, level
    # sample 0 is "<s> user : <image x16> ..." (16 patches of 7 px at 28 px): queries before the
    # image have no visual mass, the first image token is the first query with some
    visual = df[(df.batch == 0) & (df.group == "visual") & (df.mass > 0)]
    assert visual["query"].min() == 3


def _visual_mass(df, layer):
    return df[(df.layer == layer) & (df.group == "visual")].set_index(["batch", "head", "query"]).mass


@pytest.mark.parametrize("observed", ["eager", "sdpa"])
def test_capture_matches_eager_output_attentions(batch, observed):
    """Visual mass per (batch, head, query) equals the eager probabilities summed over image keys.

    Capturing the eager model itself compares every layer on identical inputs; the SDPA model is
    compared at layer 0 (deeper layers see hidden states that differ between kernels by rounding)."""
    eager, _ = _model("eager")
    with torch.no_grad():
        out = eager(**batch, output_attentions=True)
    model, _ = _model(observed)
    with torch.no_grad(), capture(model) as rec:
        model(**batch)
    df = rec.attention_mass
    is_image = batch["input_ids"] == model.config.image_token_id  # [B, L]
    real = batch["attention_mask"].bool()
    layers = range(len(out.attentions)) if observed == "eager" else [0]
    for layer in layers:
        probs = out.attentions[layer]  # [B, H, L, L]
        visual = (probs * is_image[:, None, None, :]).sum(-1)  # [B, H, L]
        got = _visual_mass(df, layer)
        assert len(got) == int(real.sum()) * probs.shape[1]  # every real query, every head
        worst = max(abs(mass - float(visual[b, h, q])) for (b, h, q), mass in got.items())
        assert worst < 1e-6, (layer, worst)


def test_capture_under_generate_marks_generated_tokens(batch):
    model, processor = _model()
    one = processor(text=["<|image|> what color is the circle ?"], images=[_images(3)])
    with capture(model) as rec:
        ids = model.generate(**one, max_new_tokens=3, do_sample=False)
    df = rec.attention_mass
    assert set(df.step) == {0, 1, 2}
    assert "generated" in set(df[df.step == 2].group)
    assert ids.shape[1] == one["input_ids"].shape[1] + 3


def test_eager_stays_eager_and_unknown_implementation_raises():
    model, _ = _model("eager")
    install(model)
    assert model.config.get_text_config()._attn_implementation == "owl_lab_eager"
    assert set(OBSERVED.values()) == {"sdpa", "eager"}
    bad, _ = _model()
    bad.config.get_text_config()._attn_implementation_internal = "flex_attention"
    with pytest.raises(ValueError, match="cannot observe"):
        install(bad)


def test_empty_knockout_is_bitwise_and_capture_sees_the_knocked_out_softmax(batch):
    model, _ = _model()
    install(model)
    reference = model(**batch).logits
    with hooks.knockout(model, queries="all", keys="visual", layers=[]):
        assert torch.equal(model(**batch).logits, reference)
    with hooks.knockout(model, queries="all", keys="image:7"):  # no such image: nothing blocked
        assert torch.equal(model(**batch).logits, reference)
    with hooks.knockout(model, queries="last", keys="visual"), capture(model) as rec:
        knocked = model(**batch).logits
    assert not torch.equal(knocked, reference)
    df = rec.attention_mass
    last = batch["attention_mask"].sum(1) - 1  # [B] last real position
    for b in range(2):
        rows = df[(df.batch == b) & (df["query"] == int(last[b])) & (df.group == "visual")]
        assert len(rows) and rows.mass.abs().max() == 0.0
    assert torch.equal(model(**batch).logits, reference)  # removed on exit


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_visual_knockout_makes_text_logits_independent_of_the_image(attn):
    model, processor = _model(attn)
    texts = ["<|image|> what color is the circle ?"]
    a = processor(text=texts, images=[_images(11)])
    b = processor(text=texts, images=[_images(12)])
    text = a["input_ids"][0] != model.config.image_token_id  # [L] text positions
    with torch.no_grad():
        assert (model(**a).logits[0, text] - model(**b).logits[0, text]).abs().max() > 1e-3
        with hooks.knockout(model, queries="all", keys="visual", layers=None):
            diff = (model(**a).logits[0, text] - model(**b).logits[0, text]).abs().max()
    assert diff < 1e-6


def test_sites_record_and_identity_edit_on_stock_llava(batch):
    model, _ = _model()
    names = hooks.sites(model)
    assert {
        "blocks.0.hook_resid_pre",
        "blocks.2.hook_resid_post",
        "blocks.1.hook_attn_out",
        "blocks.1.hook_mlp_out",
        "blocks.0.attn.hook_z",
    } <= set(names)
    reference = model(**batch).logits
    with hooks.record(model, ["blocks.1.hook_resid_post", "blocks.0.attn.hook_z"]) as cache:
        model(**batch)
    B, L = batch["input_ids"].shape
    assert cache["blocks.1.hook_resid_post"].shape == (B, L, 32)
    assert cache["blocks.0.attn.hook_z"].shape == (B, L, 4, 8)
    with hooks.edit(model, {"blocks.1.hook_resid_post": lambda x: x}):
        assert torch.equal(model(**batch).logits, reference)


def test_padded_batch_generate_masses_sum_to_one(batch):
    model, _ = _model()
    with torch.no_grad(), capture(model) as rec:
        model.generate(**batch, max_new_tokens=2, do_sample=False)
    df = rec.attention_mass
    modality = df[df.level == "modality"]
    total = modality.groupby(["batch", "step", "layer", "head", "query"]).mass.sum()
    assert (total - 1).abs().max() < 1e-5
    assert set(df.step) == {0, 1} and "pad" not in set(df[df.mass > 0].group)
