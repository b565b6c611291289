"""owl_lab.analysis.compare: attention next to IG for patches, prompt tokens and token groups."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from owl_lab.analysis.attribution import attribute
from owl_lab.analysis.compare import (
    attention_vs_attribution,
    attention_vs_token_attribution,
    compare_examples,
    spearman,
)
from owl_lab.synth import eval_set


def test_attention_vs_attribution(tiny_owl, hooks_left):
    variant, model, processor, batch = tiny_owl
    cmp = attention_vs_attribution(model, batch, n_steps=8, tokenizer=processor)
    assert cmp.attention.shape == cmp.attribution.shape == (1, 4, 4)
    assert (cmp.attention >= 0).all() and (cmp.attribution >= 0).all()
    assert -1 <= cmp.spearman <= 1 and cmp.per_image == [pytest.approx(cmp.spearman)]
    if variant == "owl3":  # gated: the cross softmax over one image's keys sums to 1
        assert float(cmp.attention.sum()) == pytest.approx(1.0, abs=1e-5)
    else:  # owl2: part of the last position's attention; fused owl3: image block of one joint softmax
        assert 0 < float(cmp.attention.sum()) < 1
    assert hooks_left(model) == 0
    if variant == "owl2":
        uniform = attention_vs_attribution(model, batch, cmp.result, weighting="uniform")
        assert float(uniform.attention.sum()) <= 1 + 1e-5 and uniform.result is cmp.result


def test_two_images_per_image_correlations(tiny_owl):
    _, model, processor, _ = tiny_owl
    images = eval_set("color", 2, seed=1)[0].images + eval_set("color", 2, seed=1)[1].images
    batch = processor(text="<|image|> left <|image|> right what color is the circle ?", images=images)
    cmp = attention_vs_attribution(model, batch, n_steps=8, tokenizer=processor)
    assert cmp.attention.shape == (2, 4, 4) and len(cmp.per_image) == 2
    assert cmp.per_image[0] == pytest.approx(spearman(cmp.attention[0], cmp.attribution[0]))


def test_token_comparison_matches_eager_attention(tiny_owl, hooks_left):
    """Token attention = the eager attention probabilities of the last position (mean over heads,
    layers), read at the right decoder position (Owl2: after the image rows)."""
    variant, model, processor, batch = tiny_owl
    tok = attention_vs_token_attribution(model, batch, n_steps=8, tokenizer=processor)
    a = tok.result
    table = tok.table
    assert list(table["token"]) == a.tokens and list(table["position"]) == a.token_positions.tolist()
    assert torch.allclose(torch.tensor(table["attribution"].to_numpy()), a.token_scores.abs().double())
    assert (table.loc[~table["attributed"], "attribution"] == 0).all()  # kept in the baseline: exact 0
    assert table["attributed"].sum() >= 3 and -1 <= tok.spearman <= 1
    assert set(table["group"]) <= {"bos", "question", "placeholder"}
    if variant != "owl3-fused":  # the eager path returns the plain self-attention probabilities
        with torch.no_grad():
            att = model(**batch, output_attentions=True).attentions  # n_layers × [1, H, L, L]
        last = torch.stack([x[0, :, -1].mean(0) for x in att]).mean(0)  # [L]
        marker = (batch["input_ids"][0] == -200).long()
        seq = torch.arange(marker.numel()) + (marker.cumsum(0) - marker) * (
            model.config.tokens_per_image - 1 if variant == "owl2" else 0
        )
        expected = last[seq[a.token_positions]]
        assert torch.allclose(torch.tensor(table["attention"].to_numpy()).float(), expected, atol=1e-5)
    # groups: each column is a distribution; text tokens + image keys make up the whole softmax
    groups = tok.groups
    assert groups["attribution"].sum() == pytest.approx(1.0) and "image:0" in groups.index
    image_attention = groups.loc[groups.index.str.startswith("image"), "attention"]
    if variant == "owl3":  # gated: images live in a separate cross softmax
        assert image_attention.isna().all() and table["attention"].sum() == pytest.approx(1.0, abs=1e-5)
    else:
        assert 0 < image_attention.sum() < 1
        assert table["attention"].sum() + image_attention.sum() == pytest.approx(1.0, abs=1e-5)
    assert groups.loc["image:0", "attribution"] == pytest.approx(a.image_share, abs=1e-6)
    same = attention_vs_token_attribution(model, batch, a, absolute=False)
    assert same.result is a and same.table["attribution"].tolist() == a.token_scores.tolist()
    assert hooks_left(model) == 0


def test_spearman_helper():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(
        np.corrcoef([1, 2.5, 2.5, 4], [1, 2, 3, 4])[0, 1]
    )
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError):
        spearman([1, 2], [1, 2, 3])


def test_compare_examples_rows(tiny_owl):
    variant, model, processor, _ = tiny_owl
    examples = eval_set("color", 2, seed=4) + eval_set("add", 1, seed=4)
    table = compare_examples(model, processor, examples, n_steps=8)
    assert list(table["example"]) == [0, 1, 2] and list(table["expected"]) == [e.answer for e in examples]
    first = examples[0]
    batch = processor(text=first.text, images=first.images)
    a = attribute(model, batch, n_steps=8, tokenizer=processor)
    row = table.iloc[0]
    assert row["target"] == a.target and row["image_share_ig"] == pytest.approx(a.image_share)
    assert row["token_spearman"] == pytest.approx(attention_vs_token_attribution(model, batch, a).spearman)
    assert row["patch_spearman"] == pytest.approx(attention_vs_attribution(model, batch, a).spearman)
    assert row["gap"] == pytest.approx(abs(a.delta) / abs(a.value - a.baseline_value))
    assert math.isnan(table.iloc[2]["patch_spearman"])  # text-only prompt: no patches
    if variant == "owl3":
        assert table["image_share_attention"].isna().all()  # gated: images are not in the sequence softmax
    else:
        assert 0 < row["image_share_attention"] < 1
