"""owl_lab.analysis.attribution: IG completeness, exact zeros, determinism, no hooks left."""

from __future__ import annotations

import time

import pytest
import torch

from owl_lab.analysis.attribution import attribute
from owl_lab.synth import eval_set


def test_shapes_tokens_and_completeness(tiny_owl):
    variant, model, processor, batch = tiny_owl
    t0 = time.perf_counter()
    a = attribute(model, batch, n_steps=32, tokenizer=processor)
    seconds = time.perf_counter() - t0
    assert seconds < 10, f"attribution took {seconds:.1f} s on a tiny model"
    assert a.patch_maps.shape == (1, 4, 4) and torch.isfinite(a.patch_maps).all()
    ids = batch["input_ids"][0]
    n_tok = int((ids != -200).sum())  # Owl2 markers are excluded, Owl3 placeholders are text tokens
    assert (
        a.token_scores.shape == (n_tok,) and len(a.tokens) == n_tok and torch.isfinite(a.token_scores).all()
    )
    assert "<|image|>" in a.tokens if variant != "owl2" else "<|image|>" not in a.tokens
    assert a.target_id == int(model(**batch).logits[0, -1].argmax())  # default: the greedy next token
    assert a.extra["marker_attribution"] == 0.0  # unused embedding rows at -200 markers get nothing
    # completeness: the attributions sum to f(input) - f(baseline); Gauss-Legendre converges fast
    gap = a.value - a.baseline_value
    assert abs(gap) > 0.1, "degenerate test model: input and baseline score alike"
    assert a.total == pytest.approx(gap + a.delta, abs=1e-4)
    assert abs(a.delta) < 1e-3 * abs(gap) + 1e-4
    assert a.patch_maps.abs().sum() > 0 and a.token_scores.abs().sum() > 0


def test_trapezoid_delta_shrinks_like_one_over_n(tiny_owl):
    _, model, processor, batch = tiny_owl
    d16 = attribute(model, batch, n_steps=16, tokenizer=processor, integration="riemann_trapezoid").delta
    d32 = attribute(model, batch, n_steps=32, tokenizer=processor, integration="riemann_trapezoid").delta
    assert abs(d16) > 1e-3 and 1.5 < abs(d16) / abs(d32) < 2.7  # first-order rule: halves when n doubles


def test_exact_zeros_for_unchanged_patches_and_kept_tokens(tiny_owl):
    """A patch equal to the baseline image, and tokens kept in the text baseline, get exactly 0."""
    variant, model, processor, batch = tiny_owl
    batch = dict(batch)
    pixels = batch["pixel_values"].clone()
    pixels[..., :7, :7] = 0  # patch (0, 0) of the 4×4 grid equals the zero baseline image
    batch["pixel_values"] = pixels
    a = attribute(model, batch, n_steps=8, tokenizer=processor)
    assert a.patch_maps[0, 0, 0] == 0 and (a.patch_maps[0].flatten()[1:] != 0).all()
    special = set(processor.tokenizer.all_special_ids) - {processor.tokenizer.pad_token_id}
    kept = [i for i, p in enumerate(a.token_positions.tolist()) if int(batch["input_ids"][0, p]) in special]
    assert kept and (a.token_scores[kept] == 0).all()  # BOS / chat markers stay in the baseline


def test_deterministic_no_hooks_left_and_grad_free(tiny_owl, hooks_left):
    _, model, processor, batch = tiny_owl
    before = hooks_left(model)
    with torch.no_grad():  # a notebook may call it under no_grad: gradients are enabled inside
        a = attribute(model, batch, target="red", n_steps=8, tokenizer=processor)
        b = attribute(model, batch, target="red", n_steps=8, tokenizer=processor)
    assert hooks_left(model) == before == 0
    assert all(p.grad is None for p in model.parameters()) and not model.training
    assert a.target == "red" and a.target_id == processor.tokenizer.convert_tokens_to_ids("red")
    assert torch.equal(a.patch_maps, b.patch_maps) and torch.equal(a.token_scores, b.token_scores)
    assert a.delta == b.delta


def test_no_hooks_left_when_the_forward_raises(tiny_owl, hooks_left, monkeypatch):
    _, model, processor, batch = tiny_owl
    forward = model.forward

    def failing(*args, **kwargs):  # fails inside captum's integration pass (k copies), hooks registered
        if kwargs["input_ids"].shape[0] > 1:
            raise RuntimeError("boom")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", failing)
    with pytest.raises(RuntimeError, match="boom"):
        attribute(model, batch, n_steps=4, tokenizer=processor)
    assert hooks_left(model) == 0


def test_text_only_prompt_and_logprob_score(tiny_owl):
    variant, model, processor, _ = tiny_owl
    batch = processor(text="what is two plus three ?")
    a = attribute(model, batch, n_steps=16, score="logprob", tokenizer=processor)
    assert a.patch_maps.numel() == 0 and a.image_share == 0.0
    assert a.value <= 0 and abs(a.delta) < 1e-3 * abs(a.value - a.baseline_value) + 1e-4


def test_clear_errors(tiny_owl, hooks_left):
    _, model, processor, batch = tiny_owl
    with pytest.raises(ValueError, match="one sample"):
        attribute(
            model, processor(text=["<|image|>a", "<|image|>b"], images=eval_set("color", 2)[0].images * 2)
        )
    with pytest.raises(ValueError, match="outside the vocabulary"):
        attribute(model, batch, target=10**6)
    with pytest.raises(ValueError, match="method"):
        attribute(model, batch, method="saliency")
    with pytest.raises(ValueError, match="tokenizer"):
        attribute(model, batch, target="red")
    linear = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="mPLUG-Owl"):
        attribute(linear, batch)
    assert hooks_left(model) == 0


def test_two_images(tiny_owl):
    variant, model, processor, _ = tiny_owl
    images = eval_set("color", 2, seed=1)[0].images + eval_set("color", 2, seed=1)[1].images
    batch = processor(text="<|image|> left <|image|> right what color is the circle ?", images=images)
    a = attribute(model, batch, n_steps=16, tokenizer=processor)
    assert a.patch_maps.shape == (2, 4, 4) and (a.patch_maps.abs().flatten(1).sum(1) > 0).all()
    assert abs(a.delta) < 1e-3 * abs(a.value - a.baseline_value) + 1e-4
    chunked = attribute(model, batch, n_steps=16, tokenizer=processor, internal_batch_size=6)
    assert torch.allclose(chunked.patch_maps, a.patch_maps, atol=1e-5)
    assert torch.allclose(chunked.token_scores, a.token_scores, atol=1e-5)
