"""owl_lab.analysis.attribution: IG completeness, exact zeros, determinism, no hooks left, attention view."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from owl_lab.analysis.attribution import attention_vs_attribution, attribute, spearman
from owl_lab.synth import build_tokenizer, eval_set

VISION = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, image_size=28, patch_size=7)
CONFIGS = {  # tiny: 2 decoder layers, 28-px images on a 4×4 patch grid
    "owl2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=256,
                 visual_config={"visual_model": dict(VISION, num_hidden_layers=1, hidden_act="quick_gelu"),
                                "visual_abstractor": dict(hidden_size=16, encoder_hidden_size=16, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=32,
                                                          num_learnable_queries=4, grid_size=4)}),
    "owl3": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, hyper_layers=[1], hyper_attention="gated", projector="linear",
                 tie_word_embeddings=False, vision_config=dict(VISION, num_hidden_layers=2)),
}
VARIANTS = {"owl2": ("owl2", {}), "owl3": ("owl3", {}),
            "owl3-fused": ("owl3", dict(hyper_attention="fused", projector="mlp"))}


@torch.no_grad()
def randomize(model, seed: int = 0):
    """O(1) random weights (the default 0.02 init makes the model nearly linear and IG trivial)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if name.endswith("bias"):
            p.copy_(0.1 * r)
        elif p.ndim == 1:
            p.copy_(1 + 0.1 * r)
        elif "embed_tokens" in name or "position" in name:
            p.copy_(r)
        else:
            p.copy_(r / math.sqrt(p[0].numel()))
    return model.eval()


def build(variant: str):
    family, overrides = VARIANTS[variant]
    from owl_lab.train import family_classes

    Config, Model, Processor = family_classes(family)
    tok = build_tokenizer(family)
    config = Config(**{**CONFIGS[family], **overrides}, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    model = randomize(Model(config))
    processor = (Processor.from_config(config, tok) if hasattr(Processor, "from_config")
                 else Processor(tok, image_size=28))
    return model, processor


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=list(VARIANTS))
def setup(request):
    model, processor = build(request.param)
    ex = eval_set("color", 1, seed=0)[0]
    batch = processor(text=ex.text, images=ex.images)
    return request.param, model, processor, batch


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_backward_pre_hooks", {})) for m in model.modules())


def test_shapes_tokens_and_completeness(setup):
    variant, model, processor, batch = setup
    t0 = time.perf_counter()
    a = attribute(model, batch, n_steps=32, tokenizer=processor)
    seconds = time.perf_counter() - t0
    assert seconds < 10, f"attribution took {seconds:.1f} s on a tiny model"
    assert a.patch_maps.shape == (1, 4, 4) and torch.isfinite(a.patch_maps).all()
    ids = batch["input_ids"][0]
    n_tok = int((ids != -200).sum())  # Owl2 markers are excluded, Owl3 placeholders are text tokens
    assert a.token_scores.shape == (n_tok,) and len(a.tokens) == n_tok and torch.isfinite(a.token_scores).all()
    assert "<|image|>" in a.tokens if variant != "owl2" else "<|image|>" not in a.tokens
    assert a.target_id == int(model(**batch).logits[0, -1].argmax())  # default: the greedy next token
    assert a.extra["marker_attribution"] == 0.0  # unused embedding rows at -200 markers get nothing
    # completeness: the attributions sum to f(input) - f(baseline); Gauss-Legendre converges fast
    gap = a.value - a.baseline_value
    assert abs(gap) > 0.1, "degenerate test model: input and baseline score alike"
    assert a.total == pytest.approx(gap + a.delta, abs=1e-4)
    assert abs(a.delta) < 1e-3 * abs(gap) + 1e-4
    assert a.patch_maps.abs().sum() > 0 and a.token_scores.abs().sum() > 0


def test_trapezoid_delta_shrinks_like_one_over_n(setup):
    _, model, processor, batch = setup
    d16 = attribute(model, batch, n_steps=16, tokenizer=processor, integration="riemann_trapezoid").delta
    d32 = attribute(model, batch, n_steps=32, tokenizer=processor, integration="riemann_trapezoid").delta
    assert abs(d16) > 1e-3 and 1.5 < abs(d16) / abs(d32) < 2.7  # first-order rule: halves when n doubles


def test_exact_zeros_for_unchanged_patches_and_kept_tokens(setup):
    """A patch equal to the baseline image, and tokens kept in the text baseline, get exactly 0."""
    variant, model, processor, batch = setup
    batch = dict(batch)
    pixels = batch["pixel_values"].clone()
    pixels[..., :7, :7] = 0  # patch (0, 0) of the 4×4 grid equals the zero baseline image
    batch["pixel_values"] = pixels
    a = attribute(model, batch, n_steps=8, tokenizer=processor)
    assert a.patch_maps[0, 0, 0] == 0 and (a.patch_maps[0].flatten()[1:] != 0).all()
    special = set(processor.tokenizer.all_special_ids) - {processor.tokenizer.pad_token_id}
    kept = [i for i, p in enumerate(a.token_positions.tolist()) if int(batch["input_ids"][0, p]) in special]
    assert kept and (a.token_scores[kept] == 0).all()  # BOS / chat markers stay in the baseline


