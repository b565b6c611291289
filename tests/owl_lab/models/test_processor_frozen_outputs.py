"""The ProcessorMixin processors give bit-for-bit the batches of the lab's earlier plain-class processors.

The hashes below were computed with the processors as they were before they became
``transformers.ProcessorMixin`` subclasses (commit 04f729f): every tensor of the batch (ids, masks,
labels, media_offset, pixel_values) enters the hash with its dtype and shape, so a one-ulp change in
one pixel fails. The images are non-square, RGBA, greyscale and tiny on purpose.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from owl_lab import load_owl

SIZES = [(56, 56), (40, 30), (30, 40), (100, 57), (448, 300), (7, 200), (333, 129), (1, 1)]
PROMPT = "<|image|>what color is the circle ?"

FROZEN = {
    ("owl2-tiny", 1): "de026c1753165f80",
    ("owl2-tiny", 4): "2af6b4e8b98cf66a",
    ("owl2-tiny", 5): "48a567fee09502e7",
    ("owl2-tiny", 7): "b0f8cc60d47a4731",
    ("owl2-tiny", 8): "5bb51dfb286b6cf5",
    ("owl2-tiny", 9): "5a7afc29948231fa",
    ("owl2-tiny", "batch"): "e577519e9fdf6f0a",
    ("owl3-tiny", 1): "96ae605188e7a493",
    ("owl3-tiny", 4): "ca06ccfc711abae8",
    ("owl3-tiny", 9): "01cd912420d247de",
    ("owl3-tiny", "batch"): "064ac7d546805395",
    ("owl3-tiny", "cut", 3): "faf57ded07b22ead",
    ("owl3-tiny", "cut", 4): "df629b0b63c536db",
    ("owl3-tiny", "cut", 6): "5484c98b97d781ce",
    ("owl3-tiny-fused", 4): "9af53ad2948af33a",
    ("owl3-tiny-fused", "batch"): "8bd8ea6f5c9be934",
    ("owl3-tiny-fused", "cut", 5): "d5524030f2092f50",
    ("owl3-tiny-fused", "cut", 7): "0d3ba666bf64cd27",
}


def images() -> list:
    """The 11 test images: 8 random RGB sizes, then an RGBA, an L and a uint8-array copy."""
    rng = np.random.default_rng(0)
    out = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]
    return [*out, out[3].convert("RGBA"), out[4].convert("L"), np.asarray(out[5])]


def batch_hash(batch) -> str:
    digest = hashlib.sha256()
    for key in sorted(batch):
        values = batch[key] if isinstance(batch[key], list) else [batch[key]]
        for v in values:
            digest.update(key.encode())
            digest.update(str(v.dtype).encode())
            digest.update(str(tuple(v.shape)).encode())
            digest.update(v.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def run_case(processor, case, imgs):
    if case[-1] == "batch":
        return processor(
            ["<|image|><|image|>what ?", "<|image|>is it red ?"], images=imgs[:3], answers=["red", "a blue"]
        )
    if case[1] == "cut":
        return processor("<|image|>what ?", images=[imgs[case[2]]], cut_enable=True)
    return processor(PROMPT, images=[imgs[case[1]]])


@pytest.mark.parametrize("name", ["owl2-tiny", "owl3-tiny", "owl3-tiny-fused"])
def test_batches_are_bitwise_those_of_the_earlier_processors(name):
    _, processor = load_owl(name)
    imgs = images()
    cases = [case for case in FROZEN if case[0] == name]
    got = {case: batch_hash(run_case(processor, case, imgs)) for case in cases}
    assert got == {case: FROZEN[case] for case in cases}


def test_the_hash_sees_a_one_ulp_change():
    _, processor = load_owl("owl2-tiny")
    batch = dict(run_case(processor, ("owl2-tiny", 1), images()))
    batch["pixel_values"] = batch["pixel_values"].clone()
    batch["pixel_values"][0, 0, 0, 0] = torch.nextafter(batch["pixel_values"][0, 0, 0, 0], torch.tensor(9.0))
    assert batch_hash(batch) != FROZEN[("owl2-tiny", 1)]
