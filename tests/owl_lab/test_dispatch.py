"""accelerate dispatch through ``load_owl(device_map=..., max_memory=..., offload_folder=...)``.

Decoder layers offloaded to disk must not change a number: logits, capture()'s attention masses and the
causal toolkit's hook sites equal the undispatched model's (bitwise on CPU fp32).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import hooks
from owl_lab import load_owl
from owl_lab.families import family_of
from owl_lab.models.dispatch import complete_device_map, needs_dispatch
from owl_lab.models.llava import build_for_training
from owl_lab.synth.tokenizer import build_tokenizer
from owl_lab.train import load_recipe

SITES = ["blocks.1.hook_resid_post", "blocks.2.hook_attn_out", "hook_image_embeds"]
PROMPT = "<|image|>what color is the circle ?"


def _image(seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(64, 64, 3) * 255).astype("uint8"))


def _observe(model, batch):
    with torch.no_grad():
        logits = model(**batch).logits
        with hooks.capture(model, attention=True) as rec:
            model(**batch)
        with hooks.record(model, SITES) as cache:
            model(**batch)
    return logits, rec.attention_mass, {name: cache[name] for name in SITES}


def _disk_map(model) -> dict:
    layer = family_of(model).paths["decoder_layer"]
    return {"": "cpu", layer.format(i=1): "disk", layer.format(i=2): "disk"}


def _assert_same(reference, dispatched):
    (logits0, mass0, sites0), (logits1, mass1, sites1) = reference, dispatched
    assert torch.equal(logits0, logits1), f"logits differ by {(logits0 - logits1).abs().max().item():.3g}"
    assert len(mass0) > 0
    pd.testing.assert_frame_equal(
        mass0.reset_index(drop=True), mass1.reset_index(drop=True), check_exact=True
    )
    for name in SITES:
        assert torch.equal(sites0[name], sites1[name]), name


@pytest.fixture(scope="module", params=["owl2-tiny", "owl3-tiny"])
def reference(request):
    model, processor = load_owl(request.param)
    batch = processor(text=PROMPT, images=[_image()])
    return request.param, processor, batch, _observe(model, batch), model


def test_dict_map_with_layers_on_disk_changes_no_number(reference, tmp_path):
    name, _, batch, expected, plain = reference
    model, _ = load_owl(name, device_map=_disk_map(plain), offload_folder=tmp_path)
    on_disk = sorted(k for k, v in model.hf_device_map.items() if v == "disk")
    assert len(on_disk) == 2 and any(tmp_path.iterdir()), "layers 1 and 2 must really be offloaded"
    layer1 = model.get_submodule(on_disk[0])
    assert any(p.device.type == "meta" for p in layer1.parameters()), "offloaded weights stay off RAM"
    _assert_same(expected, _observe(model, batch))


def test_max_memory_forces_disk_offload_and_changes_no_number(reference, tmp_path):
    name, _, batch, expected, plain = reference
    size = sum(p.numel() * p.element_size() for p in plain.parameters())
    model, _ = load_owl(name, device_map="auto", max_memory={"cpu": size // 2}, offload_folder=tmp_path)
    devices = set(model.hf_device_map.values())
    assert devices == {"cpu", "disk"}, model.hf_device_map
    _assert_same(expected, _observe(model, batch))


def test_generate_under_dispatch_matches(reference, tmp_path):
    name, _, batch, _, plain = reference
    model, _ = load_owl(name, device_map=_disk_map(plain), offload_folder=tmp_path)
    with torch.no_grad():
        want = plain.generate(**batch, max_new_tokens=4, do_sample=False)
        got = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert torch.equal(want, got)


def test_single_device_maps_load_without_accelerate_hooks():
    for device_map in (None, "cpu", torch.device("cpu"), {"": "cpu"}, "auto"):
        model, _ = load_owl("owl2-tiny", device_map=device_map)
        assert not hasattr(model, "hf_device_map") or len(set(model.hf_device_map.values())) == 1
        assert not any(hasattr(m, "_hf_hook") for m in model.modules()), device_map
        assert next(model.parameters()).device.type == "cpu"


def test_needs_dispatch():
    assert (
        not needs_dispatch(None)
        and not needs_dispatch("cpu")
        and not needs_dispatch({"a": "cpu", "b": "cpu"})
    )
    assert (
        needs_dispatch("auto") and needs_dispatch("sequential") and needs_dispatch({"": "cpu", "x": "disk"})
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(device_map={"": "cpu", "model.no_such_module": "disk"}), "not module paths"),
        (dict(device_map={"model.layers.0": "cpu", "lm_head": "disk"}), "without a device"),
        (dict(device_map={"": "cpu", "model.layers.1": "disk"}), "offload_folder"),
        (dict(device_map={"": "cpu", "model.layers.1": "gpu7"}), "is not a device"),
        (dict(device_map="cpu", max_memory={"cpu": 10}), "only apply when device_map spreads"),
        (dict(device_map={}), "places nothing"),
        (dict(device_map={"": "cpu", "lm_head": "meta"}), "'meta' holds no weights"),
    ],
)
def test_bad_device_map_raises_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_owl("owl2-tiny", **kwargs)


def test_complete_device_map_longest_path_wins():
    model, _ = load_owl("owl2-tiny")
    plan = complete_device_map(model, {"": "cpu", "model.layers": "disk", "model.layers.0": "cpu"})
    assert plan["model.layers.0"] == "cpu" and plan["model.layers.1"] == "disk" and plan["lm_head"] == "cpu"
    assert not any(a != b and b.startswith(a + ".") for a in plan for b in plan), "no key below another"


def test_edit_and_knockout_on_offloaded_layers_match(reference, tmp_path):
    """Causal interventions on layers whose weights live on disk act exactly as on the plain model."""
    name, _, batch, _, plain = reference
    model, _ = load_owl(name, device_map=_disk_map(plain), offload_folder=tmp_path)

    def run(m):
        with torch.no_grad():
            with hooks.edit(m, {"blocks.1.hook_resid_post": lambda x: x * 0.5}):
                edited = m(**batch).logits
            with hooks.knockout(m, queries="last", keys="visual", layers=[1, 2]):
                knocked = m(**batch).logits
        return edited, knocked

    (edited0, knocked0), (edited1, knocked1) = run(plain), run(model)
    with torch.no_grad():
        clean = plain(**batch).logits
    assert not torch.equal(edited0, clean), "the edit must change something for the test to mean anything"
    assert torch.equal(edited0, edited1) and torch.equal(knocked0, knocked1)


def test_llava_family_dispatches_with_the_same_meaning(tmp_path):
    """The stock-transformers family goes through the same path (its own _no_split_modules)."""
    model, processor = build_for_training(load_recipe("llava-tiny")["config"], build_tokenizer("llava"))
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    plain, processor = load_owl(tmp_path / "ckpt")
    layer = family_of(plain).paths["decoder_layer"].format(i=1)
    dispatched, _ = load_owl(
        tmp_path / "ckpt", device_map={"": "cpu", layer: "disk"}, offload_folder=tmp_path / "off"
    )
    batch = processor(text="<|image|> what color is the circle ?", images=[_image()])
    with torch.no_grad(), hooks.capture(plain, attention=True) as rec0:
        want = plain(**batch).logits
    with torch.no_grad(), hooks.capture(dispatched, attention=True) as rec1:
        got = dispatched(**batch).logits
    assert torch.equal(want, got)
    assert len(rec0.attention_mass) > 0 and rec0.attention_mass.equals(rec1.attention_mass)


def test_whole_model_on_disk_and_reused_offload_folder(tmp_path):
    """max_memory too small for anything → every module on disk; a second load into the same folder
    uses its own weights, not the first checkpoint's files."""
    first, processor = load_owl(
        "owl3-tiny", device_map="sequential", max_memory={"cpu": 1}, offload_folder=tmp_path
    )
    assert set(first.hf_device_map.values()) == {"disk"}
    batch = processor(text=PROMPT, images=[_image()])
    second, _ = load_owl(
        "owl3-tiny-s1", device_map="sequential", max_memory={"cpu": 1}, offload_folder=tmp_path
    )
    plain, _ = load_owl("owl3-tiny-s1")
    with torch.no_grad():
        want, got = plain(**batch).logits, second(**batch).logits
    assert torch.equal(want, got)
