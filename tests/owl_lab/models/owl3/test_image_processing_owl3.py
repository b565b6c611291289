"""Owl3ImageProcessor: a transformers image processor that keeps the lab's resize/normalise and cut/anchor
arithmetic; its outputs drive the Owl3Processor's prompt text; it round-trips through AutoImageProcessor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

import owl_lab  # noqa: F401  (registers Owl3ImageProcessor with AutoImageProcessor)
from owl_lab.models.owl3 import Owl3ImageProcessor
from owl_lab.models.owl3.image_processing_owl3 import select_anchor


def reference(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """The official steps: bicubic resize, ToTensor (÷255), Normalize(0.5, 0.5)."""
    x = torch.from_numpy(np.asarray(image.convert("RGB").resize((width, height), Image.BICUBIC)).copy())
    return (x.permute(2, 0, 1).float() / 255 - 0.5) / 0.5


def test_plain_and_cut_outputs_match_the_official_steps():
    rng = np.random.default_rng(3)
    wide = Image.fromarray(rng.integers(0, 256, (30, 130, 3), dtype=np.uint8))
    square = Image.fromarray(rng.integers(0, 256, (50, 50, 3), dtype=np.uint8))
    processor = Owl3ImageProcessor.for_size(28)
    plain = processor([wide, square])
    assert plain["cut_shapes"].tolist() == [[0, 0], [0, 0]]
    assert torch.equal(plain["pixel_values"][0], reference(wide, 28, 28))
    cut = processor([wide, square], cut_enable=True)
    rows, cols = select_anchor(130, 30, 28)
    assert cut["cut_shapes"].tolist() == [[rows, cols], [2, 2]] and (rows, cols) == (1, 4)
    assert cut["pixel_values"].shape == (rows * cols + 1 + 4 + 1, 3, 28, 28)
    big = reference(wide, cols * 28, rows * 28)
    assert torch.equal(cut["pixel_values"][1], big[:, :, 28:56])  # second tile of the single row
    assert torch.equal(cut["pixel_values"][rows * cols], reference(wide, 28, 28))  # then the global view


def test_bad_inputs_are_clear_errors():
    processor = Owl3ImageProcessor.for_size(28)
    with pytest.raises(ValueError, match="PIL images"):
        processor(["not an image"])
    with pytest.raises(ValueError, match="square"):
        processor(Image.new("RGB", (8, 8)), size={"height": 28, "width": 14})


def test_save_and_auto_load_round_trip(tmp_path):
    processor = Owl3ImageProcessor.for_size(28, cut_enable=True)
    processor.save_pretrained(tmp_path)
    auto = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(auto) is Owl3ImageProcessor and auto.to_dict() == processor.to_dict()
    image = Image.new("RGB", (90, 30), (1, 2, 3))
    assert torch.equal(auto(image)["pixel_values"], processor(image)["pixel_values"])
