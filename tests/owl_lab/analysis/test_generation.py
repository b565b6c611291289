"""owl_lab.analysis.generation: the answer-producing rows of a generate capture."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from hooks import capture
from owl_lab.analysis.generation import answer_mass, answer_rows
from owl_lab.analysis.mass import layer_mass
from owl_lab.synth import eval_set


def test_answer_rows_keeps_last_prompt_query_per_batch_row_and_decode_steps():
    rows = [
        dict(batch=b, step=0, layer=0, head=0, query=q, kind="self", level="modality", group="text", mass=1.0)
        for b, n in ((0, 4), (1, 6))
        for q in range(n)
    ]
    rows += [
        dict(batch=b, step=s, layer=0, head=0, query=q, kind="self", level="modality", group="text", mass=1.0)
        for b in (0, 1)
        for s, q in ((1, 6), (2, 7))
    ]
    out = answer_rows(pd.DataFrame(rows))
    assert sorted(zip(out["batch"], out["step"], out["query"], strict=True)) == [
        (0, 0, 3),
        (0, 1, 6),
        (0, 2, 7),
        (1, 0, 5),
        (1, 1, 6),
        (1, 2, 7),
    ]
    with pytest.raises(ValueError, match="empty"):
        answer_rows(pd.DataFrame(columns=["batch", "step", "query"]))


@pytest.fixture(scope="module")
def tiny_owl2():
    from owl_lab.train import build

    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        image_size=28,
        patch_size=7,
        num_hidden_layers=1,
    )
    config = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        initializer_range=0.1,
        visual_config={
            "visual_model": vision,
            "visual_abstractor": dict(
                hidden_size=16,
                encoder_hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
                num_learnable_queries=4,
                grid_size=4,
            ),
        },
    )
    torch.set_num_threads(1)
    model, processor = build({"family": "owl2", "seed": 0, "config": config})
    model.generation_config.eos_token_id = None  # random weights: always generate max_new_tokens
    return model.eval(), processor


def test_answer_mass_equals_full_forward_at_the_answer_positions(tiny_owl2):
    """Decode steps see the same attention as one forward over prompt + fed-back tokens."""
    model, processor = tiny_owl2
    ex = eval_set("color", 1, seed=3)[0]
    table = answer_mass(model, processor, [ex], max_new_tokens=3, groups=["visual", "text"])
    batch = processor(text=ex.text, images=ex.images)
    with torch.no_grad():
        new = model.generate(**batch, max_new_tokens=3, do_sample=False)[:, batch["input_ids"].shape[1] :]
    ids = torch.cat([batch["input_ids"], new[:, :-1]], 1)  # the last new token is never fed back
    with capture(model, abstractor=False) as rec, torch.no_grad():
        model(input_ids=ids, pixel_values=batch["pixel_values"])
    df = rec.attention_mass
    n_seq = int(df["query"].max()) + 1
    full = layer_mass(df, queries=lambda q: q >= n_seq - 3, groups=["visual", "text"])
    pd.testing.assert_frame_equal(table, full, atol=1e-5, check_dtype=False)
    assert ((table.sum(axis=1) - 1).abs() < 1e-5).all() and (table["visual"] > 0).all()


def test_answer_mass_averages_examples_equally(tiny_owl2):
    model, processor = tiny_owl2
    a, b = eval_set("add", 2, seed=1)  # text only: no visual group at all
    one = [answer_mass(model, processor, [e], level="token") for e in (a, b)]
    both = answer_mass(model, processor, [a, b], level="token")
    pd.testing.assert_frame_equal(both, (one[0] + one[1]) / 2, atol=1e-6)
    each = answer_mass(model, processor, [a, b], level="token", per_example=True)
    assert len(each) == 2 and all(x.equals(y) for x, y in zip(each, one, strict=True))
    assert "image:0" not in both.columns and {"bos", "question", "generated"} <= set(both.columns)
    with pytest.raises(ValueError, match="at least one"):
        answer_mass(model, processor, [])
