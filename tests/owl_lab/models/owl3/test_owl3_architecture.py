"""Owl3 architecture: key manifests, variant detection, the four hyper-attention mechanisms against
independent materialised references, plain-Qwen2 equivalence, eager vs SDPA, the observer contract."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import repeat_kv

from owl_lab.models.observe import TOKEN_PLACEHOLDER, TOKEN_TEXT
from owl_lab.models.owl3 import Owl3Config, Owl3ForCausalLM, detect_variant

KINDS = ("gated", "static_gate", "sum", "fused")
SIGLIP_SO400M = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    patch_size=14,
    image_size=384,
)
QWEN2_7B = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    rope_theta=1e6,
    max_window_layers=28,
)


def meta_state(config: Owl3Config) -> dict[str, tuple]:
    with torch.device("meta"):
        model = Owl3ForCausalLM(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_7b_240728_keys_and_shapes_equal_manifest(reference_dir):
    rows = (reference_dir / "owl3" / "keys-mplug-owl3-7b-240728.tsv").read_text().splitlines()[1:]
    manifest = {
        r.split("\t")[0]: tuple(int(x) for x in r.split("\t")[1].strip("[]").split(", ")) for r in rows
    }
    config = Owl3Config(
        vocab_size=151851,
        hyper_layers=[1, 9, 17, 25],
        vision_config=SIGLIP_SO400M,
        hyper_attention="gated",
        projector="linear",
        **QWEN2_7B,
    )
    state = meta_state(config)
    assert state == manifest
    assert len(state) == 805
    assert sum(math.prod(s) for s in state.values()) == 8_061_197_888


def test_241101_and_1b_configs_build_the_spec_key_patterns():
    cfg = Owl3Config(
        vocab_size=151651,
        hyper_layers=[7, 15, 23, 26],
        hyper_attention="fused",
        projector="mlp",
        vision_config={**SIGLIP_SO400M, "image_size": 378},
        **QWEN2_7B,
    )
    assert cfg.hyper_layer_indices == [6, 14, 22, 25] and cfg.tokens_per_image == 729
    state = meta_state(cfg)
    p = "language_model.model.layers."
    assert [i for i in range(28) if f"{p}{i}.self_attn.v_kv_proj.weight" in state] == [6, 14, 22, 25]
    assert state[f"{p}6.self_attn.v_kv_proj.weight"] == (1024, 3584)
    assert not any("gate_proj.0" in k or k.endswith("self_attn.gate") for k in state)
    assert state["vision2text_model.0.weight"] == (3584, 1152) and state["vision2text_model.2.weight"] == (
        3584,
        3584,
    )
    assert state["vision_model.embeddings.position_embedding.weight"] == (729, 1152)
    assert state["language_model.model.embed_tokens.weight"] == (151651, 3584)
    assert detect_variant(state) == {
        "hyper_attention": "fused",
        "projector": "mlp",
        "hyper_layers_0based": [6, 14, 22, 25],
    }

    one_b = dict(
        vocab_size=151851,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        hyper_layers=[6, 13, 20, 22],
        tie_word_embeddings=True,
        vision_config=SIGLIP_SO400M,
        projector="linear",
    )
    for kind, extra in (
        ("gated", {"self_attn.gate_proj.0.weight": (64, 64)}),
        ("static_gate", {"self_attn.gate": (896,)}),
    ):
        state = meta_state(Owl3Config(hyper_attention=kind, **one_b))
        for i in (5, 12, 19, 21):
            assert state[f"{p}{i}.self_attn.v_kv_proj.weight"] == (256, 896)
            for suffix, shape in extra.items():
                assert state[f"{p}{i}.{suffix}"] == shape
        assert detect_variant(state)["hyper_attention"] == kind
    with torch.device("meta"):
        tied = Owl3ForCausalLM(Owl3Config(hyper_attention="gated", **one_b))
    assert tied.language_model.lm_head.weight is tied.language_model.model.embed_tokens.weight


def test_detect_variant_rejects_unknown_layouts():
    base = ["vision2text_model.weight", "language_model.model.layers.0.self_attn.q_proj.weight"]
    with pytest.raises(ValueError, match="no hyper layer"):
        detect_variant(base)
    with pytest.raises(ValueError, match="projector"):
        detect_variant(["language_model.model.layers.0.self_attn.v_kv_proj.weight"])
    mixed = base + [
        "language_model.model.layers.0.self_attn.v_kv_proj.weight",
        "language_model.model.layers.1.self_attn.v_kv_proj.weight",
        "language_model.model.layers.0.self_attn.gate_proj.0.weight",
    ]
    with pytest.raises(ValueError, match="gate_proj.0"):
        detect_variant(mixed)
    with pytest.raises(ValueError, match="hyper_attention"):
        Owl3Config(hyper_layers=[1], hyper_attention="flamingo")
    with pytest.raises(ValueError, match="1-based"):
        Owl3Config(num_hidden_layers=4, hyper_layers=[0, 4])
    with pytest.raises(ValueError, match="unset"):
        Owl3ForCausalLM(
            Owl3Config(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, hyper_layers=[1])
        )


# ---- an independent, per-sample, fully materialised reference of one hyper layer -----------------
def rotate(x, positions, theta):
    """Half-split RoPE of x [..., n, D] at positions [n] (float64 angles → fp32)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = positions.double()[:, None] * inv[None]  # [n, D/2]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1).float(), torch.cat([ang.sin(), ang.sin()], -1).float()
    half = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + half * sin


