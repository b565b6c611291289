"""Owl2ImageProcessor (transformers' CLIP image processor, PIL backend, + the official squash) is bit-equal
to the lab's step-by-step ``preprocess_image``; it loads official CLIP configs and round-trips."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, CLIPImageProcessorPil

import owl_lab  # noqa: F401  (registers Owl2ImageProcessor with AutoImageProcessor)
from owl_lab.models.owl2 import Owl2ImageProcessor, Owl2Processor
from owl_lab.models.owl2.image_processing_owl2 import preprocess_image

SIZES = [(28, 28), (40, 30), (30, 40), (100, 57), (448, 300), (7, 200), (1, 1)]


def inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    for w, h in SIZES:
        rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        yield f"{w}x{h}", rgb
        yield f"{w}x{h} RGBA", rgb.convert("RGBA")
        yield f"{w}x{h} L", rgb.convert("L")
        yield f"{w}x{h} array", np.asarray(rgb)


@pytest.mark.parametrize("squash", [True, False])
@pytest.mark.parametrize("size", [28, 56])
def test_bitwise_equal_to_the_reference_preprocessing(size, squash):
    processor = Owl2ImageProcessor.for_size(size, squash=squash)
    worst = 0.0
    for label, image in inputs():
        ref = preprocess_image(image, size, squash=squash)
        got = processor(image, return_tensors="pt")["pixel_values"][0]
        assert got.dtype == torch.float32 and got.shape == ref.shape == (3, size, size), label
        worst = max(worst, (got - ref).abs().max().item())
        assert torch.equal(got, ref), label
    assert worst == 0.0


def test_squash_matters_on_non_square_images():
    image = next(img for label, img in inputs() if label == "100x57")
    on = Owl2ImageProcessor.for_size(28)(image, return_tensors="pt")["pixel_values"]
    off = Owl2ImageProcessor.for_size(28, squash=False)(image, return_tensors="pt")["pixel_values"]
    assert not torch.equal(on, off)
    # and without squash it is exactly transformers' stock CLIP image processor
    stock = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size=28)(image, return_tensors="pt")
    assert torch.equal(stock["pixel_values"], off)


def test_official_clip_config_loads_with_the_official_squash(tmp_path):
    official = {
        "image_processor_type": "CLIPImageProcessor",
        "crop_size": 448,
        "size": {"shortest_edge": 448},
        "do_center_crop": True,
        "resample": 3,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(official))
    loaded = Owl2ImageProcessor.from_pretrained(tmp_path)
    assert loaded.image_size == 448 and loaded.do_squash


def test_save_and_auto_load_round_trip(tmp_path, tokenizer):
    processor = Owl2Processor(tokenizer, image_size=28, squash=False)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["image_processor"]["do_squash"] is False and saved["processor_class"] == "Owl2Processor"
    auto = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(auto) is Owl2ImageProcessor and auto.to_dict() == processor.image_processor.to_dict()
    again = Owl2Processor.from_pretrained(tmp_path)
    assert again.image_size == 28 and not again.squash and again.to_dict() == processor.to_dict()


def test_settings_and_image_processor_together_are_an_error(tokenizer):
    with pytest.raises(ValueError, match="either image_processor or the image settings"):
        Owl2Processor(tokenizer, image_size=28, image_processor=Owl2ImageProcessor.for_size(28))
    with pytest.raises(ValueError, match="positive"):
        Owl2ImageProcessor.for_size(0)
