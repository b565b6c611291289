"""After ``import owl_lab``, transformers' Auto classes load a lab checkpoint: same model numbers and the
same processor outputs as ``load_owl`` (the notebooks' printed numbers depend on the processor)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, ProcessorMixin

import owl_lab  # noqa: F401  (registers the families with the Auto classes)
from owl_lab import load_owl
from owl_lab.families import family_of
from owl_lab.zoo import resolve_checkpoint


def _image(seed: int, size: int = 64) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size, size + 8 * seed, 3) * 255).astype("uint8"))


CASES = [
    dict(text="<|image|>what color is the circle ?", images=[_image(0)]),
    dict(text="<|image|><|image|>which image has more shapes ?", images=[_image(1), _image(2)]),
    dict(
        text=["<|image|>how many squares ?", "<|image|>is the circle left of the square ?"],
        images=[_image(3), _image(4)],
    ),
    dict(text="<|image|>what color is the circle ?", images=[_image(5)], answers="red"),
]


def _same_batch(a, b) -> None:
    assert sorted(a.keys()) == sorted(b.keys())
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.fixture(scope="module", params=["owl2-tiny", "owl3-tiny"])
def shipped(request):
    model, processor = load_owl(request.param)
    return resolve_checkpoint(request.param), model, processor


def test_auto_processor_gives_the_family_processor_with_identical_outputs(shipped):
    directory, model, processor = shipped
    auto = AutoProcessor.from_pretrained(directory)
    assert type(auto) is family_of(model).processor_class and isinstance(auto, ProcessorMixin)
    for case in CASES:
        _same_batch(processor(**case), auto(**case))


def test_auto_processor_without_processor_config_uses_the_config_class(shipped, tmp_path):
    """Official releases carry no processor_config.json: the registered config class decides."""
    directory, model, processor = shipped
    for path in directory.iterdir():
        if path.name not in ("processor_config.json", "model.safetensors"):
            shutil.copy(path, tmp_path / path.name)
    auto = AutoProcessor.from_pretrained(tmp_path)
    assert type(auto) is family_of(model).processor_class


def test_auto_model_and_config_load_a_shipped_checkpoint_bitwise(shipped):
    directory, model, processor = shipped
    assert type(AutoConfig.from_pretrained(directory)) is type(model.config)
    auto = AutoModelForCausalLM.from_pretrained(directory).eval()
    assert type(auto) is type(model)
    batch = processor(**CASES[1])
    with torch.no_grad():
        assert torch.equal(auto(**batch).logits, model(**batch).logits)


def test_processor_from_pretrained_still_rejects_unknown_options(shipped):
    directory, model, _ = shipped
    with pytest.raises(TypeError):
        family_of(model).processor_class.from_pretrained(directory, no_such_option=1)
