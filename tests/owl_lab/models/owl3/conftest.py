"""Tiny random Owl3 models and the toy tokenizer for the owl3 tests (CPU, fp32, seeded)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from owl_lab.models.owl3 import Owl3Config, Owl3ForCausalLM, Owl3Processor, build_word_tokenizer

IMAGE_ID = 396  # `<|image|>` in the golden toy vocabulary


def tiny_config(kind: str = "gated", **overrides) -> Owl3Config:
    """4 decoder layers (hyper: 0 and 2), hidden 32, 4 heads / 2 kv heads, SigLIP 28 px → 4 tokens/image."""
    values = dict(
        vocab_size=400,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        hyper_layers=[1, 3],
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        bos_token_id=399,
        eos_token_id=397,
        max_window_layers=4,
        tie_word_embeddings=False,
        hyper_attention=kind,
        projector="mlp" if kind == "fused" else "linear",
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
    )
    values.update(overrides)
    return Owl3Config(**values)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Golden-style init (unit-scale signals, so gates / images matter): N(0,1)/sqrt(fan_in) weights,
    1 + 0.1 N(0,1) norm weights, 0.1 N(0,1) biases, N(0,1) embeddings, a non-zero static gate."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if "norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.1 * r)
        elif name.endswith("bias") or name.endswith("self_attn.gate"):
            p.copy_(0.5 * r if "gate" in name else 0.1 * r)
        elif p.dim() == 1:
            p.copy_(0.1 * r)
        elif "embed_tokens" in name or "position_embedding" in name:
            p.copy_(r)
        else:
            fan_in = math.prod(p.shape[1:])
            p.copy_(r / math.sqrt(fan_in))
    return model.eval()


def tiny_model(kind: str = "gated", seed: int = 0, **overrides) -> Owl3ForCausalLM:
    torch.manual_seed(seed)
    return randomize(Owl3ForCausalLM(tiny_config(kind, **overrides)), seed)


def random_images(n: int, seed: int = 0, sizes=((40, 30), (30, 50), (28, 28), (64, 20))) -> list[Image.Image]:
    rng = np.random.RandomState(seed)
    return [
        Image.fromarray(
            rng.randint(0, 256, (sizes[i % len(sizes)][1], sizes[i % len(sizes)][0], 3), dtype=np.uint8)
        )
        for i in range(n)
    ]


@pytest.fixture(autouse=True, scope="module")
def _single_thread(single_thread):
    """Every test here runs on one intra-op thread (tests/conftest.py)."""


@pytest.fixture(scope="session")
def toy_vocab(owl3_golden_dir) -> dict:
    return json.loads((owl3_golden_dir / "toy_vocab.json").read_text())


@pytest.fixture(scope="session")
def toy_tokenizer(toy_vocab):
    return build_word_tokenizer(toy_vocab)


@pytest.fixture
def make_processor(toy_tokenizer):
    def make(model, **kwargs) -> Owl3Processor:
        return Owl3Processor.from_config(model.config, toy_tokenizer, **kwargs)

    return make


@pytest.fixture(scope="session")
def owl3():
    """Helpers for test modules (importlib mode: tests cannot import this conftest directly)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        config=tiny_config, model=tiny_model, images=random_images, randomize=randomize, IMAGE_ID=IMAGE_ID
    )
