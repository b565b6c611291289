"""``owl-lab bench``: time and peak memory of ``hooks.capture`` vs a plain SDPA forward and vs eager
``output_attentions=True``, on mid-size random Owl2 / Owl3 configs. Prints a table, writes a CSV.

How it measures (so the numbers mean something on a shared CPU):

* **time** — process CPU time of one forward call (one intra-op thread by default, so CPU time is
  compute time and does not count the moments another process has the core). The modes are
  interleaved round by round after a warm-up round (plain and capture swap places every round, eager
  runs last), so a change of machine load hits every mode alike. Two ratios to plain: ``time_ratio``
  = best of ``--repeats`` over best of plain, and the **paired ratio**: each round's time over the
  same round's plain time, reported as the median with its min and max over the rounds (a drift of
  load between rounds cancels in each pair). The CSV also has the wall time.
* **memory** — peak resident-set growth during one forward call, measured in a fresh child process
  per (config, mode): glibc is told to return freed blocks to the OS (so RSS follows the live
  tensors), the peak is reset through ``/proc/self/clear_refs`` after a warm-up call and read from
  ``VmHWM`` after the measured call. (Those malloc settings make every large allocation fault in
  fresh pages, which would inflate CPU time, hence the separate processes.)

All modes run the same inputs with ``use_cache=False`` and keep their outputs (logits, the recording,
or the eager probabilities) until measured. Capture records attention mass (and gates/abstractor
maps when the model has them); building the pandas table afterwards is not part of the forward.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import time
from pathlib import Path

import torch

from hooks.capture import capture
from owl_lab.commands import bench_causal, bench_full_size
from owl_lab.commands.bench_common import (  # noqa: F401  (build, BUILDERS: re-exported for tests/users)
    BUILDERS,
    OWL2_LENGTHS,
    OWL3_IMAGES,
    _sizes,
    build,
    reset_peak,
    specs_for,
)
from owl_lab.commands.bench_common import add_arguments as size_arguments
from owl_lab.commands.bench_common import measure_memory as _measure_memory
from owl_lab.commands.bench_common import memory_child as _memory_child

MODES = ("plain", "capture", "eager")


def add_arguments(parser):
    size_arguments(parser)
    bench_causal.add_arguments(parser)
    parser.add_argument(
        "--full-size",
        choices=["owl2", "owl3"],
        default=None,
        help="instead of the table: one captured forward of the real 7B config with random bf16 weights, "
        "streamed block by block (owl_lab/commands/bench_full_size.py; needs a few GB of RAM and minutes)",
    )


def runner(model, batch: dict, mode: str):
    """A zero-argument function running one forward in ``mode`` and returning what it produced."""

    def plain():
        with torch.no_grad():
            return model(**batch).logits

    def captured():
        with torch.no_grad(), capture(model) as rec:
            logits = model(**batch).logits
        return logits, rec

    def eager():
        stock = getattr(model, "owl_sequence", None) is not None  # a stock model: switch to the eager twin
        if stock:
            model.set_attn_implementation({"text_config": "owl_lab_eager"})
        try:
            with torch.no_grad():
                out = model(**batch, output_attentions=True)
        finally:
            if stock:
                model.set_attn_implementation({"text_config": "owl_lab_sdpa"})
        return out.logits, out.attentions

    return {"plain": plain, "capture": captured, "eager": eager}[mode]


def memory_child(spec_json: str) -> None:
    """Child-process entry: print the peak RSS growth (MB) of one forward in ``spec['mode']``."""
    _memory_child(json.loads(spec_json), runner)


def measure_memory(spec: dict) -> tuple[float, str]:
    return _measure_memory("owl_lab.commands.bench", spec)


def round_order(modes: list[str], round_: int) -> list[str]:
    """The modes in the order of one round: plain and capture swap places every other round (so neither
    always runs right after eager or first in a round); the other modes keep their place after them."""
    pair = [m for m in ("plain", "capture") if m in modes]
    rest = [m for m in modes if m not in pair]
    return (pair[::-1] if round_ % 2 else pair) + rest


def paired_ratios(times: list[float], base: list[float]) -> dict:
    """Median, min and max over rounds of ``times[i] / base[i]`` (one mode vs plain, same round).

    NaN when no round has both times (a failed mode)."""
    ratios = sorted(t / b for t, b in zip(times, base, strict=False) if b > 0 and math.isfinite(t))
    if not ratios:
        return {"ratio_median": math.nan, "ratio_min": math.nan, "ratio_max": math.nan}
    n = len(ratios)
    median = ratios[n // 2] if n % 2 else (ratios[n // 2 - 1] + ratios[n // 2]) / 2
    return {"ratio_median": median, "ratio_min": ratios[0], "ratio_max": ratios[-1]}


def bench_row(spec: dict, repeats: int, modes: list[str]) -> list[dict]:
    model, batch = build(spec)
    fns = {m: runner(model, batch, m) for m in modes}
    best = {m: {"seconds": math.inf, "wall_seconds": math.inf, "status": "ok"} for m in modes}
    rounds: dict[str, list[float]] = {m: [] for m in modes}  # CPU seconds of every timed round
    for round_ in range(repeats + 1):  # round 0 = warm-up; modes interleaved so load drift hits all
        for mode in round_order(modes, round_):
            if best[mode]["status"] != "ok":
                continue
            gc.collect()
            cpu, wall = time.process_time(), time.perf_counter()
            try:
                out = fns[mode]()
            except (RuntimeError, MemoryError) as exc:  # eager may not fit: that is a result too
                best[mode].update(
                    seconds=math.nan,
                    wall_seconds=math.nan,
                    status=f"failed: {type(exc).__name__}: {str(exc)[:80]}",
                )
                continue
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            del out
            if round_:
                rounds[mode].append(cpu)
                best[mode]["seconds"] = min(best[mode]["seconds"], cpu)
                best[mode]["wall_seconds"] = min(best[mode]["wall_seconds"], wall)
    del model, batch, fns
    gc.collect()
    rows = []
    for mode in modes:
        peak, status = measure_memory({**spec, "mode": mode})
        if best[mode]["status"] != "ok":
            status = best[mode]["status"]
        label = {k: spec[k] for k in ("family", "L", "images")}
        rows.append(
            {
                **label,
                "mode": mode,
                "seconds": best[mode]["seconds"],
                "wall_seconds": best[mode]["wall_seconds"],
                "peak_mb": peak,
                "status": status,
                **paired_ratios(rounds[mode] if status == "ok" else [], rounds[modes[0]]),
            }
        )
    base = rows[0]
    for r in rows:
        r["time_ratio"] = r["seconds"] / base["seconds"]
        r["mem_ratio"] = r["peak_mb"] / base["peak_mb"] if base["peak_mb"] > 0 else math.nan
    return rows


# ---------------------------------------------------------------------------------- command
def _print(rows: list[dict]) -> None:
    for r in rows:
        paired = f"{r['ratio_median']:.2f} [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}]"
        print(
            f"{r['family']:6s} {r['L']:5d} {r['images']:6d} {r['mode']:8s} {r['seconds']:8.3f} "
            f"{r['peak_mb']:9.1f} {r['time_ratio']:7.2f} {paired:>17s} {r['mem_ratio']:7.2f}  {r['status']}",
            flush=True,
        )


def run(args) -> int:
    if args.full_size:
        return bench_full_size.run(
            argparse.Namespace(
                family=args.full_size, text=64, layers=None, resident=False, threads=args.threads
            )
        )
    try:
        reset_peak()
    except OSError:
        print("owl-lab bench needs Linux (/proc/self/clear_refs) to measure peak memory")
        return 1
    torch.set_num_threads(args.threads)
    hidden, layers, heads = _sizes(
        {"quick": args.quick, "hidden": args.hidden, "layers": args.layers, "heads": args.heads}
    )
    print(
        f"owl-lab bench: torch {torch.__version__}, {args.threads} thread(s); decoder hidden {hidden}, "
        f"{heads} heads, {layers} layers. time = CPU seconds (best of "
        f"{1 if args.quick else args.repeats}), memory = peak RSS "
        "growth of one forward (child process); ratios vs the plain SDPA forward of the same row: "
        "time x = best / best, paired x = median [min-max] over rounds of this round's time / plain's"
    )
    print(
        f"{'family':6s} {'L':>5s} {'images':>6s} {'mode':8s} {'time s':>8s} {'peak MB':>9s} "
        f"{'time x':>7s} {'paired x':>17s} {'mem x':>7s}  status"
    )
    modes = [m for m in MODES if not (m == "eager" and args.no_eager)]
    rows: list[dict] = []
    for spec in specs_for(args):
        new = bench_row(spec, 1 if args.quick else args.repeats, modes)
        _print(new)
        rows += new
    if args.causal:
        print("causal rows (hooks.knockout vs plain; full activation-patching sweep):")
        rows += [{"wall_seconds": math.nan, "status": "ok", **r} for r in bench_causal.run_rows(args)]
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")
    return 0
