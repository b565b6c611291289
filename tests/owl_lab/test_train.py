"""Training smoke test, reproducibility, the evaluation metric, recipes and the shipped checkpoints."""

from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch
from transformers import AutoTokenizer

from owl_lab import load_owl
from owl_lab.evaluate import IGNORE_INDEX, collate, compare, evaluate, exact_match, expand_labels
from owl_lab.synth import eval_set
from owl_lab.train import default_threads, estimate_seconds, load_recipe, shipped_recipes, stage_freeze, train

SMOKE_BUDGET_S = 120


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Train the Owl2 smoke recipe once (module scope) into a temporary checkpoint directory."""
    out = tmp_path_factory.mktemp("smoke-owl2")
    start = time.perf_counter()
    metrics = train(load_recipe("smoke-owl2"), out, progress=False)
    return metrics, out, time.perf_counter() - start


def test_smoke_recipe_learns_within_budget(smoke):
    metrics, _, seconds = smoke
    losses = metrics["_history"]["loss"]
    assert seconds < SMOKE_BUDGET_S, f"smoke training took {seconds:.0f} s"
    assert (
        len(metrics["stage_seconds"]) == 1
        and 0 < metrics["stage_seconds"][0] <= metrics["train_seconds"] + 0.1
    )
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20  # the loss falls
    # chance: 1 of 7 colours; parity is yes-or-no-like (2 answers)
    assert metrics["accuracy"]["color"] > 100 / 7 + 15, metrics["accuracy"]
    assert metrics["accuracy"]["parity"] > 50 + 15, metrics["accuracy"]


@pytest.mark.parametrize("name", ["smoke-owl2", "smoke-owl3"])
def test_same_seed_gives_identical_first_losses(name):
    recipe = load_recipe(name)
    a = train(recipe, None, progress=False, evaluate_after=False, steps_override=3)["_history"]["loss"]
    b = train(recipe, None, progress=False, evaluate_after=False, steps_override=3)["_history"]["loss"]
    c = train(dict(recipe, seed=1), None, progress=False, evaluate_after=False, steps_override=3)["_history"][
        "loss"
    ]
    assert a == b
    assert a != c


def test_estimate_projects_each_stage_from_a_fraction_of_its_steps():
    base = load_recipe("smoke-owl2")
    recipe = {**base, "stages": [{**base["stages"][0], "steps": 100}, {**base["stages"][0], "steps": 300}]}
    est = estimate_seconds(recipe, 0.05, threads=1, progress=False)  # runs 5 + 15 steps
    assert est["steps"] == [100, 300] and len(est["ms_per_step"]) == 2 and min(est["ms_per_step"]) > 0
    scaled = sum(ms / 1000 * n for ms, n in zip(est["ms_per_step"], [100, 300], strict=True))
    # the projection is the per-stage cost times the full steps, plus the unscaled rest of the short run
    assert scaled - 0.1 <= est["projected_seconds"] <= scaled + est["measured_seconds"]
    assert est["projected_seconds"] > 10 * est["measured_seconds"]  # ~20x the steps, most of the time
    with pytest.raises(ValueError, match="fraction"):
        estimate_seconds(recipe, 0.0)


def test_thread_count_follows_the_environment_then_the_machine(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert default_threads() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads() == (os.cpu_count() or 1)
    metrics = train(
        load_recipe("smoke-owl3"), None, progress=False, evaluate_after=False, steps_override=1, threads=1
    )
    assert metrics["threads"] == 1


def test_checkpoint_round_trip_reproduces_metrics(smoke):
    metrics, out, _ = smoke
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "recipe.json",
        "metrics.json",
        "loss_curve.json",
    ):
        assert (out / name).is_file(), name
    shipped = json.loads((out / "metrics.json").read_text())
    steps = load_recipe("smoke-owl2")["stages"][0]["steps"]
    assert (
        shipped["steps"] == steps and len(json.loads((out / "loss_curve.json").read_text())["loss"]) == steps
    )
    model, processor = load_owl(out)
    fresh = evaluate(model, processor, json.loads((out / "recipe.json").read_text()))
    assert compare(shipped, fresh, tolerance=0.0) == []
    assert AutoTokenizer.from_pretrained(out).decode([1]) == "<s>"


def test_teacher_forced_exact_match_equals_greedy_decoding(smoke):
    metrics, _, _ = smoke
    model, processor = metrics["_model"], metrics["_processor"]
    examples = eval_set("color", 12, seed=5, render_size=112, n_objects=[1, 1]) + eval_set(
        "parity", 12, seed=5
    )
    flags = exact_match(model, processor, examples, batch_size=8)
    for ex, flag in zip(examples, flags, strict=True):
        batch = collate(processor, [ex], with_answers=False)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=4, do_sample=False)
        new = out[0, batch["input_ids"].shape[1] :].tolist()
        answer = processor.tokenizer(ex.answer, add_special_tokens=False).input_ids + [
            processor.tokenizer.eos_token_id
        ]
        assert (new[: len(answer)] == answer) == flag, (ex.text, ex.answer, processor.decode(new))
    assert any(flags)  # the comparison above covered at least one correct answer


def test_owl2_labels_expanded_like_the_model_loss(smoke):
    metrics, _, _ = smoke
    model, processor = metrics["_model"], metrics["_processor"]
    examples = eval_set("color", 3, seed=2, render_size=112) + eval_set(
        "add", 3, seed=2
    )  # text rows: 0 images
    batch = collate(processor, examples)
    with torch.no_grad():
        out = model(**batch)
    labels = expand_labels(
        batch["labels"],
        batch["input_ids"],
        model.config.tokens_per_image,
        out.logits.shape[1],
        batch["attention_mask"],
    )
    loss = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )
    torch.testing.assert_close(loss, out.loss)


def test_recipes_resolve_and_name_their_checkpoints():
    names = shipped_recipes()
    assert {"owl2-tiny", "owl3-tiny"} <= set(names)
    for name in names + ["smoke-owl2", "smoke-owl3"]:
        recipe = load_recipe(name)
        assert recipe["name"] == name and "extends" not in recipe
        assert recipe["config"]["num_hidden_layers"] >= 6 or name.startswith("smoke")
    with pytest.raises(FileNotFoundError, match="known recipes"):
        load_recipe("no-such-recipe")


def test_vit_ablation_differs_from_owl2_tiny_only_in_the_freeze_rule():
    """owl2-tiny-vittrain inherits owl2-tiny's stages and overrides only the recipe-level freeze."""
    base, trainable = load_recipe("owl2-tiny"), load_recipe("owl2-tiny-vittrain")
    language = [s for s in base["stages"] if s.get("kind") != "vision"]
    assert all(stage_freeze(base, s) == [r"model\.vision_model\."] for s in language)
    assert not any(stage_freeze(trainable, s) for s in trainable["stages"])
    assert trainable["stages"] == base["stages"]
    assert {k for k in base if base[k] != trainable.get(k)} == {"name", "description", "freeze"}


