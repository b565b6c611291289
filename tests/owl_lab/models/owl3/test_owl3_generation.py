"""Decode steps, generate(), beam search, batching, padding and the official-code failure cases
(golden README §9), each checked against a no-cache full forward."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.cache_utils import DynamicCache

from owl_lab.models.cache_compat import CACHE_FIELD

IMG = 396  # `<|image|>` token id of the toy vocabulary


def full_logits(model, ids, starts, pixels):
    """No-cache forward over the whole sequence with the images given per sample as start lists."""
    media = [torch.tensor(s, dtype=torch.long) for s in starts]
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels, media_offset=media, use_cache=False).logits


@pytest.mark.parametrize("kind", ("gated", "fused"))
def test_decode_steps_keep_no_hidden_state(owl3, make_processor, kind):
    model = owl3.model(kind, seed=10)
    processor = make_processor(model)
    images = owl3.images(3, seed=1)
    a = processor("<|image|>describe the first <|image|>picture ?", images=images[:2])
    b = processor("look at <|image|>this", images=images[2:])
    other = copy.deepcopy(model)  # the prefill runs on a *different* module instance
    with torch.no_grad():
        pre = other(**a, use_cache=True)
        model(**b)  # an unrelated call in between must not leak into the decode step
        nxt = pre.logits[:, -1:].argmax(-1)
        step = model(
            input_ids=nxt,
            attention_mask=torch.ones(1, a["input_ids"].shape[1] + 1, dtype=torch.long),
            past_key_values=pre.past_key_values,
            pixel_values=a["pixel_values"],
            media_offset=a["media_offset"],
        )
    starts = torch.nonzero(a["input_ids"][0] == IMG).flatten().tolist()
    ref = full_logits(model, torch.cat([a["input_ids"], nxt], 1), [starts], a["pixel_values"])
    assert (step.logits[0, -1] - ref[0, -1]).abs().max() < 1e-5


def test_cache_is_an_alias_of_past_key_values(owl3, make_processor):
    """transformers >= 5.24 passes the KV cache to forward as ``cache=``; it must act exactly like
    ``past_key_values=`` (not vanish into **kwargs), and two different caches are an error."""
    model = owl3.model("gated", seed=10)
    a = make_processor(model)("look at <|image|>this", images=owl3.images(1, seed=1))
    n = a["input_ids"].shape[1]
    caches = {name: DynamicCache(config=model.config) for name in ("past_key_values", "cache")}
    logits = {}
    with torch.no_grad():
        for name, cache in caches.items():
            pre = model(**a, use_cache=True, **{name: cache})
            step = model(
                input_ids=pre.logits[:, -1:].argmax(-1),
                attention_mask=torch.ones(1, n + 1, dtype=torch.long),
                pixel_values=a["pixel_values"],
                media_offset=a["media_offset"],
                use_cache=True,
                **{name: cache},
            )
            assert getattr(step, CACHE_FIELD) is cache and cache.get_seq_length() == n + 1
            logits[name] = (pre.logits, step.logits)
        torch.testing.assert_close(logits["cache"], logits["past_key_values"], rtol=0, atol=0)
        with pytest.raises(ValueError, match="two different caches"):
            model(**a, past_key_values=caches["cache"], cache=DynamicCache(config=model.config))


@pytest.mark.parametrize("kind", ("gated", "fused"))
def test_greedy_generate_matches_no_cache_reference(owl3, make_processor, kind):
    model = owl3.model(kind, seed=11)
    processor = make_processor(model)
    batch = processor(
        ["<|image|>what is it ?", "compare <|image|>and <|image|>now please"], images=owl3.images(3, seed=2)
    )
    res = model.generate(
        **batch, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    assert torch.equal(res.sequences[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    for b in range(2):
        n = int(batch["attention_mask"][b].sum())
        single = processor(
            ["<|image|>what is it ?", "compare <|image|>and <|image|>now please"][b],
            images=owl3.images(3, seed=2)[:1] if b == 0 else owl3.images(3, seed=2)[1:],
        )
        alone = model.generate(
            **single, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        assert torch.equal(res.sequences[b, -4:], alone.sequences[0, -4:])  # right padding is harmless
        assert (torch.stack(res.logits)[:, b] - torch.cat(alone.logits)).abs().max() < 1e-4
        starts = torch.nonzero(single["input_ids"][0] == IMG).flatten().tolist()
        ref = full_logits(model, alone.sequences, [starts], single["pixel_values"])
        assert (torch.cat(alone.logits) - ref[0, n - 1 : n + 3]).abs().max() < 1e-4


@pytest.mark.parametrize("kind", ("gated", "fused"))
def test_placeholder_as_last_token(owl3, make_processor, kind):
    """Official: IndexError. Here: the prompt runs; decode steps see the image."""
    model = owl3.model(kind, seed=12)
    processor = make_processor(model)
    batch = processor("look at this <|image|>", images=owl3.images(1, seed=3), apply_template=False)
    ids = batch["input_ids"]
    last = ids.shape[1] - 1
    assert ids[0, -1] == IMG
    if kind == "gated":
        assert (batch["media_offset"][0, :, 1] == 0).all()  # no token sees the image in the prompt
    res = model.generate(
        **batch, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    ref = full_logits(model, res.sequences, [[last]], batch["pixel_values"])
    assert (torch.cat(res.logits) - ref[0, last : last + 3]).abs().max() < 1e-4
    with torch.no_grad():
        text_only = model(input_ids=ids).logits
    prompt = full_logits(model, ids, [[last]], batch["pixel_values"])
    if kind == "gated":  # strict visibility: the prompt is exactly the text-only forward
        assert torch.equal(prompt, text_only)
    else:  # the placeholder token itself sees its image
        assert (prompt[0, -1] - text_only[0, -1]).abs().max() > 1e-3


def test_adjacent_placeholders_and_count_jumps(owl3, make_processor):
    model = owl3.model("gated", seed=13)
    processor = make_processor(model)
    batch = processor("<|image|><|image|><|image|>which one ?", images=owl3.images(3, seed=4))
    starts = torch.nonzero(batch["input_ids"][0] == IMG).flatten().tolist()
    assert starts == [8, 9, 10]
    with torch.no_grad():
        dense = model(**batch).logits
    assert (
        dense - full_logits(model, batch["input_ids"], [starts], batch["pixel_values"])
    ).abs().max() < 1e-6
    # a dense media_offset whose count jumps by 2 at one token (official: size mismatch) → both images at s
    jump = batch["media_offset"].clone()
    jump[0, 9:, 1] = jump[0, 9:, 1].clamp(min=2)
    with torch.no_grad():
        jumped = model(
            input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], media_offset=jump
        ).logits
    ref = full_logits(model, batch["input_ids"], [[8, 8, 10]], batch["pixel_values"])
    assert (jumped - ref).abs().max() < 1e-6


def test_token_id_zero_is_not_padding(owl3):
    model = owl3.model("gated", seed=14)
    model.generation_config.pad_token_id = 0  # what the official generate hard-codes
    ids = torch.tensor([[398, 39, 2, 0, 396, 19, 0, 110, 16]])
    pixels = torch.randn(1, 3, 28, 28)
    media = [torch.tensor([4])]
    res = model.generate(
        input_ids=ids,
        pixel_values=pixels,
        media_offset=media,
        max_new_tokens=2,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    ref = full_logits(model, res.sequences, [[4]], pixels)
    assert (torch.cat(res.logits) - ref[0, 8:10]).abs().max() < 1e-4


@pytest.mark.parametrize("kind", ("gated", "fused"))
def test_beam_search_each_beam_attends_its_own_images(owl3, make_processor, kind):
    model = owl3.model(kind, seed=15)
    processor = make_processor(model)
    texts = ["<|image|>first , <|image|>second , <|image|>third ?", "one <|image|>only"]
    images = owl3.images(4, seed=5)
    batch = processor(texts, images=images)
    beams = 3
    res = model.generate(
        **batch,
        max_new_tokens=3,
        num_beams=beams,
        num_return_sequences=beams,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        length_penalty=0.0,
    )
    steps = model.compute_transition_scores(
        res.sequences, res.scores, res.beam_indices, normalize_logits=False
    )
    width = batch["input_ids"].shape[1]
    for row in range(2 * beams):
        b = row // beams
        n = int(batch["attention_mask"][b].sum())
        single = processor(texts[b], images=images[:3] if b == 0 else images[3:])
        starts = torch.nonzero(single["input_ids"][0] == IMG).flatten().tolist()
        seq = torch.cat([single["input_ids"], res.sequences[row : row + 1, width:]], 1)
        logp = full_logits(model, seq, [starts], single["pixel_values"]).log_softmax(-1)[0]
        ref = logp[torch.arange(n - 1, n + 2), seq[0, n:]]
        assert (steps[row] - ref).abs().max() < 1e-4, row
        if b == 0 and row == 0:  # the official bug (every beam sees [img0, img0, ...]) would differ
            wrong = single["pixel_values"][[0, 0, 0]]
            bad = full_logits(model, seq, [starts], wrong).log_softmax(-1)[0][
                torch.arange(n - 1, n + 2), seq[0, n:]
            ]
            assert (bad - ref).abs().max() > 1e-3


def test_batched_media_offset_bases(owl3, make_processor):
    model = owl3.model("gated", seed=16)
    processor = make_processor(model)
    images = owl3.images(3, seed=6)
    s0 = processor("<|image|>a <|image|>b", images=images[:2])
    s1 = processor("c <|image|>d", images=images[2:])
    batch = processor(["<|image|>a <|image|>b", "c <|image|>d"], images=[images[:2], images[2:]])
    assert batch["media_offset"][1, -1].tolist() == [2, 3]  # batch-global base 2 for sample 1
    with torch.no_grad():
        out = model(**batch).logits
        for b, single in enumerate((s0, s1)):
            n = single["input_ids"].shape[1]
            assert (out[b, :n] - model(**single).logits[0]).abs().max() < 1e-5
        naive = batch["media_offset"].clone()
        naive[1] -= 2  # per-sample offsets (base 0 twice), as concatenating processor outputs gives
        with pytest.raises(ValueError, match="batch-global"):
            model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], media_offset=naive)
        with pytest.raises(ValueError, match="batch-global"):
            model.generate(
                input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], media_offset=naive
            )


@pytest.mark.parametrize("kind", ("gated", "fused"))
def test_left_padding_equals_single_samples(owl3, make_processor, kind):
    """MI-RoPE and text RoPE share the real-token coordinate, so left padding is exact."""
    model = owl3.model(kind, seed=18)
    texts = ["<|image|>what is it ?", "compare <|image|>and <|image|>now please"]
    images = owl3.images(3, seed=7)
    left = make_processor(model, padding_side="left")(texts, images=images)
    right = make_processor(model)(texts, images=images)
    assert left["attention_mask"][0, 0] == 0
    with torch.no_grad():
        out_left, out_right = model(**left).logits, model(**right).logits
    n = int(left["attention_mask"][0].sum())
    assert (out_left[0, -n:] - out_right[0, :n]).abs().max() < 1e-5
    assert (out_left[1] - out_right[1]).abs().max() < 1e-5
    gen_left = model.generate(**left, max_new_tokens=3, do_sample=False)
    gen_right = model.generate(**right, max_new_tokens=3, do_sample=False)
    assert torch.equal(gen_left[:, -3:], gen_right[:, -3:])
    assert torch.equal(gen_right[:, : right["input_ids"].shape[1]], right["input_ids"])


def test_errors_are_clear(owl3, make_processor):
    model = owl3.model("gated", seed=17)
    processor = make_processor(model)
    batch = processor("<|image|>what ?", images=owl3.images(1))
    with pytest.raises(ValueError, match="attention_mask must be 2-D"):
        model(**{**batch, "attention_mask": batch["attention_mask"][:, 1:]})
    with pytest.raises(ValueError, match=r"\[N_images, 3, 28, 28\]"):
        model(**{**batch, "pixel_values": torch.randn(1, 3, 32, 32)})
    with pytest.raises(ValueError, match="only has 1 images"):
        two = batch["media_offset"].clone()
        two[0, -1, 1] = 2
        model(**{**batch, "media_offset": two})
    with pytest.raises(ValueError, match="2 images but media_offset marks every sample as text-only"):
        model(
            input_ids=batch["input_ids"],
            pixel_values=torch.randn(2, 3, 28, 28),
            media_offset=processor("no image")["media_offset"][:, :1].expand(
                1, batch["input_ids"].shape[1], 2
            ),
        )
    with pytest.raises(ValueError, match="lists 1 image placeholders but pixel_values holds 2"):
        model(
            input_ids=batch["input_ids"],
            pixel_values=torch.randn(2, 3, 28, 28),
            media_offset=[torch.tensor([8])],
        )
    with pytest.raises(ValueError, match="2 <\\|image\\|> placeholders but 1 images"):
        processor("<|image|><|image|>", images=owl3.images(1))
    with pytest.raises(ValueError, match="Sample 0 has 1 .* but 2 images"):
        processor(["<|image|>", "<|image|>"], images=[owl3.images(2), []])
