"""Owl2Processor: template, chunk-wise tokenization (SPEC §6), images (SPEC §3.1), labels, persistence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from owl_lab.models.owl2 import IMAGE_TOKEN_INDEX, Owl2Processor, load_checkpoint
from owl_lab.models.owl2.processing_owl2 import CLIP_MEAN, CLIP_STD

IMG = IMAGE_TOKEN_INDEX
V = {
    w: i
    for i, w in enumerate(
        [
            "<unk>",
            "<s>",
            "</s>",
            "USER:",
            "ASSISTANT:",
            "what",
            "color",
            "is",
            "the",
            "circle",
            "square",
            "?",
            "red",
            "blue",
        ]
    )
}


def image(w=40, h=30, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_chunkwise_tokenization_keeps_first_bos_only(processor):
    ids = processor.tokenize_prompt("USER: <|image|>what color ASSISTANT:")
    assert ids == [1, V["USER:"], IMG, V["what"], V["color"], V["ASSISTANT:"]]
    two = processor.tokenize_prompt("what <|image|> is <|image|>the")
    assert two == [1, V["what"], IMG, V["is"], IMG, V["the"]]
    assert processor.tokenize_prompt("what<|image|><|image|>") == [1, V["what"], IMG, IMG]


def test_prompt_starting_with_image_follows_official_head(processor):
    # empty first chunk is skipped, so no BOS precedes the image and later chunks keep theirs
    assert processor.tokenize_prompt("<|image|>what color") == [IMG, 1, V["what"], V["color"]]
    assert processor.tokenize_prompt("<|image|>what<|image|>is") == [IMG, 1, V["what"], IMG, 1, V["is"]]


def test_template_padding_and_pixels(processor):
    batch = processor(text=["<|image|>what color is the circle ?", "what ?"], images=[image()])
    assert batch["input_ids"][0].tolist() == [1, 3, IMG, 5, 6, 7, 8, 9, 11, 4]
    assert batch["input_ids"][1].tolist() == [1, 3, 5, 11, 4] + [0] * 5  # right-padded with pad (= unk)
    assert batch["attention_mask"].sum(1).tolist() == [10, 5]
    assert batch["pixel_values"].shape == (1, 3, 28, 28) and batch["pixel_values"].dtype == torch.float32
    assert "labels" not in batch
    raw = processor(text="what", apply_template=False)
    assert raw["input_ids"].tolist() == [[1, 5]] and "pixel_values" not in raw


def test_answers_give_labels_only_on_answer_and_eos(processor):
    batch = processor(
        text=["<|image|>what color ?", "what ?"], images=[[image()], []], answers=["red", "blue red"]
    )
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids[0].tolist()[-2:] == [V["red"], 2]
    assert labels[0].tolist() == [-100] * 7 + [V["red"], 2]
    assert labels[1].tolist() == [-100] * 5 + [V["blue"], V["red"], 2] + [-100]
    assert batch["attention_mask"].sum(1).tolist() == [9, 8]


def test_image_preprocessing_matches_official_steps(processor):
    img = image(40, 30)
    px = processor(text="<|image|>", images=[img])["pixel_values"][0]
    # squash to 40x40, then CLIP shortest edge → 28 (a square stays square), bicubic; normalise
    ref = img.resize((40, 40), Image.BICUBIC).resize((28, 28), Image.BICUBIC)
    ref = (np.asarray(ref, dtype=np.float32) / 255 - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(
        CLIP_STD, dtype=np.float32
    )
    torch.testing.assert_close(px, torch.from_numpy(ref).permute(2, 0, 1), rtol=0, atol=1e-6)
    crop = Owl2Processor(processor.tokenizer, image_size=28, squash=False)
    assert crop.preprocess_images([img]).shape == (1, 3, 28, 28)
    assert not torch.allclose(crop.preprocess_images([img])[0], px)  # center-crop path differs


def test_image_count_errors(processor):
    with pytest.raises(ValueError, match="1 <\\|image\\|> placeholder.*2 image"):
        processor(text="<|image|>what", images=[image(), image()])
    with pytest.raises(ValueError, match="Prompt 1 has 0 <\\|image\\|> placeholder\\(s\\) but 1 image"):
        processor(text=["<|image|>what", "what"], images=[[image()], [image()]])
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        processor(text=["what", "what"], answers=["red"])


def test_decode_skips_markers(processor):
    assert processor.decode([1, 5, IMG, 6]) == "<s> what color"
    assert processor.batch_decode(torch.tensor([[1, 5], [IMG, 6]]), skip_special_tokens=True) == [
        "what",
        "color",
    ]


def test_save_load_and_end_to_end(processor, tiny_model, tmp_path, owl2):
    tiny_model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model, proc = load_checkpoint(tmp_path)
    assert isinstance(proc, Owl2Processor) and proc.image_size == 28 and proc.squash
    batch = proc(
        text=["<|image|>what color is the circle ?", "what ?"], images=[image()], answers=["red", "blue"]
    )
    assert torch.equal(
        batch["input_ids"],
        processor(
            text=["<|image|>what color is the circle ?", "what ?"], images=[image()], answers=["red", "blue"]
        )["input_ids"],
    )
    with torch.no_grad():
        out = model(**batch)
        assert out.loss is not None and torch.isfinite(out.loss)
        prompt = proc(text=["<|image|>what color is the circle ?", "what ?"], images=[image()])
        ids = model.generate(**prompt, max_new_tokens=3, min_new_tokens=3)
    assert torch.equal(ids[:, : prompt["input_ids"].shape[1]], prompt["input_ids"])
    assert len(proc.batch_decode(ids)) == 2
