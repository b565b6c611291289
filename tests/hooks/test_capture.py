"""capture() machinery on a toy model that follows the observation contract (fast, model-independent)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from hooks import capture
from owl_lab.models.observe import HookPoint


def batch():
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [1, 7, 8, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    images = [[(1, 2)], [(2, 1)]]
    return ids, images, mask


def no_hooks_left(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_masses_levels_sum_to_one_and_pads_dropped(toy):
    ids, images, mask = batch()
    with torch.no_grad(), capture(toy) as rec:
        toy(ids, images, mask)
    df = rec.attention_mass
    assert list(df.columns) == [
        "batch",
        "step",
        "layer",
        "head",
        "query",
        "kind",
        "level",
        "group",
        "mass",
        "call",
    ]
    sums = df.groupby(["batch", "step", "layer", "head", "query", "kind", "level"], observed=True).mass.sum()
    assert (sums - 1).abs().max() < 1e-5
    assert set(df[df.batch == 1]["query"]) == {0, 1, 2, 3}  # pad queries dropped
    assert set(df.group) == {"visual", "text", "bos", "question", "image:0"}  # pad keys never attended
    # query 0 sees only BOS
    q0 = df[(df["query"] == 0) & (df.level == "token")]
    assert set(q0[q0.mass > 0].group) == {"bos"}
    # image rows of sample 0 are positions 1, 2: visual mass of query 5 equals the image:0 mass
    r = df[(df.batch == 0) & (df["query"] == 5) & (df.layer == 1)].set_index(["head", "group"]).mass
    torch.testing.assert_close(
        torch.tensor(r.xs("visual", level=1).values), torch.tensor(r.xs("image:0", level=1).values)
    )


def test_capture_never_changes_logits_and_matches_materialised_softmax(toy):
    ids, images, mask = batch()
    with torch.no_grad():
        plain = toy(ids, images, mask)
        with capture(toy, full_maps={1: [3, 5]}) as rec:
            hooked = toy(ids, images, mask)
    assert torch.equal(plain, hooked)
    fm = rec.full_maps[(0, 1, "self")]
    assert fm.probs.shape == (2, 4, 2, 6) and fm.query_index.tolist() == [3, 5]
    torch.testing.assert_close(fm.probs.sum(-1)[0], torch.ones(4, 2), rtol=0, atol=1e-6)
    # the mass on image:0 of query 5 equals the sum of the full map over the image rows
    m = rec.mass(1)
    g = m.groups.index("image:0")
    torch.testing.assert_close(m.mass[0, :, 5, g], fm.probs[0, :, 1, 1:3].sum(-1), rtol=0, atol=1e-6)


def test_decode_steps_and_absolute_queries(toy):
    ids, images, _ = batch()
    ids, images = ids[:1], images[:1]
    cache = {}
    with torch.no_grad(), capture(toy) as rec:
        out = toy(ids, images, cache=cache)
        for _ in range(3):
            out = toy(out[:, -1:].argmax(-1), cache=cache)
    assert rec.n_steps == 4
    df = rec.attention_mass
    assert sorted(df[df.step > 0].groupby("step")["query"].unique().map(list).tolist()) == [[6], [7], [8]]
    last = df[(df.step == 3) & (df.level == "token")]
    assert set(last.group) == {"bos", "question", "image:0", "generated"}
    sums = df.groupby(["step", "layer", "head", "query", "level"], observed=True).mass.sum()
    assert (sums - 1).abs().max() < 1e-5


def test_each_prefill_starts_a_new_call_with_step_zero(toy):
    """Two generate-like loops in one block: steps restart at 0 and ``call`` tells them apart."""
    ids, images, _ = batch()
    with torch.no_grad(), capture(toy, full_maps={1: None}) as rec:
        for sample in range(2):
            cache = {}
            out = toy(ids[sample : sample + 1], images[sample : sample + 1], cache=cache)
            for _ in range(2):
                out = toy(out[:, -1:].argmax(-1), cache=cache)
    with torch.no_grad(), capture(toy) as alone:
        toy(ids[1:2], images[1:2])
    assert rec.n_calls == 2 and rec.n_steps == 6
    df = rec.attention_mass
    assert sorted(df.groupby("call").step.unique().map(sorted).map(list).tolist()) == [[0, 1, 2], [0, 1, 2]]
    assert df[df.step > 0]["query"].nunique() == 2  # only decode queries have step > 0
    torch.testing.assert_close(rec.mass(1, call=1).mass, alone.mass(1).mass, rtol=0, atol=0)
    assert (0, 1, "self") in rec.full_maps and (1, 2, 1, "self") in rec.full_maps
    with pytest.raises(KeyError, match="call=2"):
        rec.mass(1, call=2)


def test_layers_filter_only_hooks_chosen_layers(toy):
    ids, images, mask = batch()
    with torch.no_grad(), capture(toy, layers=[1], abstractor=False) as rec:
        assert toy.model.layers[1].self_attn.hook_attn.active
        assert not toy.model.layers[0].self_attn.hook_attn.active
        toy(ids, images, mask)
    assert set(rec.attention_mass.layer) == {1}
    with pytest.raises(ValueError, match="do not exist"):
        capture(toy, layers=[5])
    with pytest.raises(ValueError, match="full_maps"):
        capture(toy, layers=[1], full_maps=[0])


def test_abstractor_maps(toy):
    with torch.no_grad(), capture(toy) as rec:
        toy(torch.tensor([[1, 2]]), n_abstractor_images=3)
    maps = rec.abstractor_maps
    assert maps.shape == (2, 3, 2, 3, 2, 2)  # [layer, image, head, query, gh, gw]
    s = rec.abstractor_summary
    assert len(s) == 2 * 3 * 2 * 3
    total = s.patches + s.cls + s.queries
    assert (total - 1).abs().max() < 1e-5
    torch.testing.assert_close(
        maps.sum((-1, -2)).flatten(), torch.tensor(s.patches.values, dtype=torch.float32)
    )


def test_errors_for_missing_components(toy):
    with pytest.raises(ValueError, match="no gate"):
        capture(toy, gates=True)
    toy.config.model_type = "llama"
    with pytest.raises(ValueError, match="model_type"):
        capture(toy)


def test_hooks_removed_on_exit_and_on_exception(toy):
    ids, images, mask = batch()
    with torch.no_grad(), capture(toy):
        toy(ids, images, mask)
    assert no_hooks_left(toy)
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), capture(toy):
            toy(ids, images, mask)
            raise RuntimeError("boom")
    assert no_hooks_left(toy)
    assert not any(m.active for m in toy.modules() if isinstance(m, HookPoint))


def test_no_memory_growth_over_100_captures(toy):
    ids, images, mask = batch()

    def tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))

    def one():
        with torch.no_grad(), capture(toy) as rec:
            toy(ids, images, mask)
        _ = rec.attention_mass
        return weakref.ref(rec)

    for _ in range(3):
        one()
    before = tensors()
    refs = [one() for _ in range(100)]
    gc.collect()
    assert all(r() is None for r in refs)  # every Recording was freed
    assert tensors() <= before
    assert no_hooks_left(toy)
