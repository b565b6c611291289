"""capture(vision=...): the vision encoders' attention (kind 'vision') on both tiny families."""

from __future__ import annotations

import pytest
import torch

from hooks import capture
from hooks.vision import local_mask, parse_vision, summarize_vision
from owl_lab import load_owl, synth
from owl_lab.models.observe import HookPoint
from owl_lab.models.observe_vision import vision_event


@pytest.fixture(scope="module", params=["owl2-tiny", "owl3-tiny"])
def owl(request):
    model, processor = load_owl(request.param)
    model.eval()
    ex = synth.eval_set("color", 2, seed=3)
    batch = processor(text=ex[0].text + ex[1].text, images=ex[0].images + ex[1].images)
    return request.param, model, processor, batch


def _eager_attentions(name, model, pixels):
    """The encoder's own eager probabilities, per layer [N, h, T, T] (Owl3: the layers encode_images runs)."""
    if name.startswith("owl2"):
        return model.model.vision_model(pixels, output_attentions=True).attentions
    tower = model.vision_model
    old = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"
    try:
        out = tower(pixels, output_attentions=True).attentions
    finally:
        tower.config._attn_implementation = old
    return out[: len(tower.encoder.layers) - 1]  # hidden_states[-2]: the last layer never runs


def test_vision_matches_eager_attentions(owl):
    name, model, _, batch = owl
    with torch.no_grad(), capture(model, vision="full") as rec:
        model(**batch)
    with torch.no_grad():
        eager = _eager_attentions(name, model, batch["pixel_values"])
    full, maps = rec.vision.full, rec.vision.maps  # [layer, image, T, T], [layer, image, head, gh, gw]
    assert full.shape[0] == len(eager) and full.shape[1] == 2
    cls = 1 if name.startswith("owl2") else 0
    for layer, probs in enumerate(eager):
        assert torch.allclose(full[layer], probs.mean(1).float(), atol=1e-6, rtol=0)
        received = probs[..., cls:].float().mean(2)  # [N, h, P] mean over queries
        assert torch.allclose(maps[layer].flatten(-2), received, atol=1e-6, rtol=0)
        if cls:
            cls_mass = rec.vision.tensor[layer, ..., 0]  # [N, h, T]
            assert torch.allclose(cls_mass, probs[..., 0].float(), atol=1e-6, rtol=0)


def test_vision_masses_sum_to_one_per_level(owl):
    name, model, _, batch = owl
    with torch.no_grad(), capture(model, vision=True) as rec:
        model(**batch)
    df = rec.vision.mass
    sums = df.groupby(["layer", "image", "head", "query", "level"], observed=True)["mass"].sum()
    assert (sums - 1).abs().max() < 1e-5
    levels = set(df["level"].unique())
    assert levels == ({"token", "locality"} if name.startswith("owl2") else {"locality"})
    if name.startswith("owl2"):  # the CLS query has no patch: nothing is local to it
        cls_query = df[(df["query"] == 0) & (df["group"] == "local")]
        assert (cls_query["mass"] == 0).all()
    with pytest.raises(ValueError, match="vision='grid'"):
        _ = rec.vision.maps


def test_vision_capture_leaves_logits_bitwise_equal(owl):
    _, model, _, batch = owl
    with torch.no_grad():
        ref = model(**batch).logits
        with capture(model, vision="full") as rec:
            out = model(**batch).logits
        again = model(**batch).logits
    assert torch.equal(ref, out) and torch.equal(ref, again)
    assert len(rec.vision.records) == 1
    assert not any(m.active for m in model.modules() if isinstance(m, HookPoint))  # removed on exit


def test_vision_under_generate_records_one_encoder_pass(owl):
    _, model, _, batch = owl
    with torch.no_grad():
        ref = model.generate(**batch, max_new_tokens=3, do_sample=False)
        with capture(model, vision=True) as rec:
            ids = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert torch.equal(ref, ids)
    assert len(rec.vision.records) == 1 and rec.vision.mass["image"].nunique() == 2


def test_vision_chunking_is_exact():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 10, 4), torch.randn(2, 3, 10, 4)
    event = vision_event(1, q, k, 0.5, (3, 3), True)
    whole = summarize_vision(event, "full", chunk_bytes=1 << 20)
    rowwise = summarize_vision(event, "full", chunk_bytes=1)  # one query per chunk
    probs = torch.softmax(q @ k.transpose(-1, -2) * 0.5, -1)
    assert torch.allclose(whole.full, probs.mean(1), atol=1e-6)
    for a, b in ((whole.mass, rowwise.mass), (whole.full, rowwise.full), (whole.received, rowwise.received)):
        assert torch.allclose(a, b, atol=1e-7)
    near = local_mask((3, 3), True)
    assert near[0].sum() == 0 and near[1 + 4].sum() == 9 and near[1 + 0].sum() == 4  # cls, centre, corner


def test_vision_bad_input():
    with pytest.raises(ValueError, match="vision must be"):
        parse_vision("everything")
    with pytest.raises(ValueError, match="3x3 grid"):
        vision_event(0, torch.zeros(1, 1, 5, 2), torch.zeros(1, 1, 5, 2), 1.0, (3, 3), True)


def test_vision_off_by_default(owl):
    _, model, _, batch = owl
    with torch.no_grad(), capture(model) as rec:
        model(**batch)
    with pytest.raises(ValueError, match="not captured"):
        _ = rec.vision.mass
