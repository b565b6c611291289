"""Invariants of the causal toolkit (hooks.sites / record / edit / knockout) on the shipped tiny Owls.

Owl2 (image rows in the sequence), Owl3 gated (240728) and Owl3 fused (241101).
"""

from __future__ import annotations

import pytest
import torch

import hooks
from hooks import capture
from owl_lab import load_owl
from owl_lab.analysis.causal import last_positions, layouts
from owl_lab.synth.counterfactual import collate_pairs, counterfactual_pairs

MODELS = ["owl2-tiny", "owl3-tiny", "owl3-tiny-fused"]


def _hooks_left(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module", params=MODELS)
def owl(request):
    model, processor = load_owl(request.param)
    model.eval()
    clean, corrupt, clean_ids, corrupt_ids = collate_pairs(
        processor, counterfactual_pairs("color", 3, seed=5)
    )
    with torch.no_grad(), layouts(model) as seen:
        clean_logits, corrupt_logits = model(**clean).logits, model(**corrupt).logits
    return dict(
        name=request.param,
        model=model,
        processor=processor,
        clean=clean,
        corrupt=corrupt,
        clean_logits=clean_logits,
        corrupt_logits=corrupt_logits,
        layout=seen[0],
    )


def test_sites_follow_the_contract(owl):
    names = hooks.sites(owl["model"])
    n = owl["model"].config.num_hidden_layers
    assert names[0] == "hook_image_embeds"
    for i in range(n):
        for s in (
            "hook_resid_pre",
            "hook_resid_mid",
            "hook_resid_post",
            "hook_attn_out",
            "hook_mlp_out",
            "attn.hook_z",
        ):
            assert f"blocks.{i}.{s}" in names
    with (
        torch.no_grad(),
        hooks.record(owl["model"], ["blocks.1.hook_resid_post", "blocks.1.attn.hook_z"]) as cache,
    ):
        owl["model"](**owl["clean"])
    B, L, V = owl["clean_logits"].shape
    assert cache["blocks.1.hook_resid_post"].shape[:2] == (B, L)
    assert cache["blocks.1.attn.hook_z"].dim() == 4 and cache["blocks.1.attn.hook_z"].shape[:2] == (B, L)


@torch.no_grad()
def test_empty_knockout_and_identity_edit_are_bitwise_noops(owl):
    model, clean, ref = owl["model"], owl["clean"], owl["clean_logits"]
    with hooks.knockout(model, queries="all", keys="visual", layers=[]):
        assert torch.equal(model(**clean).logits, ref)
    with hooks.knockout(model, queries="generated", keys="visual"):  # no generated token in a prefill
        assert torch.equal(model(**clean).logits, ref)
    with hooks.knockout(model, queries="last", keys="image:3"):  # no fourth image
        assert torch.equal(model(**clean).logits, ref)
    from hooks.sites import resolve

    writable = [name for name, site in resolve(model).items() if site.writable]
    with hooks.edit(model, {name: (lambda v: v) for name in writable}):
        assert torch.equal(model(**clean).logits, ref)
    assert _hooks_left(model) == 0


@torch.no_grad()
def test_visual_knockout_makes_text_positions_independent_of_the_image(owl):
    model, layout = owl["model"], owl["layout"]
    text = (layout.token_kind >= 0) & (layout.token_kind != 1)  # real, not an Owl2 image row
    diff = (owl["clean_logits"] - owl["corrupt_logits"])[text].abs().max()
    assert diff > 1e-2  # the images matter without the knockout
    with hooks.knockout(model, queries="all", keys="visual"):
        a, b = model(**owl["clean"]).logits, model(**owl["corrupt"]).logits
    assert (a - b)[text].abs().max() <= 1e-6


@torch.no_grad()
def test_patching_image_embeds_reproduces_the_clean_run(owl):
    model = owl["model"]
    names = ["hook_image_embeds"]
    if owl["name"].startswith("owl2"):
        names.append("blocks.2.hook_resid_pre")
    with hooks.record(model, names) as cache:
        model(**owl["clean"])
    for name in names:
        with hooks.edit(model, {name: lambda v, src=cache[name]: src}):
            patched = model(**owl["corrupt"]).logits
        assert (patched - owl["clean_logits"]).abs().max() <= 1e-5, name


@torch.no_grad()
def test_capture_under_knockout_records_the_softmax_used(owl):
    model = owl["model"]
    last = set(last_positions(owl["layout"]).tolist())
    with hooks.knockout(model, queries="last", keys="visual"), capture(model) as rec:
        model(**owl["clean"])
    mass = rec.attention_mass
    at_last = mass[mass["query"].isin(last) & (mass.level == "modality")]
    assert len(at_last) > 0
    assert (
        at_last[at_last.group == "visual"].mass.abs().max() == 0 or at_last[at_last.group == "visual"].empty
    )
    sums = at_last.groupby(["batch", "layer", "head", "query", "kind"], observed=True).mass.sum()
    assert (sums - 1).abs().max() < 1e-5


@torch.no_grad()
def test_edits_and_knockouts_apply_to_every_generate_step(owl):
    model, clean, corrupt = owl["model"], owl["clean"], owl["corrupt"]
    n = model.config.num_hidden_layers
    with hooks.record(model, [f"blocks.{n - 1}.hook_resid_post"]) as cache:
        model.generate(**clean, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert len(cache.steps[f"blocks.{n - 1}.hook_resid_post"]) == 3  # prefill + 2 decode steps
    plain = model.generate(**clean, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    calls = []

    def scramble(v):  # a strong edit: every generate step must see it
        calls.append(v.shape[1])
        return v.flip(-1) * 3

    with hooks.edit(model, {f"blocks.{n - 1}.hook_resid_post": scramble}):
        ids = model.generate(**clean, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert len(calls) == 3 and calls[1:] == [1, 1]
    assert not torch.equal(ids, plain)
    with hooks.knockout(model, queries="all", keys="visual"):
        a = model.generate(**clean, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        b = model.generate(**corrupt, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert torch.equal(a[:, -3:], b[:, -3:])
    assert _hooks_left(model) == 0


def test_hooks_are_removed_on_exceptions_and_bad_input_is_rejected(owl):
    model = owl["model"]
    with pytest.raises(RuntimeError, match="boom"), hooks.edit(model, {"blocks.0.hook_mlp_out": lambda v: v}):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"), hooks.knockout(model, queries="last", keys="visual"):
        raise RuntimeError("boom")
    assert _hooks_left(model) == 0
    with pytest.raises(ValueError, match="unknown site"):
        with hooks.record(model, ["blocks.99.hook_resid_pre"]):
            pass
    with pytest.raises(ValueError, match="unknown knockout group"):
        with hooks.knockout(model, queries="nonsense", keys="visual"):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with hooks.knockout(model, layers=[99]):
            pass
    with pytest.raises(ValueError, match="shape"), torch.no_grad():
        with hooks.edit(model, {"blocks.0.hook_mlp_out": lambda v: v[:, :1]}):
            model(**owl["clean"])
    assert _hooks_left(model) == 0


@torch.no_grad()
def test_knockout_of_one_head_sits_between_none_and_all(owl):
    model, clean, ref = owl["model"], owl["clean"], owl["clean_logits"]
    with hooks.knockout(model, queries="last", keys="visual", heads=[0]):
        one = model(**clean).logits
    with hooks.knockout(model, queries="last", keys="visual"):
        every = model(**clean).logits
    assert not torch.equal(one, ref) and not torch.equal(one, every)
    with pytest.raises(ValueError, match="heads"), hooks.knockout(model, heads=[99]):
        pass


@torch.no_grad()
def test_knockout_on_the_eager_path_agrees_with_sdpa(owl):
    model, clean = owl["model"], owl["clean"]
    with hooks.knockout(model, queries="last", keys="visual", layers=[0, 2]):
        sdpa = model(**clean).logits
        eager = model(**clean, output_attentions=True).logits  # output_attentions forces the eager kernel
    assert (sdpa - eager).abs().max() <= 1e-5
    assert not torch.equal(sdpa, owl["clean_logits"])


@torch.no_grad()
def test_last_query_knockout_builds_no_square_mask_and_edits_once_per_forward(owl, monkeypatch):
    """The perf contract (issue 17): ``queries="last"`` edits one row per sample, never a [B, L, L] mask,
    and the decoder's edited mask is built once per forward (the core's memo hits on every other layer)."""
    from owl_lab.models import attention as core

    model, processor = owl["model"], owl["processor"]
    clean, _, _, _ = collate_pairs(
        processor, counterfactual_pairs("color", 1, seed=5)
    )  # one sample: no padding
    tensors, restricts = [], []
    real_tensor, real_restrict = core.Allowed.tensor, core._restrict
    monkeypatch.setattr(core.Allowed, "tensor", lambda self: tensors.append(self.shape) or real_tensor(self))
    monkeypatch.setattr(core, "_restrict", lambda *a: restricts.append(a[2].kind) or real_restrict(*a))
    ref = model(**clean).logits
    with hooks.knockout(model, queries="last", keys="visual"):
        out = model(**clean).logits
    assert not torch.equal(out, ref)
    square = [s for s in tensors if s[1] > 1 and s[1] == s[2]]
    assert square == [], f"square masks materialised: {square}"
    decoder = [k for k in restricts if k == "self"]  # the decoder's self mask is shared by every layer
    assert len(decoder) <= 1, f"edited mask rebuilt per layer: {restricts}"


@torch.no_grad()
def test_capture_under_a_per_head_knockout_records_each_heads_softmax(owl):
    """heads=[1]: head 1's last query puts zero mass on visual keys, head 0 keeps it; every self/joint
    softmax still sums to 1 per head (a cross row left with no image key for that head is no softmax: 0)."""
    model = owl["model"]
    gated = owl["name"] == "owl3-tiny"
    last = set(last_positions(owl["layout"]).tolist())
    with hooks.knockout(model, queries="last", keys="visual", heads=[1]), capture(model, gates=gated) as rec:
        model(**owl["clean"])
    mass = rec.attention_mass
    at_last = mass[mass["query"].isin(last) & (mass.level == "modality")]
    visual = at_last[at_last.group == "visual"]
    assert len(visual) > 0
    assert visual[visual["head"] == 1].mass.abs().max() == 0
    assert visual[visual["head"] == 0].mass.max() > 0
    sums = (
        mass[mass.level == "modality"]
        .groupby(["batch", "layer", "head", "query", "kind"], observed=True)
        .mass.sum()
    )
    kinds = sums.index.get_level_values("kind")
    assert (sums[kinds != "cross"] - 1).abs().max() < 1e-5
    assert ((sums[kinds == "cross"] - 1).abs() < 1e-5).all() or gated  # gated: emptied head rows are 0
    if gated:
        gates = rec.gates
        g_last = gates[gates["query"].isin(last)]
        assert not g_last[g_last["head"] == 1].applied.any() and g_last[g_last["head"] == 0].applied.all()


@torch.no_grad()
def test_knockout_of_every_row_on_sdpa_agrees_with_eager(owl):
    """queries='all' edits every row: SDPA gets the edited mask as a boolean mask (no float copy)."""
    model, clean = owl["model"], owl["clean"]
    with hooks.knockout(model, queries="all", keys="visual", layers=[0, 1]):
        sdpa = model(**clean).logits
        eager = model(**clean, output_attentions=True).logits
    assert (sdpa - eager).abs().max() <= 1e-5
    assert not torch.equal(sdpa, owl["clean_logits"])
