"""``owl-lab bench`` rows for the causal toolkit: attention knockout vs a plain SDPA forward, and the time of
a full activation-patching sweep.

* **knockout** — the mid-size random configs of :mod:`owl_lab.commands.bench` (same ``build``), one forward
  with ``hooks.knockout(model, queries="last", keys="visual")`` at every layer vs the plain forward: CPU time
  (best of ``repeats``, modes interleaved) and peak RSS growth of one forward in a fresh child process.
* **patching** — wall time of :func:`owl_lab.analysis.patching.patching_sweep` (every layer × resid/attn/mlp ×
  image/question/last) over one clean/corrupt pair on the shipped ``owl2-tiny``.

Run alone: ``python -m owl_lab.commands.bench_causal`` (takes ``owl-lab bench``'s size options). To add the rows
to ``owl-lab bench``: ``add_arguments(parser)`` adds ``--causal``; ``run_rows(args)`` prints and returns them.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import subprocess
import sys
import time

import torch

import hooks
from owl_lab import load_owl
from owl_lab.analysis.patching import patching_sweep
from owl_lab.commands.bench import _reset_peak, _status_kb, build
from owl_lab.commands.bench import add_arguments as bench_arguments
from owl_lab.synth.counterfactual import collate_pairs, counterfactual_pairs

MODES = ("plain", "knockout")


def runner(model, batch: dict, mode: str):
    """Zero-argument function running one forward in ``mode`` (``plain`` or ``knockout``)."""

    def plain():
        with torch.no_grad():
            return model(**batch).logits

    def knocked():
        with torch.no_grad(), hooks.knockout(model, queries="last", keys="visual"):
            return model(**batch).logits

    return {"plain": plain, "knockout": knocked}[mode]


def memory_child(spec_json: str) -> None:
    """Child-process entry: print the peak RSS growth (MB) of one forward in ``spec['mode']``."""
    spec = json.loads(spec_json)
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # as in bench.memory_child: RSS follows the live tensors
    libc.mallopt(-1, 128 * 1024)
    torch.set_num_threads(spec["threads"])
    model, batch = build(spec)
    fn = runner(model, batch, spec["mode"])
    fn()
    gc.collect()
    base = _status_kb("VmRSS")
    _reset_peak()
    out = fn()
    peak = (_status_kb("VmHWM") - base) / 1024
    del out
    print(json.dumps({"peak_mb": peak}))


def _memory(spec: dict) -> float:
    code = "import sys; from owl_lab.commands.bench_causal import memory_child; memory_child(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        return math.nan
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"]


def knockout_rows(spec: dict, repeats: int) -> list[dict]:
    """Two rows (plain, knockout) for one config, with time and memory ratios vs plain."""
    model, batch = build(spec)
    fns = {m: runner(model, batch, m) for m in MODES}
    best = dict.fromkeys(MODES, math.inf)
    for round_ in range(repeats + 1):  # round 0 warms up
        for mode in MODES:
            gc.collect()
            start = time.process_time()
            out = fns[mode]()
            elapsed = time.process_time() - start
            del out
            if round_:
                best[mode] = min(best[mode], elapsed)
    del model, batch, fns
    rows = [
        {
            "family": spec["family"],
            "L": spec["L"],
            "images": spec["images"],
            "mode": m,
            "seconds": best[m],
            "peak_mb": _memory({**spec, "mode": m}),
        }
        for m in MODES
    ]
    for r in rows:
        r["time_ratio"] = r["seconds"] / rows[0]["seconds"]
        r["mem_ratio"] = r["peak_mb"] / rows[0]["peak_mb"] if rows[0]["peak_mb"] > 0 else math.nan
    return rows


def patching_seconds(name: str = "owl2-tiny") -> float:
    """Wall seconds of a full patching sweep over one clean/corrupt pair of a shipped checkpoint."""
    model, processor = load_owl(name)
    batches = collate_pairs(processor, counterfactual_pairs("color", 1, seed=0))
    patching_sweep(model, *batches, progress=False)  # warm-up
    start = time.perf_counter()
    patching_sweep(model, *batches, progress=False)
    return time.perf_counter() - start


def add_arguments(parser) -> None:
    parser.add_argument(
        "--causal",
        action="store_true",
        help="also bench attention knockout vs plain and a full patching sweep (owl2-tiny)",
    )


def run_rows(args) -> list[dict]:
    """Print and return the causal rows for the sizes ``args`` selects (bench's own arguments)."""
    base = {
        "quick": args.quick,
        "hidden": args.hidden,
        "layers": args.layers,
        "heads": args.heads,
        "threads": args.threads,
    }
    specs = [
        {**base, "family": "owl2", "L": n, "length": n, "images": 1, "text": 0}
        for n in ([64, 128] if args.quick else args.lengths)
        if "owl2" in args.families
    ]
    if "owl3" in args.families:
        text = 64 if args.quick else args.owl3_text
        specs += [
            {**base, "family": "owl3", "L": text, "length": text, "images": n, "text": text}
            for n in ([2] if args.quick else args.images)
        ]
    rows = []
    print(
        f"{'family':6s} {'L':>5s} {'images':>6s} {'mode':8s} {'time s':>8s} {'peak MB':>9s} {'time x':>7s} {'mem x':>7s}"
    )
    for spec in specs:
        for r in knockout_rows(spec, 1 if args.quick else args.repeats):
            print(
                f"{r['family']:6s} {r['L']:5d} {r['images']:6d} {r['mode']:8s} {r['seconds']:8.3f} "
                f"{r['peak_mb']:9.1f} {r['time_ratio']:7.2f} {r['mem_ratio']:7.2f}",
                flush=True,
            )
            rows.append(r)
    seconds = patching_seconds()
    print(f"patching sweep (owl2-tiny, one pair, 6 layers x 3 sites x 3 groups): {seconds:.2f} s", flush=True)
    rows.append(
        {
            "family": "owl2",
            "L": 0,
            "images": 1,
            "mode": "patching_sweep",
            "seconds": seconds,
            "peak_mb": math.nan,
            "time_ratio": math.nan,
            "mem_ratio": math.nan,
        }
    )
    return rows


__all__ = ["add_arguments", "knockout_rows", "patching_seconds", "run_rows"]


def main(argv: list[str] | None = None) -> int:
    """``python -m owl_lab.commands.bench_causal [bench's size options]``: the causal rows alone."""
    parser = argparse.ArgumentParser(prog="owl-lab bench (causal rows)")
    bench_arguments(parser)  # the same sizes as owl-lab bench
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    _reset_peak()
    run_rows(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
