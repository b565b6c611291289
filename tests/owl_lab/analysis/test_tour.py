"""Architecture tours report the shapes the model really produces."""

from __future__ import annotations

import pytest
import torch

from owl_lab.analysis.tour import owl2_stages, owl3_stages
from owl_lab.models.owl2 import Owl2ForCausalLM, Owl2Processor
from owl_lab.models.owl3 import Owl3Config, Owl3ForCausalLM, Owl3Processor
from owl_lab.synth import build_tokenizer, eval_set


def _build(family, small_owl2_config):
    tokenizer = build_tokenizer(family)
    if family == "owl2":
        cfg = small_owl2_config(vocab_size=len(tokenizer))
        return Owl2ForCausalLM(cfg).eval(), Owl2Processor(tokenizer, image_size=28)
    cfg = Owl3Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        hyper_layers=[2],
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=7,
        ),
        hyper_attention="gated",
        projector="linear",
    )
    return Owl3ForCausalLM(cfg).eval(), Owl3Processor(tokenizer, image_size=28)


@pytest.mark.parametrize("family, stages", [("owl2", owl2_stages), ("owl3", owl3_stages)])
def test_tour_shapes(family, stages, small_owl2_config):
    torch.manual_seed(0)
    model, processor = _build(family, small_owl2_config)
    example = eval_set("color", 1, seed=3, render_size=56)[0]
    batch = processor(text=example.text, images=example.images)
    table = stages(model, batch)
    shapes = dict(zip(table["stage"], table["shape"], strict=True))
    assert shapes["pixel_values"] == "1×3×28×28"
    if stages is owl2_stages:
        assert shapes["ViT output"] == "1×17×16"  # CLS + 4×4 patches
        assert shapes["visual_fc + vit_eos"] == "1×4×32"  # 3 queries + vit_eos
        L = batch["input_ids"].shape[1]
        assert shapes["decoder sequence"] == f"1×{L - 1 + 4}×32"
    else:
        L = batch["input_ids"].shape[1]
        assert shapes["logits"].startswith(f"1×{L}×")
        assert shapes["visual K|V (hyper layer)"] == "1×16×32"  # K and V: 2 × 1 kv head × head_dim 16
