"""Tiny random Owl2 / Owl3 (gated, fused) models with O(1) weights, shared by the attribution and
attention-vs-attribution tests (IG on a 0.02-init model is nearly linear and tests nothing); their
configs are the ``tiny_configs`` fixture of tests/conftest.py."""

from __future__ import annotations

import math

import pytest
import torch

from owl_lab.synth import build_tokenizer, eval_set

VARIANTS = {
    "owl2": ("owl2", {}),
    "owl3": ("owl3", {}),
    "owl3-fused": ("owl3", dict(hyper_attention="fused", projector="mlp")),
}


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


def build(variant: str, configs: dict[str, dict]):
    """``configs``: the ``tiny_configs`` fixture (tests/conftest.py)."""
    family, overrides = VARIANTS[variant]
    from owl_lab.train import family_classes

    Config, Model, Processor = family_classes(family)
    tok = build_tokenizer(family)
    config = Config(
        **{**configs[family], **overrides},
        vocab_size=len(tok),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(0)
    model = randomize(Model(config))
    processor = (
        Processor.from_config(config, tok)
        if hasattr(Processor, "from_config")
        else Processor(tok, image_size=28)
    )
    return model, processor


@pytest.fixture(autouse=True, scope="module")
def _single_thread(single_thread):
    """Every test here runs on one intra-op thread (tests/conftest.py)."""


@pytest.fixture(scope="module", params=list(VARIANTS))
def tiny_owl(request, build_tiny_owl):
    model, processor = build_tiny_owl(request.param)
    ex = eval_set("color", 1, seed=0)[0]
    batch = processor(text=ex.text, images=ex.images)
    return request.param, model, processor, batch


def hook_count(model) -> int:
    """Forward/backward hooks registered anywhere in the model (must be 0 after every call)."""
    return sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + len(getattr(m, "_backward_pre_hooks", {}))
        for m in model.modules()
    )


@pytest.fixture
def hooks_left():
    return hook_count


@pytest.fixture(scope="session")
def build_tiny_owl(tiny_configs):
    """``build(variant) -> (model, processor)`` for 'owl2', 'owl3' (gated) or 'owl3-fused'."""
    return lambda variant: build(variant, tiny_configs)


def _small_owl2_config(**overrides):
    """A tiny Owl2 config with 2 heads and 3 abstractor queries on a 4×4 patch grid (so 3 queries +
    vit_eos = 4 visual rows); keyword ``overrides`` (vocab_size, ...) are passed to ``Owl2Config``."""
    from owl_lab.models.owl2 import Owl2Config

    visual = {
        "visual_model": dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=7,
        ),
        "visual_abstractor": dict(
            num_learnable_queries=3,
            hidden_size=16,
            encoder_hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=24,
            grid_size=4,
        ),
    }
    values = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        visual_config=visual,
    )
    return Owl2Config(**{**values, **overrides})


@pytest.fixture(scope="session")
def small_owl2_config():
    """``small_owl2_config(**overrides) -> Owl2Config`` for the interventions and tour tests."""
    return _small_owl2_config
