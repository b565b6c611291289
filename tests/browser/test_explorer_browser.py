"""The explorer (notebook 12) in a real browser: JupyterLab + headless Debian Chromium via playwright.

What a person would do: open the notebook in JupyterLab, run all cells, move the app's layer slider
with the keyboard, and see the plots redraw. Runs when ``/usr/bin/chromium`` (Debian's package; no
browser is ever downloaded) and the playwright Python package are present, and skips *loudly*
otherwise (a warning in pytest's summary and the skip reason). On failure a screenshot is written
to ``$OWL_LAB_ARTIFACTS`` (default: the test's temporary directory) and its path is in the message.

The notebook is copied into a temporary directory and JupyterLab runs there token-less on a free
loopback port, with fresh settings/workspace directories and a fresh browser profile, so nothing in
the repository is saved or changed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = PROJECT_ROOT / "notebooks" / "12_explorer.ipynb"
CHROMIUM = Path(os.environ.get("OWL_LAB_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _why_not() -> str | None:
    if not CHROMIUM.exists():
        return (
            f"SKIPPED browser test: no Chromium at {CHROMIUM} (Debian: `apt-get install -y chromium`; "
            ".ci/run installs it)"
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "SKIPPED browser test: the playwright Python package is missing (pip install -e '.[dev]')"
    return None


REASON = _why_not()
if REASON:
    warnings.warn(REASON, stacklevel=1)  # shown in pytest's warnings summary, not only with -rs
pytestmark = [pytest.mark.browser, pytest.mark.skipif(REASON is not None, reason=REASON or "")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on a copy of notebook 12: yields (base url, notebook name, log path)."""
    root = tmp_path / "notebooks"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")]),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "OMP_NUM_THREADS": "1",
    }
    log = tmp_path / "jupyterlab.log"
    cmd = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        "--allow-root",
        f"--port={port}",
        "--ip=127.0.0.1",
        f"--ServerApp.root_dir={root}",
        "--IdentityProvider.token=",
        "--ServerApp.password=",
        "--ServerApp.disable_check_xsrf=True",
        "--LabApp.expose_app_in_browser=True",
        f"--LabApp.user_settings_dir={tmp_path / 'settings'}",
        f"--LabApp.workspaces_dir={tmp_path / 'ws'}",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status", timeout=2) as r:
                    json.load(r)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not start; log:\n{log.read_text()[-3000:]}") from None
                time.sleep(0.5)
        yield base, NOTEBOOK.name, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# JavaScript run in the page (JupyterLab exposes itself as window.jupyterapp with expose_app_in_browser).
_NOTEBOOK_STATE = """() => {
  if (!window.jupyterapp) return null;
  const nb = window.jupyterapp.shell.currentWidget;
  if (!nb || !nb.content || !nb.sessionContext.session) return null;
  const kernel = nb.sessionContext.session.kernel;
  const cells = nb.content.widgets.filter(c => c.model.type === 'code');
  return {status: kernel ? kernel.status : 'none', counts: cells.map(c => c.model.executionCount),
          errors: cells.flatMap(c => c.model.outputs.toJSON().filter(o => o.output_type === 'error')
                                                   .map(o => o.ename + ': ' + o.evalue))};
}"""
_FIGURES = """() => Array.from(document.querySelectorAll('.jp-OutputArea .widget-output .js-plotly-plot'))
  .map(gd => JSON.stringify({title: gd.layout && gd.layout.title && gd.layout.title.text,
                             data: (gd.data || []).map(t => [t.type, t.x, t.y, t.z])}))"""


def _wait(page, predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        page.wait_for_timeout(500)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def test_explorer_runs_and_the_layer_slider_redraws_the_plots(lab, tmp_path):
    from playwright.sync_api import sync_playwright

    base, name, log = lab
    artifacts = Path(os.environ.get("OWL_LAB_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "explorer_browser_failure.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        page = browser.new_page()
        try:
            page.goto(f"{base}/lab/tree/{name}", wait_until="domcontentloaded", timeout=120_000)
            _wait(
                page,
                lambda: (page.evaluate(_NOTEBOOK_STATE) or {}).get("status") == "idle",
                120,
                "the notebook to open with an idle kernel",
            )
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            state = _wait(
                page,
                lambda: (lambda s: s if s and s["status"] == "idle" and all(s["counts"]) else None)(
                    page.evaluate(_NOTEBOOK_STATE)
                ),
                300,
                "all cells to run",
            )
            assert not state["errors"], f"cells raised: {state['errors']}"

            app = page.locator(".jp-OutputArea .widget-vbox").first  # the first displayed explorer
            app.scroll_into_view_if_needed()
            _wait(page, lambda: len(page.evaluate(_FIGURES)) >= 3, 60, "the explorer's plotly figures")
            model_select = app.locator(".widget-dropdown select").first  # the notebook ends on owl3-tiny
            offered = [t.replace("\xa0", " ") for t in model_select.locator("option").all_inner_texts()]
            assert {"owl2-tiny", "owl3-tiny", "checkpoint directory…"} <= set(offered), offered
            assert model_select.evaluate("s => s.options[s.selectedIndex].text") == "owl3-tiny"
            head_select = app.locator(".widget-dropdown select").nth(2)  # model, task, head
            assert head_select.evaluate("s => s.options[s.selectedIndex].text") == "mean"  # filled, not empty
            assert len(head_select.locator("option").all_inner_texts()) > 1
            before = page.evaluate(_FIGURES)
            slider = app.locator(".widget-slider").first
            readout = slider.locator(".widget-readout")
            start = int(readout.inner_text())
            handle = slider.locator(".noUi-handle").first
            handle.focus()
            handle.press("ArrowRight")  # what a person's keyboard does; the slider commits on release
            _wait(page, lambda: int(readout.inner_text()) == start + 1, 30, "the slider to move")
            after = _wait(
                page,
                lambda: (lambda f: f if f != before and len(f) >= 3 else None)(page.evaluate(_FIGURES)),
                120,
                "the figures to redraw after the layer changed",
            )
            changed = sum(a != b for a, b in zip(before, after, strict=False))
            assert changed >= 1, "no figure changed after moving the layer slider"
        except BaseException:
            page.screenshot(path=str(shot), full_page=True)
            print(f"explorer browser test failed: screenshot {shot}; JupyterLab log {log}")
            raise
        finally:
            browser.close()