def test_deterministic_no_hooks_left_and_grad_free(setup):
    _, model, processor, batch = setup
    before = _hooks(model)
    with torch.no_grad():  # a notebook may call it under no_grad: gradients are enabled inside
        a = attribute(model, batch, target="red", n_steps=8, tokenizer=processor)
        b = attribute(model, batch, target="red", n_steps=8, tokenizer=processor)
    assert _hooks(model) == before == 0
    assert all(p.grad is None for p in model.parameters()) and not model.training
    assert a.target == "red" and a.target_id == processor.tokenizer.convert_tokens_to_ids("red")
    assert torch.equal(a.patch_maps, b.patch_maps) and torch.equal(a.token_scores, b.token_scores)
    assert a.delta == b.delta


def test_no_hooks_left_when_the_forward_raises(setup, monkeypatch):
    _, model, processor, batch = setup
    forward = model.forward

    def failing(*args, **kwargs):  # fails inside captum's integration pass (k copies), hooks registered
        if kwargs["input_ids"].shape[0] > 1:
            raise RuntimeError("boom")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", failing)
    with pytest.raises(RuntimeError, match="boom"):
        attribute(model, batch, n_steps=4, tokenizer=processor)
    assert _hooks(model) == 0


def test_text_only_prompt_and_logprob_score(setup):
    variant, model, processor, _ = setup
    batch = processor(text="what is two plus three ?")
    a = attribute(model, batch, n_steps=16, score="logprob", tokenizer=processor)
    assert a.patch_maps.numel() == 0 and a.image_share == 0.0
    assert a.value <= 0 and abs(a.delta) < 1e-3 * abs(a.value - a.baseline_value) + 1e-4


def test_clear_errors(setup):
    _, model, processor, batch = setup
    with pytest.raises(ValueError, match="one sample"):
        attribute(model, processor(text=["<|image|>a", "<|image|>b"], images=eval_set("color", 2)[0].images * 2))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        attribute(model, batch, target=10**6)
    with pytest.raises(ValueError, match="method"):
        attribute(model, batch, method="saliency")
    with pytest.raises(ValueError, match="tokenizer"):
        attribute(model, batch, target="red")
    linear = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="mPLUG-Owl"):
        attribute(linear, batch)
    assert _hooks(model) == 0


def test_attention_vs_attribution(setup):
    variant, model, processor, batch = setup
    cmp = attention_vs_attribution(model, batch, n_steps=8, tokenizer=processor)
    assert cmp.attention.shape == cmp.attribution.shape == (1, 4, 4)
    assert (cmp.attention >= 0).all() and (cmp.attribution >= 0).all()
    assert -1 <= cmp.spearman <= 1 and cmp.per_image == [pytest.approx(cmp.spearman)]
    if variant == "owl3":  # gated: the cross softmax over one image's keys sums to 1
        assert float(cmp.attention.sum()) == pytest.approx(1.0, abs=1e-5)
    else:  # owl2: part of the last position's attention; fused owl3: image block of one joint softmax
        assert 0 < float(cmp.attention.sum()) < 1
    assert _hooks(model) == 0
    if variant == "owl2":
        uniform = attention_vs_attribution(model, batch, cmp.result, weighting="uniform")
        assert float(uniform.attention.sum()) <= 1 + 1e-5 and uniform.result is cmp.result


def test_spearman_helper():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1])
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError):
        spearman([1, 2], [1, 2, 3])


def test_two_images(setup):
    variant, model, processor, _ = setup
    images = eval_set("color", 2, seed=1)[0].images + eval_set("color", 2, seed=1)[1].images
    batch = processor(text="<|image|> left <|image|> right what color is the circle ?", images=images)
    a = attribute(model, batch, n_steps=16, tokenizer=processor)
    assert a.patch_maps.shape == (2, 4, 4) and (a.patch_maps.abs().flatten(1).sum(1) > 0).all()
    assert abs(a.delta) < 1e-3 * abs(a.value - a.baseline_value) + 1e-4
    chunked = attribute(model, batch, n_steps=16, tokenizer=processor, internal_batch_size=6)
    assert torch.allclose(chunked.patch_maps, a.patch_maps, atol=1e-5)
    assert torch.allclose(chunked.token_scores, a.token_scores, atol=1e-5)
    cmp = attention_vs_attribution(model, batch, a)
    assert cmp.attention.shape == (2, 4, 4) and len(cmp.per_image) == 2