def test_stage_freeze_prefers_the_stage_rule_and_never_freezes_vision_pretraining():
    recipe = {"freeze": ["a"]}
    assert stage_freeze(recipe, {}) == ["a"]
    assert stage_freeze(recipe, {"freeze": ["b"]}) == ["b"]
    assert stage_freeze(recipe, {"freeze": []}) == []
    assert stage_freeze(recipe, {"kind": "vision"}) == []
    assert stage_freeze({}, {}) == []


def test_compare_flags_differences_beyond_tolerance():
    shipped = {"accuracy": {"color": 90.0}, "distractor": {"circular": [80.0, 70.0]}}
    assert compare(shipped, {"accuracy": {"color": 90.5}, "distractor": {"circular": [80.0, 70.9]}}) == []
    problems = compare(shipped, {"accuracy": {"color": 88.0}, "distractor": {"circular": [80.0]}})
    assert len(problems) == 2
    assert any("accuracy.color" in p for p in problems) and any("circular[1]: missing" in p for p in problems)


def test_vision_branch_can_start_as_a_copy_of_the_text_branch():
    from owl_lab.train import build

    recipe = load_recipe("smoke-owl2")
    plain, _ = build(dict(recipe, vision_branch_from_text=False))
    copied, _ = build(dict(recipe, vision_branch_from_text=True))
    pairs = [
        (n, n.replace(".multiway.1.", ".multiway.0."))
        for n, _ in copied.named_parameters()
        if ".multiway.1." in n
    ]
    assert pairs
    p_plain, p_copy = dict(plain.named_parameters()), dict(copied.named_parameters())
    assert all(torch.equal(p_copy[v], p_copy[t]) for v, t in pairs)
    assert not all(
        torch.equal(p_plain[v], p_plain[t]) for v, t in pairs if "norm" not in v
    )  # k/v differ at init
    nomam = _merge_config(recipe, modality_adaptive=False)
    with pytest.raises(ValueError, match="modality-adaptive"):
        build(dict(nomam, vision_branch_from_text=True))


