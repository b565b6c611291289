"""owl_lab.widgets: the explorer's pure function on tiny saved checkpoints, and the app without a frontend."""

from __future__ import annotations

import ipywidgets as w
import numpy as np
import pytest
import torch

from owl_lab.families import family_of
from owl_lab.widgets import ExplorerState, ModelCache, explore, explorer_app


@pytest.fixture(autouse=True, scope="module")
def _single_thread(single_thread):
    """Every test here runs on one intra-op thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, tiny_configs):
    """A data dir with checkpoints/owl2-mini and checkpoints/owl3-mini (random weights, real format;
    2 decoder layers, 28-px images, 4×4 patches: ``tiny_configs`` in tests/conftest.py)."""
    from owl_lab.train import build

    root = tmp_path_factory.mktemp("data")
    for family, config in tiny_configs.items():
        model, processor = build({"family": family, "seed": 0, "config": config})
        out = root / "checkpoints" / f"{family}-mini"
        model.save_pretrained(out)
        processor.save_pretrained(out)
    return root


@pytest.fixture(scope="module")
def cache():
    return ModelCache()


def _bars(fig):
    return torch.tensor(fig.data[0].y, dtype=torch.float64)


def test_explore_owl2_directory(data_root, cache):
    path = str(data_root / "checkpoints" / "owl2-mini")
    view = explore(ExplorerState(model=path, task="color", scene=2, layer=1), cache)
    assert view.family == "owl2" and isinstance(view.answer, str) and view.expected
    assert set(view.figures) == {"image", "layer_mass", "token_mass", "token_keys", "abstractor", "pixels"}
    shown = view.figures["image"].data
    assert len(shown) == 1 and (np.asarray(shown[0].z) == np.asarray(view.images[0].convert("RGB"))).all()
    assert sum(lab.startswith("img0:") for lab in view.labels) == 5  # 4 queries + vit_eos rows
    keys = _bars(view.figures["token_keys"])  # the last position's distribution over all keys
    assert len(keys) == len(view.labels) and keys.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert 0 < view.numbers["token_visual_mass"] < 1 and 0 <= view.numbers["visual_share_layer"] <= 1
    # the per-query table agrees with the key view: visual mass of the last query (mean over heads)
    last = len(view.labels) - 1
    visual = sum(
        float(t.y[list(t.x).index(last)])
        for t in view.figures["token_mass"].data
        if t.name.startswith("image") and last in list(t.x)
    )
    assert visual == pytest.approx(view.numbers["token_visual_mass"], abs=1e-5)
    # a chosen head and token give that head's row
    head = explore(ExplorerState(model=path, task="color", scene=2, layer=1, head=2, token=3), cache)
    assert "token 3" in head.figures["token_keys"].layout.title.text
    assert not torch.allclose(_bars(head.figures["token_keys"])[:4], keys[:4])
    assert len(cache) == 1  # loaded once


def test_explore_owl3_by_name_with_gates(data_root, cache, monkeypatch):
    monkeypatch.setenv("OWL_LAB_DATA", str(data_root))
    view = explore(
        ExplorerState(model="owl3-mini", task="color", layer=0), cache
    )  # layer 0 is the hyper layer
    assert view.family == "owl3" and "gates" in view.figures and "abstractor" not in view.figures
    assert "(cross)" in view.figures["token_mass"].layout.title.text  # the kind that sees the image
    assert 0 <= view.numbers["gate_vision_share"] <= 1
    panels = [a.text for a in view.figures["layer_mass"].layout.annotations]
    assert any("gated fusion" in p for p in panels)
    text_only = explore(ExplorerState(model="owl3-mini", task="add", layer=1, kind="self"), cache)
    assert set(text_only.figures) == {"layer_mass", "token_mass", "token_keys"}
    assert text_only.numbers["token_visual_mass"] == 0.0


def test_explore_clear_errors(data_root, cache):
    path = str(data_root / "checkpoints" / "owl2-mini")
    for bad, match in [
        (dict(layer=7), "layer must be"),
        (dict(head=9), "head must be"),
        (dict(token=10_000), "token must be"),
        (dict(kind="cross"), "kinds"),
    ]:
        with pytest.raises(ValueError, match=match):
            explore(ExplorerState(model=path, **bad), cache)
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        explore(ExplorerState(model="no-such-model"), cache)
    with pytest.raises(ValueError, match="choose a model"):
        explore(ExplorerState(model=""), cache)


def test_app_builds_and_updates_without_frontend(data_root, cache, monkeypatch):
    monkeypatch.setenv("OWL_LAB_DATA", str(data_root))
    app = explorer_app(cache=cache)  # default: the first shipped checkpoint
    assert isinstance(app.widget, w.VBox) and set(app.model.options) == {"owl2-mini", "owl3-mini"}
    assert app.view is not None and app.view.family == "owl2"
    assert len(app.head.options) == 1 + 4 and app.layer.max == 1
    outs = {k: o.outputs for k, o in app.outputs.items()}
    assert "application/vnd.plotly.v1+json" in outs["layer_mass"][0]["data"] and outs["gates"] == ()
    app.layer.value = 1  # a control change re-runs explore through the observer
    assert app.view.state.layer == 1
    first = np.asarray(app.view.images[0])
    app.seed.value = 7  # the seed control picks another scene (same task and index)
    assert app.view.state.seed == 7 and not (np.asarray(app.view.images[0]) == first).all()
    assert "application/vnd.plotly.v1+json" in app.outputs["image"].outputs[0]["data"]
    app.model.value = "owl3-mini"
    assert (
        app.view.family == "owl3" and app.outputs["gates"].outputs and not app.outputs["abstractor"].outputs
    )
    app.model.value = "nope"  # errors are shown in the app, not raised into the frontend
    assert "error" in app.text.value and all(o.outputs == () for o in app.outputs.values())


def test_app_model_picker_and_head_choice(data_root, cache, monkeypatch, tmp_path):
    monkeypatch.setenv("OWL_LAB_DATA", str(data_root))
    app = explorer_app(cache=cache, run=False)  # the controls are filled on load, before any render
    assert app.view is None
    assert app.head.label == "mean" and [label for label, _ in app.head.options] == [
        "mean",
        "0",
        "1",
        "2",
        "3",
    ]
    assert app.model.choice.options == ("owl2-mini", "owl3-mini", "checkpoint directory…")
    assert app.model.path.layout.display == "none"  # the path entry shows only when chosen
    app.head.value = 2
    assert app.view.state.head == 2
    app.head.value = None  # the notebook's way to ask for the mean: shown as "mean", not as no selection
    assert app.head.label == "mean" and app.view.state.head is None
    app.model.choice.value = "owl3-mini"  # a click in the dropdown
    assert app.model.value == "owl3-mini" and app.view.family == "owl3"
    app.model.choice.value = "checkpoint directory…"
    assert app.model.path.layout.display is None and app.model.value == "owl3-mini"  # nothing typed yet
    app.model.path.value = str(data_root / "checkpoints" / "owl2-mini")  # a typed directory (Enter)
    assert app.view.family == "owl2" and app.view.state.model.endswith("owl2-mini")
    app.model.value = "owl3-mini"  # code sets a shipped name: the dropdown follows
    assert app.model.choice.value == "owl3-mini" and app.model.path.layout.display == "none"
    app.model.value = str(tmp_path / "missing")
    assert app.model.choice.value == "checkpoint directory…" and "error" in app.text.value


def _pixel_maps(fig) -> list[np.ndarray]:
    return [np.asarray(t.z, dtype=float) for t in fig.data if t.type == "heatmap"]


@pytest.mark.parametrize("family", ["owl2", "owl3"])
def test_app_pixels_panel_follows_answer_token_layer_and_map(data_root, cache, monkeypatch, family):
    monkeypatch.setenv("OWL_LAB_DATA", str(data_root))
    app = explorer_app(f"{family}-mini", cache=cache, run=False)
    app.scene.value = 1  # fires the shared observer: every panel, the pixels panel included
    view = app.view
    assert "application/vnd.plotly.v1+json" in app.outputs["pixels"].outputs[0]["data"]
    first = _pixel_maps(view.figures["pixels"])
    assert [t.name for t in view.figures["pixels"].data if t.type == "heatmap"] == ["composed"]
    assert view.pixels is not None and "composed" in view.pixels.numbers  # share on the asked object
    app.answer_token.value = 1  # the next answer token: another decoder query, another map
    second = _pixel_maps(app.view.figures["pixels"])
    assert app.view.state.answer_token == 1 and len(second) == len(first) == 1
    assert not np.allclose(first[0], second[0])
    assert app.view.pixels.token != view.pixels.token
    reads = family_of(cache.get(f"{family}-mini")[0]).image_layers(cache.get(f"{family}-mini")[0].config)
    for layer in (0, 1):  # a layer that reads the image shows its own map; any other shows the mean ("all")
        app.layer.value = layer
        shown = layer if layer in reads else "all"
        assert f"(layer {shown})" in app.view.figures["pixels"].layout.title.text
    app.pixel_map.value = "all"
    names = [t.name for t in app.view.figures["pixels"].data if t.type == "heatmap"]
    assert names == ["raw", "composed", "rollout"]
    app.answer_token.value = 99  # out of range: shown as an error, outputs cleared
    assert "token must be in" in app.text.value and app.outputs["pixels"].outputs == ()


def _save_tiny_llava(path, image_size: int, patch_size: int, layers: int = 2):
    """A random stock LLaVA (width 32) with its processor saved to ``path``; returns ``path`` as str."""
    from owl_lab.models.llava import build_for_training
    from owl_lab.synth.tokenizer import build_tokenizer

    config = {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": layers, "num_attention_heads": 4,
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "image_size": image_size, "patch_size": patch_size},
    }  # fmt: skip
    model, processor = build_for_training(config, build_tokenizer("llava"), seed=0)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def test_explore_a_stock_llava_directory(tmp_path, cache):
    """The explorer reads a stock transformers LLaVA like the Owls: decoder shape from its text config,
    one row per patch, a pixels panel without rollout (the stock tower has no hook points)."""
    _save_tiny_llava(tmp_path, image_size=56, patch_size=14)
    view = explore(ExplorerState(model=str(tmp_path), task="color", scene=1, layer=1, head=3), cache)
    assert view.family == "llava" and view.labels.count("<|image|>") == 16  # 4×4 patches, one row each
    assert 0 < view.numbers["visual_share_layer"] < 1
    assert "pixels" in view.figures
    with pytest.raises(ValueError, match="head must be"):
        explore(ExplorerState(model=str(tmp_path), task="color", scene=1, layer=1, head=4), cache)


def test_explore_renders_at_the_checkpoints_training_size(tmp_path, cache):
    """A checkpoint whose recipe.json trained on 96-px scenes (llava-tiny) is shown the same scene drawn at
    96 px, not the worlds' default 112 px (resizing 112 → 48 px would blur away the `pattern` bands)."""
    import json

    from owl_lab.explorer import example

    _save_tiny_llava(tmp_path, image_size=48, patch_size=8, layers=1)
    (tmp_path / "recipe.json").write_text(json.dumps({"family": "llava", "world": {"render_size": 96}}))
    view = explore(ExplorerState(model=str(tmp_path), task="color", scene=2, layer=0), cache)
    assert np.asarray(view.figures["image"].data[0].z).shape[:2] == (96, 96)
    drawn_96, drawn_112 = example("color", 2, 0, 96), example("color", 2, 0)
    assert drawn_96.text == drawn_112.text and drawn_96.scenes == drawn_112.scenes  # same scene, other size
    assert drawn_112.images[0].size == (112, 112)
