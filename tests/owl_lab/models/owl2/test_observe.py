"""The observation contract (owl_lab/models/observe.py) as emitted by Owl2."""

from __future__ import annotations

import pytest
import torch

from owl_lab.models.observe import (
    TOKEN_GENERATED,
    TOKEN_IMAGE,
    TOKEN_PAD,
    TOKEN_TEXT,
    AttentionEvent,
    HookPoint,
    SequenceLayout,
)
from owl_lab.models.owl2 import IMAGE_TOKEN_INDEX

IMG = IMAGE_TOKEN_INDEX
Q1 = 5


def batch(owl2):
    ids = torch.tensor([[1, 5, IMG, 6, 7, IMG, 8], [1, 9, 10, 0, 0, 0, 0], [0, 0, 0, 1, IMG, 11, 12]])
    mask = torch.tensor([[1] * 7, [1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1]])
    return ids, mask, owl2.rand_pixels(3, seed=5)


class Recorder:
    def __init__(self, model):
        self.events, self.handles = {}, []
        for name, module in model.named_modules():
            if isinstance(module, HookPoint):
                self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(module, args, output):
            self.events.setdefault(name, []).append(args[0])

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def probs_from_event(ev: AttentionEvent) -> torch.Tensor:
    """softmax(scale q kᵀ) over allowed keys, as a hook would compute it (GQA: head h → h // rep)."""
    rep = ev.query.shape[1] // ev.key.shape[1]
    k = ev.key.repeat_interleave(rep, dim=1)
    scores = (ev.query @ k.transpose(-1, -2)).float() * ev.scale  # [B, H, Lq, Lk]
    allowed = ev.allowed(0, ev.query.shape[2])[:, None]  # [B, 1, Lq, Lk]
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1), allowed.any(-1)


def test_hook_paths_exist(tiny_model):
    names = {n for n, m in tiny_model.named_modules() if isinstance(m, HookPoint)}
    assert "hook_layout" in names
    assert "model.layers.1.self_attn.hook_attn" in names
    assert "model.visual_abstractor.encoder.layers.1.crossattention.attention.hook_attn" in names
    assert not any("hook" in k for k in tiny_model.state_dict())


@pytest.mark.parametrize("num_kv", [4, 2])
def test_self_attention_events_reproduce_eager_probs(owl2, num_kv):
    model = owl2.make_model(attn="eager", num_key_value_heads=num_kv)
    ids, mask, px = batch(owl2)
    rec = Recorder(model)
    try:
        with torch.no_grad():
            out = model(
                input_ids=ids, attention_mask=mask, pixel_values=px, output_attentions=True, use_cache=True
            )
            nxt = torch.tensor([[3], [4], [5]])
            step = model(
                input_ids=nxt,
                attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1),
                past_key_values=out.past_key_values,
                output_attentions=True,
            )
    finally:
        rec.remove()
    for layer in range(2):
        evs = rec.events[f"model.layers.{layer}.self_attn.hook_attn"]
        assert len(evs) == 2
        for ev, ref in ((evs[0], out.attentions[layer]), (evs[1], step.attentions[layer])):
            assert ev.kind == "self" and ev.layer == layer and ev.key.shape[1] == num_kv
            probs, has_key = probs_from_event(ev)
            rows = has_key.expand_as(probs[..., 0])  # skip rows with no allowed key (leading left pads)
            torch.testing.assert_close(probs[rows], ref[rows], rtol=0, atol=1e-6)
            torch.testing.assert_close(ev.probs, ref, rtol=0, atol=0)
    prefill, decode = rec.events["model.layers.0.self_attn.hook_attn"]
    L = prefill.query.shape[2]
    assert decode.query_index.tolist() == [L] and decode.key.shape[2] == L + 1
    assert torch.equal(decode.key_position[0], torch.arange(L + 1))
    # key_image: sample-relative image index on image rows (cache included), -1 elsewhere
    ki = decode.key_image
    assert (ki[0] == 0).sum() == Q1 and (ki[0] == 1).sum() == Q1 and (ki[1] >= 0).sum() == 0
    assert ki[:, -1].eq(-1).all()