def _merge_config(recipe, **config):
    return dict(recipe, config={**recipe["config"], **config})


@pytest.mark.parametrize("name", ["smoke-owl2", "smoke-owl3"])
def test_vision_stage_trains_only_the_visual_path(name):
    from owl_lab.pretrain_vision import run_vision_stage
    from owl_lab.train import build

    recipe = load_recipe(name)
    model, processor = build(recipe)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    history = {"step": [], "loss": [], "lr": [], "stage": []}
    stage = {"steps": 4, "batch_size": 4, "lr": 1e-3, "warmup": 1, "objectives": ["patches", "board"]}
    assert (
        run_vision_stage(
            model, processor, recipe["family"], stage, "t", recipe.get("world", {}), history, 10, 0, False
        )
        == 14
    )
    assert len(history["loss"]) == 4 and all(math.isfinite(v) for v in history["loss"])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    visual = ("vision_model", "visual_abstractor", "vision2text")
    assert changed and all(any(v in n for v in visual) for n in changed), sorted(changed)[:5]
    if recipe["family"] == "owl2":  # the board read-out reaches through the abstractor
        assert any("visual_abstractor" in n for n in changed)
    with pytest.raises(ValueError, match="objectives"):
        run_vision_stage(
            model,
            processor,
            recipe["family"],
            dict(stage, objectives=["nope"]),
            "t",
            {},
            history,
            0,
            0,
            False,
        )


def test_multi_image_questions_are_scored_on_their_own():
    from owl_lab.train import build

    recipe = load_recipe("smoke-owl3")
    recipe = dict(
        recipe,
        stages=[dict(recipe["stages"][0], tasks={"color": 1, "multi": 1, "parity": 1})],
        eval={"seed": 3, "n_per_task": 4, "batch_size": 4},
    )
    model, processor = build(recipe)
    metrics = evaluate(model, processor, recipe)
    assert set(metrics["accuracy"]) == {"color", "multi", "parity"}
    assert metrics["image_accuracy"] == metrics["accuracy"]["color"]  # multi is not pooled with single-image
    assert metrics["text_accuracy"] == metrics["accuracy"]["parity"]


def test_init_continues_from_a_checkpoint_and_rejects_another_architecture(smoke, tmp_path):
    from owl_lab.train import build

    _, out, _ = smoke
    shipped, _ = load_owl(out)
    model, _ = build({**load_recipe("smoke-owl2"), "init": str(out)})
    assert _same_weights(model, shipped)
    fresh, _ = build(load_recipe("smoke-owl2"))
    assert not _same_weights(fresh, shipped)
    wider = load_recipe("smoke-owl2")
    wider = {
        **wider,
        "config": {**wider["config"], "intermediate_size": wider["config"]["intermediate_size"] + 8},
    }
    with pytest.raises(ValueError, match="does not fit"):
        build({**wider, "init": str(out)})


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
