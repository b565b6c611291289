"""The llava family: config from a recipe, processor, save → load_owl round trip, training smoke."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from owl_lab import load_owl
from owl_lab.families import family_of, family_of_checkpoint
from owl_lab.models.llava import build_for_training, llava_config
from owl_lab.synth.shapes import render, sample_scene
from owl_lab.synth.tokenizer import build_tokenizer
from owl_lab.train import load_recipe, train

TINY = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "vision_config": {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 28,
        "patch_size": 7,
    },
}


def _image(seed: int = 0):
    return render(sample_scene(random.Random(seed)), 28)


def test_config_is_stock_llava_with_one_token_per_patch():
    recipe = load_recipe("llava-tiny")
    model, processor = build_for_training(recipe["config"], build_tokenizer("llava"))
    assert type(model) is LlavaForConditionalGeneration
    assert model.config.image_seq_length == 36 == processor.image_seq_length  # (48 / 8)², CLS dropped
    assert (
        model.config.text_config.model_type == "llama"
        and model.config.vision_config.model_type == "clip_vision_model"
    )
    n = sum(p.numel() for p in model.parameters())
    assert 0.6e6 < n < 1.2e6  # owl2-tiny's size class (975k)
    with pytest.raises(ValueError, match="image_seq_length=10"):
        llava_config({**TINY, "image_seq_length": 10}, vocab_size=20, image_token_id=3)


def test_processor_repeats_the_image_token_and_labels_only_the_answer():
    model, processor = build_for_training(TINY, build_tokenizer("llava"))
    batch = processor(
        text=["<|image|> what color is the circle ?", "what is 2 plus 3 ?"],
        images=[[_image()], []],
        answers=["red", "five"],
    )
    ids, labels = batch["input_ids"], batch["labels"]
    assert (ids[0] == model.config.image_token_id).sum() == 16 and (
        ids[1] == model.config.image_token_id
    ).sum() == 0
    assert ids[0, 0] == processor.tokenizer.bos_token_id
    answer = labels[0][labels[0] != -100].tolist()
    assert answer == processor.tokenizer("red", add_special_tokens=False).input_ids + [
        processor.tokenizer.eos_token_id
    ]
    assert batch["pixel_values"].shape == (1, 3, 28, 28)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="placeholder"):
        processor(text=["<|image|> what ?"], images=[[]])


def test_saved_directory_loads_through_the_registry(tmp_path):
    model, processor = build_for_training(TINY, build_tokenizer("llava"), seed=3)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert family_of_checkpoint(tmp_path).name == "llava"
    loaded, proc2 = load_owl(tmp_path)
    assert family_of(loaded).name == "llava" and not loaded.training
    assert loaded.config.get_text_config()._attn_implementation == "owl_lab_sdpa"  # observer installed
    batch = proc2(text=["<|image|> what color is the circle ?"], images=[[_image(1)]])
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model.eval()(**batch).logits)
    eager, _ = load_owl(tmp_path, attn_implementation="eager")
    assert eager.config.get_text_config()._attn_implementation == "owl_lab_eager"


def test_recipe_trains_through_the_lab_trainer(tmp_path):
    recipe = load_recipe("llava-tiny")
    recipe = {
        **recipe,
        "config": TINY,
        "eval": {"seed": 1000, "n_per_task": 2, "batch_size": 8, "tasks": ["color", "add"]},
        "stages": [{**st, "steps": 2, "batch_size": 4} for st in recipe["stages"]],
    }
    metrics = train(recipe, tmp_path, progress=False)
    assert metrics["family"] == "llava" and metrics["steps"] == 6
    assert set(metrics["accuracy"]) == {"color", "add"} and "vision_probe" in metrics
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "processor_config.json").is_file()
    model, _ = load_owl(tmp_path)
    assert family_of(model).name == "llava"
