"""Tiny random Owl2 models and a word-level tokenizer for the owl2 tests (CPU, fp32, fast)."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from owl_lab.models.owl2 import Owl2Config, Owl2ForCausalLM, Owl2Processor

WORDS = [
    "<unk>",
    "<s>",
    "</s>",
    "USER:",
    "ASSISTANT:",
    "what",
    "color",
    "is",
    "the",
    "circle",
    "square",
    "?",
    "red",
    "blue",
    "green",
    "a",
    "describe",
    "image",
    "and",
    "left",
    "right",
]


def tiny_config(**overrides) -> Owl2Config:
    """2-layer LLM (hidden 64), 1-layer ViT on 28-px images (2×2 patches + CLS), 4 queries → 5 rows."""
    llm = dict(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
    )
    visual_model = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
        layer_norm_eps=1e-6,
        hidden_act="quick_gelu",
    )
    visual_abstractor = dict(
        hidden_size=32,
        encoder_hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=40,
        num_learnable_queries=4,
        layer_norm_eps=1e-6,
    )
    llm.update(overrides)
    return Owl2Config(
        visual_config={"visual_model": visual_model, "visual_abstractor": visual_abstractor}, **llm
    )


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """O(1) random weights (the default 0.02 init makes every attention map nearly uniform, which
    would let masking mistakes slip under a tolerance). Norm weights 1 + 0.1 N so misplaced norms show."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if p.ndim >= 2 and "embed" not in name and "position" not in name:
            p.copy_(r / math.sqrt(p[0].numel()))
        elif name.endswith("bias"):
            p.copy_(0.1 * r)
        elif p.ndim == 1:
            p.copy_(1 + 0.1 * r)
        else:
            p.copy_(r)
    return model


def make_model(seed: int = 0, attn: str = "sdpa", **overrides) -> Owl2ForCausalLM:
    config = tiny_config(**overrides)
    config._attn_implementation = attn
    return randomize(Owl2ForCausalLM(config), seed).eval()


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )


def rand_pixels(n: int, seed: int = 1, size: int = 28) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_model() -> Owl2ForCausalLM:
    return make_model()


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def processor(tokenizer) -> Owl2Processor:
    return Owl2Processor(tokenizer, image_size=28)


class _Helpers:
    """Test files get the builders through the ``owl2`` fixture (importlib mode: no conftest imports)."""

    tiny_config = staticmethod(tiny_config)
    randomize = staticmethod(randomize)
    make_model = staticmethod(make_model)
    make_tokenizer = staticmethod(make_tokenizer)
    rand_pixels = staticmethod(rand_pixels)


@pytest.fixture(scope="session")
def owl2() -> type[_Helpers]:
    return _Helpers


@pytest.fixture(autouse=True, scope="module")
def _single_thread(single_thread):
    """Every test here runs on one intra-op thread (tests/conftest.py)."""
