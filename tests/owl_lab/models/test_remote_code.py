"""Saved lab checkpoints carry ``auto_map`` + the ``owl_lab_remote.py`` shim: a plain transformers session
(owl_lab NOT imported) loads them with ``trust_remote_code=True`` and gets load_owl's numbers; without
``trust_remote_code`` it refuses, and without an importable owl_lab it names the missing package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoProcessor, ProcessorMixin

from owl_lab import load_owl
from owl_lab.models.remote_code import SHIM_FILE, SHIM_SOURCE
from owl_lab.zoo import resolve_checkpoint

NAMES = ["owl2-tiny", "owl3-tiny"]
CASE = dict(text=["<|image|>what color is the circle ?", "how many squares ?"], answers=["red", "two"])


def image():
    from PIL import Image

    return Image.new("RGB", (70, 40), (200, 30, 30))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each shipped checkpoint re-saved by the lab, with the reference batch and logits of load_owl."""
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for name in NAMES:
        model, processor = load_owl(name)
        directory = root / name
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
        batch = processor(**CASE, images=[image()])
        with torch.no_grad():
            logits = model(**batch).logits
        torch.save({"batch": dict(batch), "logits": logits}, directory.parent / f"{name}.ref.pt")
        out[name] = (directory, model)
    return out


def run_fresh(code: str, tmp_path: Path, hide_owl_lab: bool = False) -> subprocess.CompletedProcess:
    """Run ``code`` in a new interpreter (owl_lab not imported; hidden from sys.path if asked)."""
    prelude = "import sys, os\n"
    if hide_owl_lab:
        # drop path entries holding the package and any editable-install finder for it
        prelude += (
            "sys.path = [p for p in sys.path if not os.path.isdir(os.path.join(p or '.', 'owl_lab'))]\n"
        )
        prelude += (
            "sys.meta_path = [f for f in sys.meta_path if 'owl_lab' not in str(getattr(f, '__module__', ''))]"
        )
        prelude += "\n"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("name", NAMES)
def test_save_writes_auto_map_and_the_shim_and_leaves_the_config_alone(saved, name):
    directory, model = saved[name]
    config = json.loads((directory / "config.json").read_text())
    kind = type(model).__name__
    assert config["auto_map"] == {
        "AutoConfig": f"owl_lab_remote.{type(model.config).__name__}",
        "AutoModelForCausalLM": f"owl_lab_remote.{kind}",
    }
    assert "auto_map" not in model.config.__dict__  # only the saved file gets it
    processor = json.loads((directory / "processor_config.json").read_text())
    assert processor["auto_map"]["AutoProcessor"] == f"owl_lab_remote.{processor['processor_class']}"
    assert processor["image_processor"]["auto_map"]["AutoImageProcessor"].startswith("owl_lab_remote.Owl")
    assert (directory / SHIM_FILE).read_text() == SHIM_SOURCE


@pytest.mark.parametrize("name", NAMES)
def test_with_owl_lab_imported_the_auto_map_is_not_needed(saved, name):
    """auto_map + registration: the registered (local) classes win, no trust_remote_code prompt."""
    directory, model = saved[name]
    ref = torch.load(directory.parent / f"{name}.ref.pt", weights_only=False)
    auto = AutoModelForCausalLM.from_pretrained(directory).eval()
    processor = AutoProcessor.from_pretrained(directory)
    assert type(auto) is type(model) and isinstance(processor, ProcessorMixin)
    batch = processor(**CASE, images=[image()])
    with torch.no_grad():
        assert torch.equal(auto(**batch).logits, ref["logits"])


def test_shipped_checkpoints_have_no_auto_map():
    """Registration on import is what loads them (tests/owl_lab/models/test_auto_classes.py)."""
    for name in NAMES:
        assert "auto_map" not in json.loads((resolve_checkpoint(name) / "config.json").read_text())


def test_plain_transformers_session_loads_with_trust_remote_code(saved, tmp_path):
    code = f"""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor
    from PIL import Image
    root = {str(saved[NAMES[0]][0].parent)!r}
    for name in {NAMES!r}:  # first, before any remote code has imported owl_lab: a refusal
        for auto in (AutoConfig, AutoModelForCausalLM, AutoProcessor):
            try:
                auto.from_pretrained(root + "/" + name)
                raise SystemExit(f"{{auto.__name__}} loaded {{name}} without trust_remote_code")
            except ValueError as err:
                assert "trust_remote_code" in str(err)
    assert "owl_lab" not in sys.modules
    for name in {NAMES!r}:
        d = root + "/" + name
        config = AutoConfig.from_pretrained(d, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(d, trust_remote_code=True)
        ref = torch.load(d + ".ref.pt", weights_only=False)
        batch = processor(**{CASE!r}, images=[Image.new("RGB", (70, 40), (200, 30, 30))])
        for key, value in ref["batch"].items():
            same = all(torch.equal(a, b) for a, b in zip(value, batch[key])) if isinstance(value, list) \\
                else torch.equal(value, batch[key])
            assert same, key
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, ref["logits"]), name
        print("RESULT", name, type(config).__module__, type(model).__name__, type(processor).__name__)
    """
    done = run_fresh(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line.split("RESULT ", 1)[1] for line in done.stdout.splitlines() if "RESULT " in line]
    assert lines == [
        "owl2-tiny owl_lab.models.owl2.configuration_owl2 Owl2ForCausalLM Owl2Processor",
        "owl3-tiny owl_lab.models.owl3.configuration_owl3 Owl3ForCausalLM Owl3Processor",
    ]


def test_without_owl_lab_installed_the_error_names_it(saved, tmp_path):
    code = f"""
    from transformers import AutoModelForCausalLM
    try:
        import owl_lab
        raise SystemExit("owl_lab is still importable")
    except ImportError:
        pass
    try:
        AutoModelForCausalLM.from_pretrained({str(saved[NAMES[0]][0])!r}, trust_remote_code=True)
    except ImportError as err:
        print(err)
    """
    done = run_fresh(code, tmp_path, hide_owl_lab=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "owl_lab" in done.stdout
