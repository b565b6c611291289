"""Logit lens and direct logit attribution on tiny random Owls (Owl2, Owl3 gated, Owl3 fused)."""

from __future__ import annotations

import torch

from owl_lab.analysis import logit_lens
from owl_lab.analysis.causal import gather_positions, last_positions, layouts
from owl_lab.analysis.logit_lens import direct_logit_attribution


def test_final_layer_of_the_lens_is_the_model_output(tiny_owl, hooks_left):
    _, model, _, batch = tiny_owl
    with torch.no_grad():
        logp = torch.log_softmax(model(**batch).logits.float(), dim=-1)  # [1, L, V]
    df = logit_lens(model, batch, top_k=3)
    assert list(df.columns) == ["layer", "batch", "position", "rank", "token_id", "token", "logprob"]
    last = df[df.layer == df.layer.max()]
    assert len(last) == 3 * logp.shape[1]
    for row in last.itertuples():
        assert abs(row.logprob - float(logp[row.batch, row.position, row.token_id])) < 1e-5
    top = logp[0].topk(3, dim=-1).indices  # [L, 3]
    assert last.sort_values(["position", "rank"]).token_id.tolist() == top.flatten().tolist()
    assert df.layer.nunique() == model.config.num_hidden_layers
    assert hooks_left(model) == 0


def test_lens_positions_last(tiny_owl):
    _, model, _, batch = tiny_owl
    df = logit_lens(model, batch, top_k=1, positions="last")
    with torch.no_grad(), layouts(model) as seen:
        model(**batch)
    assert set(df.position) == {int(last_positions(seen[0])[0])}


def test_dla_sums_to_the_logit_and_splits_attention_by_modality(tiny_owl, hooks_left):
    variant, model, _, batch = tiny_owl
    target = torch.tensor([5])
    with torch.no_grad(), layouts(model) as seen:
        logits = model(**batch).logits
    logit = float(gather_positions(logits, last_positions(seen[0]))[0, 5])
    df = direct_logit_attribution(model, batch, target)
    assert abs(df[df.part == "all"].value.sum() - logit) < 1e-4
    attn = df[df.component == "attn"].pivot_table(index="layer", columns="part", values="value")
    if variant != "owl3-fused":
        split = attn.dropna()
        assert len(split) > 0
        assert ((split.visual + split.text) - split["all"]).abs().max() < 1e-4
        assert split.visual.abs().max() > 0  # some layer reads the image
    assert hooks_left(model) == 0
