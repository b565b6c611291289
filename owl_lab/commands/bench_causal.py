"""``owl-lab bench`` rows for the causal toolkit: attention knockout vs a plain SDPA forward, and the time of
a full activation-patching sweep.

* **knockout** — the mid-size random configs of :mod:`owl_lab.commands.bench_common` (``build``), one forward
  with ``hooks.knockout(model, queries="last", keys="visual")`` at every layer vs the plain forward: CPU time
  (best of ``repeats``, modes interleaved) and peak RSS growth of one forward in a fresh child process.
  ``--knockout-all`` adds ``knockout:all`` rows (every query row edited: the whole mask is built).
* **patching** — wall time of :func:`owl_lab.analysis.patching.patching_sweep` (every layer × resid/attn/mlp ×
  image/question/last) over one clean/corrupt pair on the shipped ``owl2-tiny``.

Part of ``owl-lab bench --causal`` (the CSV gets these rows too), or alone:
``python -m owl_lab.commands.bench_causal`` (takes ``owl-lab bench``'s size options).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time

import torch

import hooks
from owl_lab import load_owl
from owl_lab.analysis.patching import patching_sweep
from owl_lab.commands.bench_common import add_arguments as bench_arguments
from owl_lab.commands.bench_common import build, measure_memory, reset_peak, specs_for
from owl_lab.commands.bench_common import memory_child as memory_child_common
from owl_lab.synth.counterfactual import collate_pairs, counterfactual_pairs

MODES = ("plain", "knockout")


def runner(model, batch: dict, mode: str, queries: str = "last"):
    """Zero-argument function running one forward in ``mode`` (``plain`` or ``knockout``); the knockout
    blocks ``queries`` (``"last"``: one row per sample; ``"all"``: every row) from the visual keys."""

    def plain():
        with torch.no_grad():
            return model(**batch).logits

    def knocked():
        with torch.no_grad(), hooks.knockout(model, queries=queries, keys="visual"):
            return model(**batch).logits

    return {"plain": plain, "knockout": knocked}[mode]


def memory_child(spec_json: str) -> None:
    """Child-process entry: print the peak RSS growth (MB) of one forward in ``spec['mode']``."""
    spec = json.loads(spec_json)
    queries = spec.get("queries", "last")
    memory_child_common(spec, lambda model, batch, mode: runner(model, batch, mode, queries))


def _memory(spec: dict) -> float:
    return measure_memory("owl_lab.commands.bench_causal", spec)[0]


def knockout_rows(spec: dict, repeats: int) -> list[dict]:
    """Two rows (plain, knockout) for one config, with time and memory ratios vs plain."""
    model, batch = build(spec)
    queries = spec.get("queries", "last")
    fns = {m: runner(model, batch, m, queries) for m in MODES}
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
            "mode": m if m == "plain" or queries == "last" else f"{m}:{queries}",
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
    parser.add_argument(
        "--knockout-all",
        action="store_true",
        help="causal rows: also knock out the visual keys of every query row (default: the last only)",
    )


def run_rows(args) -> list[dict]:
    """Print and return the causal rows for the sizes ``args`` selects (bench's own arguments)."""
    specs = specs_for(args)
    if getattr(args, "knockout_all", False):  # also the worst case: every query row edited
        specs += [{**spec, "queries": "all"} for spec in specs]
    rows = []
    print(
        f"{'family':6s} {'L':>5s} {'images':>6s} {'mode':12s} {'time s':>8s} {'peak MB':>9s} "
        f"{'time x':>7s} {'mem x':>7s}"
    )
    for spec in specs:
        for r in knockout_rows(spec, 1 if args.quick else args.repeats):
            print(
                f"{r['family']:6s} {r['L']:5d} {r['images']:6d} {r['mode']:12s} {r['seconds']:8.3f} "
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
    add_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    reset_peak()
    run_rows(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
