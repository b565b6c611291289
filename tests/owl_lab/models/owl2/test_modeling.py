"""Owl2 model behaviour on tiny random configs: padding, batching, generation, GQA, MAM, loading."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.cache_utils import DynamicCache

from owl_lab.models.cache_compat import CACHE_FIELD
from owl_lab.models.owl2 import IMAGE_TOKEN_INDEX, Owl2Config, Owl2ForCausalLM, load_checkpoint

IMG = IMAGE_TOKEN_INDEX
Q1 = 5  # rows per image in the tiny config (4 queries + vit_eos)
ATOL = 1e-5


def real_rows(model, input_ids, attention_mask, pixel_values, logits):
    """Logits of the real (mask 1) expanded positions, per row."""
    seq = model.model.build_sequence(input_ids, pixel_values, attention_mask)
    return [logits[b][seq.attention_mask[b].bool()] for b in range(logits.shape[0])]


def run(model, ids, mask=None, pixels=None, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, pixel_values=pixels, **kw)


def pad_batch(rows, side, pad=0):
    L = max(len(r) for r in rows)
    ids, mask = [], []
    for r in rows:
        fill = [pad] * (L - len(r))
        ids.append(r + fill if side == "right" else fill + r)
        mask.append([1] * len(r) + [0] * len(fill) if side == "right" else [0] * len(fill) + [1] * len(r))
    return torch.tensor(ids), torch.tensor(mask)


# Prompts of different lengths and image counts (one with none, one with two).
ROWS = [
    [1, 5, 6, IMG, 7, 8, 9],
    [1, IMG, 10, 11],
    [1, 12, 13, 14, 15, 16],  # text-only row inside a multimodal batch
    [1, IMG, 5, IMG, 6],
]
N_IMG = [1, 1, 0, 2]


def pixels_for(rows_idx, owl2):
    all_px = owl2.rand_pixels(sum(N_IMG), seed=3)
    starts = [sum(N_IMG[:i]) for i in range(len(N_IMG))]
    return torch.cat([all_px[starts[i] : starts[i] + N_IMG[i]] for i in rows_idx]) if rows_idx else None


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_with_uneven_rows_equals_each_sample_alone(tiny_model, owl2, side):
    ids, mask = pad_batch(ROWS, side)
    px = pixels_for(range(4), owl2)
    batch = real_rows(tiny_model, ids, mask, px, run(tiny_model, ids, mask, px).logits)
    for i, row in enumerate(ROWS):
        alone = run(
            tiny_model, torch.tensor([row]), None, pixels_for([i], owl2) if N_IMG[i] else None
        ).logits[0]
        assert alone.shape[0] == len(row) + (Q1 - 1) * N_IMG[i]
        torch.testing.assert_close(batch[i], alone, rtol=0, atol=ATOL)


def test_manual_decode_after_right_padded_prefill(tiny_model, owl2):
    """Pads end up *between* prompt and new tokens: positions from the mask and the mask remembered
    on the cache keep every row equal to its unpadded run (the official code resets both)."""
    ids, mask = pad_batch(ROWS, "right")
    px = pixels_for(range(4), owl2)
    with torch.no_grad():
        out = tiny_model(input_ids=ids, attention_mask=mask, pixel_values=px, use_cache=True)
        seq = tiny_model.model.build_sequence(ids, px, mask)
        last = seq.attention_mask.shape[1] - 1 - seq.attention_mask.flip(1).argmax(1)  # last real row
        nxt = out.logits[torch.arange(4), last].argmax(-1)  # [B]
        step_mask = torch.cat(
            [mask, torch.ones(4, 1, dtype=mask.dtype)], dim=1
        )  # HF convention (input space)
        step = tiny_model(
            input_ids=nxt[:, None], attention_mask=step_mask, past_key_values=out.past_key_values
        )
        for i, row in enumerate(ROWS):
            a = tiny_model(
                input_ids=torch.tensor([row]), pixel_values=pixels_for([i], owl2) if N_IMG[i] else None
            )
            assert a.logits[0, -1].argmax() == nxt[i]
            a2 = tiny_model(input_ids=nxt[i].view(1, 1), past_key_values=a.past_key_values)
            torch.testing.assert_close(step.logits[i, -1], a2.logits[0, -1], rtol=0, atol=ATOL)


def test_text_only_row_consumes_no_image(tiny_model, owl2):
    ids, mask = pad_batch([ROWS[2], ROWS[1]], "right")
    px = owl2.rand_pixels(1, seed=9)
    seq = tiny_model.model.build_sequence(ids, px, mask)
    assert seq.modality_indicators[0].sum() == 0 and seq.modality_indicators[1].sum() == Q1
    logits = run(tiny_model, ids, mask, px).logits
    alone = run(tiny_model, torch.tensor([ROWS[1]]), None, px).logits[0]
    torch.testing.assert_close(real_rows(tiny_model, ids, mask, px, logits)[1], alone, rtol=0, atol=ATOL)


def test_image_only_prompt(tiny_model, owl2):
    px = owl2.rand_pixels(1)
    out = run(tiny_model, torch.tensor([[IMG]]), None, px)
    assert out.logits.shape == (1, Q1, 64)
    seq = tiny_model.model.build_sequence(torch.tensor([[IMG]]), px)
    assert seq.modality_indicators.tolist() == [[1] * Q1]
    with torch.no_grad():
        ids = tiny_model.generate(torch.tensor([[IMG]]), pixel_values=px, max_new_tokens=3, min_new_tokens=3)
    assert ids.shape == (1, 4) and ids[0, 0] == IMG


@pytest.mark.parametrize("rows_idx", [[0, 1, 3], [0, 2]])
def test_sdpa_equals_eager(owl2, rows_idx):
    eager, sdpa = owl2.make_model(attn="eager"), owl2.make_model(attn="sdpa")
    ids, mask = pad_batch([ROWS[i] for i in rows_idx], "left")
    px = pixels_for(rows_idx, owl2)
    a, b = (
        run(eager, ids, mask, px, output_hidden_states=True),
        run(sdpa, ids, mask, px, output_hidden_states=True),
    )
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=ATOL)
    for x, y in zip(a.hidden_states, b.hidden_states, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=ATOL)


def test_attn_implementation_is_selectable(tmp_path, owl2, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    eager = Owl2ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    default = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(default, Owl2ForCausalLM)
    assert eager.config._attn_implementation == "eager" and default.config._attn_implementation == "sdpa"
    ids, mask = pad_batch(ROWS[:2], "right")
    px = pixels_for([0, 1], owl2)
    ref = run(tiny_model, ids, mask, px).logits
    torch.testing.assert_close(run(eager, ids, mask, px).logits, ref, rtol=0, atol=ATOL)
    torch.testing.assert_close(run(default, ids, mask, px).logits, ref, rtol=0, atol=ATOL)
    # from_pretrained builds on meta: the non-persistent tables must still be the real ones
    for m in (eager, default):
        attn = m.model.visual_abstractor.encoder.layers[0].crossattention.attention
        assert torch.equal(attn.k_pos_embed, attn.position_tables()[1])


def _generate_each(model, rows_idx, owl2, n=4):
    out = []
    for i in rows_idx:
        px = pixels_for([i], owl2) if N_IMG[i] else None
        with torch.no_grad():
            g = model.generate(
                torch.tensor([ROWS[i]]), pixel_values=px, max_new_tokens=n, min_new_tokens=n, do_sample=False
            )
        out.append(g[0, len(ROWS[i]) :])
    return out


@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_generate_equals_per_sample(tiny_model, owl2, side):
    rows_idx = [0, 1, 2, 3]
    ids, mask = pad_batch([ROWS[i] for i in rows_idx], side)
    px = pixels_for(rows_idx, owl2)
    with torch.no_grad():
        g = tiny_model.generate(
            input_ids=ids, attention_mask=mask, images=px, max_new_tokens=4, min_new_tokens=4, do_sample=False
        )
    assert torch.equal(g[:, : ids.shape[1]], ids)  # the caller's (unexpanded) prompt comes back
    expected = _generate_each(tiny_model, rows_idx, owl2)
    for b, exp in enumerate(expected):
        assert g[b, ids.shape[1] :].tolist() == exp.tolist(), f"row {b}"


def test_cached_decoding_equals_full_forward(tiny_model, owl2):
    """Decode tokens are text; cached image K/V keep their vision-branch values."""
    px = owl2.rand_pixels(1)
    prompt = torch.tensor([ROWS[1]])
    with torch.no_grad():
        g = tiny_model.generate(
            prompt,
            pixel_values=px,
            max_new_tokens=4,
            min_new_tokens=4,
            output_logits=True,
            return_dict_in_generate=True,
        )
    full = run(tiny_model, g.sequences, None, px, use_cache=False).logits[0]
    L = len(ROWS[1]) + Q1 - 1
    torch.testing.assert_close(torch.stack(g.logits)[:, 0], full[L - 1 : L + 3], rtol=0, atol=ATOL)


def test_cache_is_an_alias_of_past_key_values(tiny_model, owl2):
    """transformers >= 5.24 passes the KV cache to forward as ``cache=``; it must act exactly like
    ``past_key_values=`` (prefill and decode step), and two different caches are an error."""
    px, prompt = owl2.rand_pixels(1), torch.tensor([ROWS[1]])
    caches = {name: DynamicCache(config=tiny_model.config) for name in ("past_key_values", "cache")}
    logits = {}
    with torch.no_grad():
        for name, cache in caches.items():
            pre = tiny_model(input_ids=prompt, pixel_values=px, use_cache=True, **{name: cache})
            step = tiny_model(input_ids=pre.logits[:, -1:].argmax(-1), use_cache=True, **{name: cache})
            assert getattr(step, CACHE_FIELD) is cache and cache.get_seq_length() == len(ROWS[1]) + Q1
            logits[name] = (pre.logits, step.logits)
        torch.testing.assert_close(logits["cache"], logits["past_key_values"], rtol=0, atol=0)
        with pytest.raises(ValueError, match="two different caches"):
            tiny_model(
                input_ids=prompt,
                past_key_values=caches["cache"],
                cache=DynamicCache(config=tiny_model.config),
            )


def test_num_return_sequences_repeats_each_samples_images(tiny_model, owl2):
    ids, mask = pad_batch([ROWS[3], ROWS[0]], "left")
    px = torch.cat([pixels_for([3], owl2), pixels_for([0], owl2)])
    with torch.no_grad():
        g = tiny_model.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=px,
            max_new_tokens=2,
            min_new_tokens=2,
            num_beams=2,
            num_return_sequences=2,
            do_sample=False,
        )
    assert g.shape == (4, ids.shape[1] + 2)


def test_labels_give_shifted_loss_with_image_rows_ignored(tiny_model, owl2):
    ids, mask = pad_batch(ROWS[:2], "right")
    labels = ids.masked_fill(mask == 0, -100).masked_fill(ids == IMG, -100)
    px = pixels_for([0, 1], owl2)
    out = run(tiny_model, ids, mask, px, labels=labels)
    seq = tiny_model.model.build_sequence(ids, px, mask, labels=labels)
    assert (seq.labels[seq.modality_indicators == 1] == -100).all()
    assert (seq.labels != -100).sum() == (labels != -100).sum()
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 64), seq.labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref)
    train = owl2.make_model().train()
    loss = train(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels).loss
    loss.backward()
    assert train.model.layers[0].self_attn.k_proj.multiway[1].weight.grad.abs().sum() > 0
    assert train.model.vision_model.embeddings.patch_embed.weight.grad.abs().sum() > 0


def test_modality_routing_uses_vision_branch_only_on_image_rows(owl2):
    model = owl2.make_model()
    ids, px = torch.tensor([ROWS[0]]), owl2.rand_pixels(1)
    text_ids = torch.tensor([ROWS[2]])
    before, before_text = run(model, ids, None, px).logits, run(model, text_ids).logits
    with torch.no_grad():
        model.model.layers[0].input_layernorm.multiway[1].weight.mul_(1.5)
    after, after_text = run(model, ids, None, px).logits, run(model, text_ids).logits
    assert torch.equal(before_text, after_text)  # text never touches the vision branch
    assert torch.equal(before[0, :3], after[0, :3])  # positions before the image rows are unaffected
    assert (before[0, 3:] - after[0, 3:]).abs().max() > 1e-3


def test_gqa_builds_runs_and_sdpa_equals_eager(owl2):
    eager = owl2.make_model(attn="eager", num_key_value_heads=2)
    sdpa = owl2.make_model(attn="sdpa", num_key_value_heads=2)
    assert eager.model.layers[0].self_attn.k_proj.multiway[0].weight.shape == (2 * 16, 64)
    ids, mask = pad_batch([ROWS[0], ROWS[3]], "right")
    px = pixels_for([0, 3], owl2)
    a = run(eager, ids, mask, px, output_attentions=True)
    torch.testing.assert_close(a.logits, run(sdpa, ids, mask, px).logits, rtol=0, atol=ATOL)
    assert a.attentions[0].shape[1] == 4
    with torch.no_grad():
        g = sdpa.generate(
            input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=3, min_new_tokens=3
        )
    assert g.shape == (2, ids.shape[1] + 3)


def test_without_mam_uses_stock_llama_keys(owl2):
    model = owl2.make_model(modality_adaptive=False)
    keys = set(model.state_dict())
    assert not any("multiway" in k for k in keys)
    for k in (
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
    ):
        assert f"model.layers.0.{k}" in keys
    assert model.config.to_dict()["modality_adaptive"] is False
    ids, mask = pad_batch([ROWS[0], ROWS[2]], "right")
    out = run(model, ids, mask, pixels_for([0], owl2))
    assert torch.isfinite(out.logits).all()


def test_model_rejects_bad_images(tiny_model, owl2):
    ids = torch.tensor([ROWS[3]])  # two markers
    with pytest.raises(ValueError, match="2 image markers.*1 images"):
        run(tiny_model, ids, None, owl2.rand_pixels(1))
    with pytest.raises(ValueError, match="no image markers"):
        run(tiny_model, torch.tensor([ROWS[2]]), None, owl2.rand_pixels(1))
    with pytest.raises(ValueError, match=r"shape \[N, 3, 28, 28\].*\[2, 3, 42, 42\]"):
        run(tiny_model, ids, None, owl2.rand_pixels(2, size=42))


def test_save_pretrained_writes_official_format_and_reloads(tiny_model, owl2, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert set(saved) == set(tiny_model.state_dict())
    assert not any(k.endswith(("pos_embed", "inv_freq")) for k in saved)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "mplug_owl2" and cfg["rope_theta"] == 10000.0
    assert cfg["visual_config"]["visual_abstractor"]["num_learnable_queries"] == 4
    model, processor = load_checkpoint(tmp_path)
    assert processor is None
    ids, px = torch.tensor([ROWS[0]]), owl2.rand_pixels(1)
    assert torch.equal(run(model, ids, None, px).logits, run(tiny_model, ids, None, px).logits)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), Owl2Config)


def test_checkpoint_with_wrong_keys_is_a_clear_error(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state.pop("model.visual_abstractor.vit_eos")
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        ValueError,
        match=r"1 missing key\(s\) \['model.visual_abstractor.vit_eos'\]; "
        r"1 unexpected key\(s\) \['model.layers.0.self_attn.k_proj.weight'\]",
    ):
        load_checkpoint(tmp_path)


def test_config_falls_back_for_release_era_keys():
    cfg = Owl2Config(
        visual_config={
            "visual_model": {"image_size": 56, "patch_size": 14},
            "visual_abstractor": {"grid_size": None},
        }
    )
    v, a = cfg.vision_settings, cfg.abstractor_settings
    assert v.use_cls_token and v.use_post_layernorm and not a.add_v2t_pos_emb
    assert a.grid_size == 4 and a.use_cls_token
    assert "use_cls_token" not in cfg.to_dict()["visual_config"]["visual_model"]  # written back unchanged
    assert Owl2Config.from_dict({"model_type": "mplug_owl2", "modality_adaptive": None}).modality_adaptive