def reference_context(layer, hidden, images, starts, config):
    """o_proj input of a hyper layer for ONE sample: hidden [L, H], images [N, T, H], starts list."""
    attn, kind = layer.self_attn, config.hyper_attention
    nh, nkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    length, theta = hidden.shape[0], config.rope_parameters["rope_theta"]
    x = layer.input_layernorm(hidden)
    pos = torch.arange(length)
    q = rotate(attn.q_proj(x).view(length, nh, d).transpose(0, 1), pos, theta)  # [nH, L, D]
    k = rotate(attn.k_proj(x).view(length, nkv, d).transpose(0, 1), pos, theta)
    v = attn.v_proj(x).view(length, nkv, d).transpose(0, 1)
    n, t = images.shape[:2]
    kv = attn.v_kv_proj(layer.input_layernorm(images))  # [N, T, 2*nKV*D]
    ki = torch.stack([kv[..., 2 * j * d : 2 * j * d + d] for j in range(nkv)])  # [nKV, N, T, D]
    vi = torch.stack([kv[..., 2 * j * d + d : 2 * j * d + 2 * d] for j in range(nkv)])
    shift = 0 if kind == "fused" else 1
    if config.mi_rope:
        ki = torch.stack([rotate(ki[:, i], torch.full((t,), starts[i] + shift), theta) for i in range(n)], 1)
    ki, vi = ki.reshape(nkv, n * t, d), vi.reshape(nkv, n * t, d)
    text_ok = torch.tensor([[j <= i for j in range(length)] for i in range(length)])
    see = (lambda ti, s: ti >= s) if kind == "fused" else (lambda ti, s: s < ti)
    img_ok = torch.tensor([[see(i, starts[m // t]) for m in range(n * t)] for i in range(length)])
    out = torch.zeros(nh, length, d)
    for h in range(nh):
        j = h // (nh // nkv)
        s_text = (q[h] @ k[j].T) / math.sqrt(d)
        s_img = (q[h] @ ki[j].T) / math.sqrt(d)
        if kind == "fused":
            scores = torch.cat([s_img, s_text], -1).masked_fill(~torch.cat([img_ok, text_ok], -1), -math.inf)
            out[h] = scores.softmax(-1) @ torch.cat([vi[j], v[j]])
            continue
        c = s_text.masked_fill(~text_ok, -math.inf).softmax(-1) @ v[j]
        for i in range(length):
            if not img_ok[i].any():
                out[h, i] = c[i]
                continue
            cross = s_img[i].masked_fill(~img_ok[i], -math.inf).softmax(-1) @ vi[j]
            if kind == "sum":
                out[h, i] = c[i] + cross
            else:
                lin = attn.gate_proj[0] if kind == "gated" else None
                g = (
                    torch.sigmoid(lin.weight @ c[i] + lin.bias)
                    if lin
                    else torch.sigmoid(attn.gate.view(nh, d)[h])
                )
                out[h, i] = c[i] * (1 - g) + cross * g
    return out.transpose(0, 1).reshape(length, nh * d)


@pytest.mark.parametrize("kind,mi_rope", [(k, True) for k in KINDS] + [("gated", False), ("fused", False)])
def test_hyper_layers_match_materialised_reference(owl3, kind, mi_rope):
    model = owl3.model(kind, seed=1, mi_rope=mi_rope)
    ids = torch.randint(1, 390, (2, 12))
    starts = [[2, 3, 9], [5]]  # adjacent placeholders in sample 0; one image in sample 1
    pixels = torch.randn(4, 3, 28, 28)
    media = [torch.tensor(s) for s in starts]
    seen = {}
    handles = []
    for i in (0, 2):
        layer = model.language_model.model.layers[i]
        handles.append(layer.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(("in", i), a[0])))
        handles.append(
            layer.self_attn.o_proj.register_forward_pre_hook(
                lambda m, a, i=i: seen.__setitem__(("ctx", i), a[0])
            )
        )
    with torch.no_grad():
        model(input_ids=ids, pixel_values=pixels, media_offset=media)
        feats = model.encode_images(pixels)
        for h in handles:
            h.remove()
        for i in (0, 2):
            layer = model.language_model.model.layers[i]
            for b, rows in ((0, slice(0, 3)), (1, slice(3, 4))):
                ref = reference_context(layer, seen[("in", i)][b], feats[rows], starts[b], model.config)
                err = (seen[("ctx", i)][b] - ref).abs().max().item()
                assert err < 2e-5, (kind, i, b, err)


def qwen2_twin(model) -> Qwen2ForCausalLM:
    c = model.config
    twin = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            rms_norm_eps=c.rms_norm_eps,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": c.rope_parameters["rope_theta"]},
        )
    )
    state = {
        k[len("language_model.") :]: v
        for k, v in model.state_dict().items()
        if k.startswith("language_model.")
        and "v_kv_proj" not in k
        and "gate_proj.0" not in k
        and not k.endswith("self_attn.gate")
    }
    twin.load_state_dict(state, strict=True)
    return twin.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_without_images_equals_transformers_qwen2(owl3, kind):
    model = owl3.model(kind, seed=2)
    twin = qwen2_twin(model)
    ids = torch.randint(1, 390, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    with torch.no_grad():
        ours, ref = (
            model(input_ids=ids, attention_mask=mask).logits,
            twin(input_ids=ids, attention_mask=mask).logits,
        )
        assert (ours[0] - ref[0]).abs().max() < 1e-5 and (ours[1, :7] - ref[1, :7]).abs().max() < 1e-5
        # a text-only row inside a batch that has images is still plain Qwen2
        media = [torch.zeros(0, dtype=torch.long), torch.tensor([3])]
        mixed = model(input_ids=ids, pixel_values=torch.randn(1, 3, 28, 28), media_offset=media).logits
        assert (mixed[0] - twin(input_ids=ids[:1]).logits[0]).abs().max() < 1e-5


def batch_with_images(owl3, kind, seed=3):
    model = owl3.model(kind, seed=seed)
    ids = torch.randint(1, 390, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    media = [torch.tensor([1, 4]), torch.tensor([6])]
    return model, dict(
        input_ids=ids, attention_mask=mask, pixel_values=torch.randn(3, 3, 28, 28), media_offset=media
    )


@pytest.mark.parametrize("kind", KINDS)
def test_eager_equals_sdpa_and_probabilities_are_distributions(owl3, kind):
    model, batch = batch_with_images(owl3, kind)
    with torch.no_grad():
        sdpa = model(**batch).logits
        eager = model(**batch, output_attentions=True)
    assert (sdpa - eager.logits).abs().max() < 1e-5
    valid = batch["attention_mask"].bool()
    for i, (p_text, p_img) in enumerate(zip(eager.attentions, eager.cross_attentions, strict=True)):
        assert p_text.shape == (2, 4, 11, 11)
        if i in (1, 3):
            assert p_img is None
            total = p_text.sum(-1)
        elif kind == "fused":
            assert p_img.shape == (2, 4, 11, 8)
            total = p_text.sum(-1) + p_img.sum(-1)
        else:
            total = p_text.sum(-1)
            cross = p_img.sum(-1)  # 1 on rows that see an image, 0 before the first image
            assert (
                torch.allclose(cross[0, :, 2:], torch.ones(4, 9), atol=1e-5)
                and cross[0, :, :2].abs().max() == 0
            )
        assert torch.allclose(total[valid[:, None].expand_as(total)], torch.tensor(1.0), atol=1e-5)


def recompute_probs(ev, q0, q1):
    """softmax(scale * q k^T) over allowed keys for queries q0..q1-1 (rows without keys → 0)."""
    k = repeat_kv(ev.key, ev.query.shape[1] // ev.key.shape[1])
    scores = ev.scale * ev.query[:, :, q0:q1] @ k.transpose(-1, -2)
    allowed = ev.allowed(q0, q1)[:, None]
    probs = scores.masked_fill(~allowed, -math.inf).softmax(-1)
    return torch.nan_to_num(probs, nan=0.0)


@pytest.mark.parametrize("kind", KINDS)
def test_observer_contract_reproduces_model_probabilities(owl3, kind):
    model, batch = batch_with_images(owl3, kind, seed=4)
    events, layouts, gates = {}, [], []
    hooks = [model.hook_layout.register_forward_hook(lambda m, a, o: layouts.append(o))]
    for i, layer in enumerate(model.language_model.model.layers):
        hooks.append(
            layer.self_attn.hook_attn.register_forward_hook(
                lambda m, a, o, i=i: events.__setitem__((i, o.kind), o)
            )
        )
        if hasattr(layer.self_attn, "hook_gate_event"):
            hooks.append(
                layer.self_attn.hook_gate_event.register_forward_hook(lambda m, a, o: gates.append(o))
            )
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
    for h in hooks:
        h.remove()
    expected_kinds = {"fused": {"self", "joint"}, "gated": {"self", "cross"}}.get(kind, {"self", "cross"})
    assert {k for _, k in events} == expected_kinds
    assert len(gates) == (2 if kind in ("gated", "static_gate") else 0)
    valid = batch["attention_mask"].bool()[:, None, :, None]
    for (i, k), ev in events.items():
        probs = torch.cat([recompute_probs(ev, 0, 5), recompute_probs(ev, 5, 11)], dim=2)
        if k == "self":
            model_probs = out.attentions[i]
        elif k == "cross":
            model_probs = out.cross_attentions[i]
        else:
            model_probs = torch.cat([out.cross_attentions[i], out.attentions[i]], -1)
        assert ((probs - model_probs) * valid).abs().max() < 1e-6, (i, k)
        assert torch.equal(ev.query_index, torch.arange(11))
        if k in ("cross", "joint"):
            img = ev.key_image[:, :8]
            assert img[0].tolist() == [0] * 4 + [1] * 4 and img[1].tolist() == [0] * 4 + [-1] * 4
            assert (ev.key_position[:, :8] == -1).all()
            assert ev.image_rope_positions.tolist() == (
                [[1, 4], [6, -1]] if kind == "fused" else [[2, 5], [7, -1]]
            )
            if k == "joint":
                assert (ev.key_image[:, 8:] == -1).all() and ev.key_position[0, 8:].tolist() == list(
                    range(11)
                )
    layout = layouts[0]
    assert layout.images_per_sample == [2, 1]
    assert [(row == TOKEN_PLACEHOLDER).nonzero().flatten().tolist() for row in layout.token_kind] == [
        [1, 4],
        [6],
    ]
    assert layout.token_kind[0, 1] == TOKEN_PLACEHOLDER and layout.token_kind[0, 0] == TOKEN_TEXT
    assert layout.image_index[0, 4] == 1 and (layout.token_kind[1, 9:] == -1).all()


@pytest.mark.parametrize("kind", ("gated", "fused"))
def test_hooks_do_not_change_logits(owl3, kind):
    model, batch = batch_with_images(owl3, kind, seed=5)
    with torch.no_grad():
        plain = model(**batch).logits
        hooks = [
            m.register_forward_hook(lambda *a: None)
            for n, m in model.named_modules()
            if n.endswith(("hook_attn", "hook_gate_event", "hook_layout"))
        ]
        hooked = model(**batch).logits
    for h in hooks:
        h.remove()
    n_vision = model.config.vision_config.num_hidden_layers  # SigLIP's hook_attn points (kind vision)
    assert len(hooks) == 4 + 2 * (kind == "gated") + 1 + n_vision
    assert torch.equal(plain, hooked)


@pytest.mark.parametrize("kind", KINDS)
def test_backward_has_finite_gradients(owl3, kind):
    model, batch = batch_with_images(owl3, kind, seed=6)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert any("v_kv_proj" in n for n in grads)
    logits = out.logits[:, :-1].reshape(-1, 400)
    manual = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, manual, atol=1e-6)
