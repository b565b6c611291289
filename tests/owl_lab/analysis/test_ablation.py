"""owl_lab.analysis.ablation: checkpoint descriptions, pooled/paired tables, shipped-metrics cross-check."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from owl_lab.analysis import ablation
from owl_lab.analysis.ablation import (
    accuracy_table,
    chance_check,
    crosscheck,
    describe,
    difference_text,
    pair_table,
    paired_table,
    replicate_verdict,
    score_tasks,
    shipped_accuracy,
)
from owl_lab.analysis.stats import binomial_se, paired_difference
from owl_lab.synth import eval_set
from owl_lab.train import family_classes

FLAGS = {  # two checkpoints scored on the same 4 + 2 + 3 questions
    "base": {"color": [1, 1, 0, 0], "shape": [1, 0], "distractor:4": [1, 1, 1]},
    "var": {"color": [1, 1, 1, 0], "shape": [0, 0], "distractor:4": [0, 1, 1]},
}
COLUMNS = {"color": ["color"], "QA": ["color", "shape"], "N=4": ["distractor:4"]}


def _config(family, tiny_configs, **overrides):
    Config = family_classes(family)[0]
    return Config(**{**tiny_configs[family], **overrides}, vocab_size=50)


def test_describe_reads_the_config_not_the_name(tmp_path, tiny_configs):
    cfg = _config("owl2", tiny_configs)
    info = describe(cfg)
    assert (info["queries"], info["image_size"], info["patch_size"], info["patches"]) == (4, 28, 7, 16)
    assert info["tokens_per_image"] == 5 and info["vit"] == "unknown"
    vit = {"kind": "vision"}
    lang = {"tasks": {"color": 1}}
    frozen = dict(lang, freeze=[r"model\.vision_model\."])
    for stages, expected in (
        ([vit, lang, lang], "trainable"),
        ([vit, frozen, frozen], "frozen"),
        ([vit, frozen, lang], "partly frozen"),
    ):
        (tmp_path / "recipe.json").write_text(json.dumps({"stages": stages}))
        assert describe(cfg, tmp_path)["vit"] == expected
    o3 = describe(_config("owl3", tiny_configs, hyper_layers=[1, 2], mi_rope=False, hyper_attention="sum"))
    assert o3 == {
        "hyper_attention": "sum",
        "mi_rope": False,
        "hyper_layers": "1,2",
        "projector": "linear",
        "image_size": 28,
    }
    with pytest.raises(ValueError, match="Owl2"):
        describe(type("C", (), {"model_type": "llama"})())


def test_accuracy_table_pools_keys():
    acc = accuracy_table(FLAGS, COLUMNS)
    assert list(acc.columns) == list(COLUMNS) and list(acc.index) == ["base", "var"]
    assert acc.loc["base", "QA"] == pytest.approx(100 * 3 / 6)
    assert acc.loc["var", "color"] == 75.0 and acc.loc["var", "N=4"] == pytest.approx(200 / 3)
    se = accuracy_table(FLAGS, COLUMNS, se=True)
    assert se.loc["var", "QA"] == pytest.approx(binomial_se([1, 1, 1, 0, 0, 0]))
    with pytest.raises(ValueError, match="no flags"):
        accuracy_table(FLAGS, {"x": ["multi"]})


def test_paired_table_is_variant_minus_baseline():
    t = paired_table(FLAGS, "base", COLUMNS)
    assert list(t.index) == [("var", c) for c in COLUMNS]
    d = paired_difference(
        FLAGS["var"]["color"] + FLAGS["var"]["shape"], FLAGS["base"]["color"] + FLAGS["base"]["shape"]
    )
    row = t.loc[("var", "QA")]
    assert row["diff"] == pytest.approx(d["diff"]) == 0.0 and row["se"] == pytest.approx(d["se"])
    assert row["baseline"] == 50.0 and row["n"] == 6 and not row["beyond"]
    assert t.loc[("var", "color"), "diff"] == 25.0
    with pytest.raises(ValueError, match="baseline"):
        paired_table(FLAGS, "nope", COLUMNS)


def test_pair_table_compares_any_two_labels():
    flags = dict(FLAGS, var2=FLAGS["base"])
    t = pair_table(flags, {"seed": ("var2", "base"), "effect": ("var", "var2")}, COLUMNS)
    assert list(t.index) == [(p, c) for p in ("seed", "effect") for c in COLUMNS]
    assert (t.loc["seed", "diff"] == 0).all() and (t.loc["seed", "se"] == 0).all()
    assert t.loc[("effect", "color"), "diff"] == 25.0 and t.loc[("effect", "color"), "a"] == 75.0
    with pytest.raises(ValueError, match="nope"):
        pair_table(flags, {"x": ("var", "nope")}, COLUMNS)


def test_replicate_verdict_needs_one_sign_and_more_than_the_seed_spread():
    rows = [("effect s0", 6.0), ("effect s1", 4.0), ("design s1-s0", -3.0), ("other s1-s0", 1.0)]
    table = pd.DataFrame([{"comparison": c, "column": "QA", "diff": d} for c, d in rows]).set_index(
        ["comparison", "column"]
    )
    line = replicate_verdict(table, ["effect s0", "effect s1"], ["design s1-s0", "other s1-s0"], "QA")
    assert "sign across seeds: True (+6.0, +4.0 points)" in line and "(3.0 points): True" in line
    table.loc[("effect s1", "QA"), "diff"] = -4.0
    line = replicate_verdict(table, ["effect s0", "effect s1"], ["design s1-s0"], "QA")
    assert "sign across seeds: False" in line and ": True" in line.split("difference")[1]
    table.loc[("design s1-s0", "QA"), "diff"] = 9.0
    assert replicate_verdict(table, ["effect s0"], ["design s1-s0"], "QA").endswith("(9.0 points): False")


def test_shipped_accuracy_and_crosscheck(tmp_path):
    (tmp_path / "metrics.json").write_text(
        json.dumps(
            {
                "accuracy": {"color": 50.0, "shape": 20.0},
                "eval": {"n_per_task": 100},
                "distractor": {"n_images": [1, 4], "circular": [60.0, 30.0], "instance": [60.0, 40.0]},
            }
        )
    )
    (tmp_path / "recipe.json").write_text(json.dumps({"eval": {"distractor": {"questions": 30}}}))
    shipped = shipped_accuracy(tmp_path)
    assert shipped == {
        "color": (50.0, 100),
        "shape": (20.0, 100),
        "distractor:1": (60.0, 30),
        "distractor:4": (30.0, 30),
    }
    assert shipped_accuracy(tmp_path / "missing") == {}
    check = crosscheck(FLAGS, {"base": shipped}, COLUMNS)
    qa = check.loc[("base", "QA")]
    assert qa["shipped"] == pytest.approx(35.0) and qa["n shipped"] == 200 and qa["ours"] == 50.0
    pooled_p = (0.50 * 6 + 0.35 * 200) / 206
    assert qa["se"] == pytest.approx(100 * math.sqrt(pooled_p * (1 - pooled_p) * (1 / 6 + 1 / 200)))
    assert check.loc[("base", "N=4"), "diff"] == pytest.approx(70.0)
    assert not check.loc[("base", "N=4"), "beyond"]  # 3 of 3 vs 9 of 30: 70 points but 2.4 pooled SE
    assert math.isnan(check.loc[("var", "QA"), "shipped"]) and not check.loc[("var", "QA"), "beyond"]
    partial = crosscheck({"base": FLAGS["base"], "few": {"color": [1, 0]}}, {"base": shipped}, COLUMNS)
    assert [i for i in partial.index if i[0] == "few"] == [("few", "color")]  # unscored columns left out


def test_crosscheck_uses_the_pooled_proportion_near_zero():
    """15 of 60 vs 2 of 40 right: per-sample SEs (5.6, 3.4) would call 20 points 3.0 SE apart; under
    "one accuracy" (pooled 17 %) the difference is 2.6 SE, which two seeds of questions can give."""
    flags = {"m": {"distractor:8": [1] * 15 + [0] * 45}}
    shipped = {"m": {"distractor:8": (5.0, 40)}}
    row = crosscheck(flags, shipped, {"N=8": ["distractor:8"]}).loc[("m", "N=8")]
    assert math.hypot(binomial_se(25.0, 60), binomial_se(5.0, 40)) * 3 < 20.0  # the old rule flagged it
    assert row["se"] == pytest.approx(100 * math.sqrt(0.17 * 0.83 * (1 / 60 + 1 / 40)))
    assert not row["beyond"]
    assert crosscheck(flags, {"m": {"distractor:8": (0.0, 400)}}, {"N=8": ["distractor:8"]}).loc[
        ("m", "N=8"), "beyond"
    ]


def test_chance_check():
    at = chance_check([1] * 33 + [0] * 67, 100 / 3)
    assert at["at_chance"] and not at["above"] and at["se"] == pytest.approx(binomial_se(100 / 3, 100))
    high = chance_check([1] * 60 + [0] * 40, 100 / 3)
    assert high["above"] and not high["at_chance"]
    low = chance_check([0] * 100, 100 / 3)
    assert not low["at_chance"] and not low["above"]
    with pytest.raises(ValueError):
        chance_check([], 50)


def test_difference_text_and_score_tasks(monkeypatch):
    d = paired_difference([1, 1, 0, 1], [0, 1, 0, 0])
    assert (
        difference_text(d)
        == f"25.0% -> 75.0%, Δ +50.0 ± {d['se']:.1f} (paired SE); beyond 2 SE: {d['beyond_noise']}"
    )
    sets = {"color": eval_set("color", 3, seed=0), "add": eval_set("add", 2, seed=0)}
    monkeypatch.setattr("owl_lab.evaluate.exact_match", lambda m, p, ex, bs: [len(ex) == 3] * len(ex))
    assert score_tasks(None, None, sets) == {"color": [True] * 3, "add": [False] * 2}


def test_exists_finds_shipped_names_and_directories(tmp_path):
    from owl_lab import zoo

    name = zoo.list_checkpoints()[0]
    assert ablation.exists(name) and ablation.exists(zoo.checkpoints_dir() / name)
    assert not ablation.exists("owl2-tiny-not-trained") and not ablation.exists(tmp_path / "nothing")
