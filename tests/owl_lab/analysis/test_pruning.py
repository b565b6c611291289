"""Visual-token pruning: fraction 0 is the plain model; dropping everything after K = a visual knockout."""

from __future__ import annotations

import pytest
import torch

import hooks
from owl_lab.analysis.causal import gather_positions, last_positions, layouts
from owl_lab.analysis.knockout import answer_ids
from owl_lab.analysis.pruning import prune_sweep, summarize
from owl_lab.synth import eval_set


def _layer(variant, model):
    return model.config.hyper_layer_indices[0] if variant.startswith("owl3") else 0


def test_endpoints(tiny_owl, hooks_left):
    variant, model, processor, _ = tiny_owl
    examples = eval_set("color", 3, seed=2)
    layer = _layer(variant, model)
    if layer >= model.config.num_hidden_layers - 1:
        pytest.skip("no layer after the first hyper layer in this tiny config")
    df = prune_sweep(model, processor, examples, layer=layer, fractions=(0.0, 1.0), progress=False)
    batch = processor(
        text=[e.text for e in examples], images=[e.images for e in examples], return_tensors="pt"
    )
    ids = answer_ids(processor, examples)
    with torch.no_grad(), layouts(model) as seen:
        plain = model(**batch).logits
        pos = last_positions(seen[0])
        with hooks.knockout(
            model, queries="all", keys="visual", layers=range(layer + 1, model.config.num_hidden_layers)
        ):
            knocked = model(**batch).logits
    p_plain = torch.softmax(gather_positions(plain, pos).float(), -1)[torch.arange(3), ids]
    p_knocked = torch.softmax(gather_positions(knocked, pos).float(), -1)[torch.arange(3), ids]
    for rule in ("attention", "random"):
        d = df[df.rule == rule].sort_values(["fraction", "example"])
        assert torch.allclose(
            torch.tensor(d[d.fraction == 0].p.values, dtype=torch.float32), p_plain, atol=1e-6
        )
        assert torch.allclose(
            torch.tensor(d[d.fraction == 1].p.values, dtype=torch.float32), p_knocked, atol=1e-5
        )
    s = summarize(df)
    assert set(s.columns) >= {"rule", "fraction", "accuracy", "se", "drop", "drop_se"}
    assert hooks_left(model) == 0


def test_bad_input(tiny_owl):
    _, model, processor, _ = tiny_owl
    examples = eval_set("color", 1)
    with pytest.raises(ValueError, match="rules"):
        prune_sweep(model, processor, examples, layer=0, rules=["magic"], progress=False)
    with pytest.raises(ValueError, match="layer"):
        prune_sweep(model, processor, examples, layer=model.config.num_hidden_layers - 1, progress=False)


def test_answer_visual_share_matches_the_full_capture(tiny_owl):
    """The in-hook reduction (mean head, last query per sample) equals reading the full table, with
    prompts of different lengths (padding) so each sample's last position differs."""
    from hooks import capture
    from owl_lab.analysis.pruning import answer_visual_share
    from owl_lab.models.observe import TOKEN_IMAGE

    variant, model, processor, _ = tiny_owl
    examples = eval_set("color", 2, seed=3) + eval_set("count", 2, seed=3)
    if variant.startswith("owl3"):
        with pytest.raises(ValueError, match="sequence rows"):
            answer_visual_share(model, processor, examples)
        return
    share, fraction = answer_visual_share(model, processor, examples, batch_size=3)
    assert share.shape == (4, model.config.num_hidden_layers) and list(fraction.index) == [0, 1, 2, 3]
    batch = processor(
        text=[e.text for e in examples], images=[e.images for e in examples], return_tensors="pt"
    )
    with torch.no_grad(), layouts(model) as seen, capture(model, gates=False, abstractor=False) as rec:
        model(**batch)
    last = last_positions(seen[0])
    t = rec.attention_mass
    t = t[(t.kind == "self") & (t.level == "modality") & (t.group == "visual")]
    t = t[t["query"] == t.batch.map(dict(enumerate(last.tolist())))]
    full = t.groupby(["batch", "layer"], observed=True).mass.mean().unstack("layer")
    assert (share.to_numpy() - full.to_numpy()).__abs__().max() < 1e-5
    kind = seen[0].token_kind
    real = kind >= 0
    want = ((kind == TOKEN_IMAGE) & real).sum(1) / real.sum(1)
    assert torch.allclose(torch.tensor(fraction.to_numpy()), want.double())
    assert 0 < fraction.min() and fraction.max() < 1