def test_layout_events(owl2, tiny_model):
    ids, mask, px = batch(owl2)
    rec = Recorder(tiny_model)
    try:
        with torch.no_grad():
            tiny_model.generate(
                input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=2, min_new_tokens=2
            )
    finally:
        rec.remove()
    layouts = rec.events["hook_layout"]
    assert len(layouts) == 2 and all(isinstance(x, SequenceLayout) for x in layouts)
    pre, dec = layouts
    assert pre.past_length == 0
    assert pre.images_per_sample == [2, 0, 1]
    kinds = pre.token_kind
    assert (kinds[0] == TOKEN_IMAGE).sum() == 2 * Q1 and (kinds[1] == TOKEN_IMAGE).sum() == 0
    assert (kinds == TOKEN_PAD).sum(1).tolist() == (pre.attention_mask == 0).sum(1).tolist()
    assert (kinds[0] == TOKEN_TEXT).sum() == 5
    idx = pre.image_index[0]
    starts = [int((idx == n).nonzero()[0]) for n in range(2)]  # first row of each image
    assert len(starts) == 2 and starts[1] - starts[0] == Q1 + 2
    assert pre.image_index[0, starts[1]] == 1
    # decode step: one GENERATED position per row, images still known through the cache
    assert dec.past_length == pre.token_kind.shape[1] and dec.token_kind.tolist() == [[TOKEN_GENERATED]] * 3
    assert dec.images_per_sample == [2, 0, 1]
    assert dec.attention_mask.shape == (3, dec.past_length + 1)


def test_abstractor_events_under_no_grad(owl2, tiny_model):
    ids, mask, px = batch(owl2)
    rec = Recorder(tiny_model)
    try:
        with torch.no_grad():
            tiny_model(input_ids=ids, attention_mask=mask, pixel_values=px)
    finally:
        rec.remove()
    with torch.no_grad():
        ref = tiny_model.model.visual_abstractor(
            tiny_model.model.vision_model(px).last_hidden_state, output_attentions=True
        ).attentions
    for k in range(2):
        (ev,) = rec.events[f"model.visual_abstractor.encoder.layers.{k}.crossattention.attention.hook_attn"]
        assert ev.kind == "abstractor" and ev.layer == k and ev.grid == (2, 2)
        assert ev.probs.shape == (3, 2, 4, 4 + 5)
        torch.testing.assert_close(ev.probs, ref[k], rtol=0, atol=0)
        assert ev.key_image[0].tolist() == [-1] * 4 + [-2, 0, 1, 2, 3]
        assert ev.key_position.eq(-1).all()
        probs, _ = probs_from_event(ev)
        torch.testing.assert_close(probs, ev.probs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hooks_do_not_change_logits(owl2, attn):
    model = owl2.make_model(attn=attn)
    ids, mask, px = batch(owl2)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        rec = Recorder(model)
        try:
            hooked = model(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        finally:
            rec.remove()
    events = [n for n in rec.events if n.endswith(("hook_attn", "hook_layout"))]
    n_vision = model.config.vision_settings.num_hidden_layers  # the ViT's own hook_attn points (kind vision)
    assert len(events) == 1 + 2 + 2 + n_vision
    assert torch.equal(plain, hooked)


def test_no_events_built_without_hooks(monkeypatch, tiny_model, owl2):
    """Observation is free when off: the event builders are never called."""
    import owl_lab.models.attention as a
    import owl_lab.models.owl2.sequence_owl2 as s

    def boom(*a, **k):
        raise AssertionError("event built without a hook")

    monkeypatch.setattr(a, "AttentionEvent", boom)
    monkeypatch.setattr(s.Owl2Sequence, "layout", boom)
    ids, mask, px = batch(owl2)
    with torch.no_grad():
        tiny_model(input_ids=ids, attention_mask=mask, pixel_values=px)
