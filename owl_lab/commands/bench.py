"""``owl-lab bench``: time and peak memory of ``hooks.capture`` vs a plain SDPA forward and vs eager
``output_attentions=True``, on mid-size random Owl2 / Owl3 configs. Prints a table, writes a CSV.

Memory is the peak resident-set growth of this process during one forward call (Linux: the peak is
reset through ``/proc/self/clear_refs`` before each call and read from ``VmHWM``; glibc is told to
return freed blocks to the OS so RSS follows the tensors). Time is the process CPU time of one call
(one intra-op thread by default, so CPU time = compute time, immune to being descheduled on a shared
machine), best of ``--repeats``; the modes are interleaved round by round. The CSV also has the wall
time. All three modes run the same inputs with ``use_cache=False`` and keep their outputs (logits,
and for eager the probabilities) until measured.
"""
from __future__ import annotations

import csv
import ctypes
import gc
import time
from pathlib import Path

import torch

OWL2_LENGTHS = (512, 2048, 4096)
OWL3_IMAGES = (8, 32, 64)


def add_arguments(parser):
    parser.add_argument("--lengths", type=int, nargs="+", default=list(OWL2_LENGTHS),
                        help="Owl2 decoder sequence lengths L (default: 512 2048 4096)")
    parser.add_argument("--images", type=int, nargs="+", default=list(OWL3_IMAGES),
                        help="Owl3 image counts (default: 8 32 64)")
    parser.add_argument("--owl3-text", type=int, default=1024, help="Owl3 text length (default 1024)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per mode (best is reported)")
    parser.add_argument("--families", nargs="+", default=["owl2", "owl3"], choices=["owl2", "owl3"])
    parser.add_argument("--no-eager", action="store_true", help="skip the eager output_attentions baseline")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test of the command itself)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: stable numbers on a shared CPU)")
    parser.add_argument("--csv", default="bench.csv", help="where to write the results (default bench.csv)")


# ---------------------------------------------------------------------------------- memory probes
def _malloc_returns_memory() -> None:
    """Make glibc give freed blocks back to the OS, so RSS tracks live tensors (no-op elsewhere)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: big blocks via mmap (fixed; no dynamic raise)
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD: trim the heap top eagerly
    except (OSError, AttributeError):
        pass


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure_once(fn) -> tuple[float, float, float]:
    """(CPU seconds, wall seconds, peak RSS growth in MB) of one call of ``fn``."""
    gc.collect()
    base = _status_kb("VmRSS")
    _reset_peak()
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    peak = (_status_kb("VmHWM") - base) / 1024
    del out
    return cpu, wall, peak


# ---------------------------------------------------------------------------------- models
def owl2_model(quick: bool):
    from owl_lab.models.owl2 import Owl2Config, Owl2ForCausalLM

    hidden, layers, heads = (64, 2, 4) if quick else (512, 4, 8)
    config = Owl2Config(
        hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, vocab_size=1000, max_position_embeddings=8192,
        visual_config={
            "visual_model": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                             "num_attention_heads": 2, "image_size": 56, "patch_size": 14},
            "visual_abstractor": {"num_learnable_queries": 32, "hidden_size": 64, "num_hidden_layers": 2,
                                  "num_attention_heads": 2, "intermediate_size": 128, "encoder_hidden_size": 64},
        },
    )
    torch.manual_seed(0)
    return Owl2ForCausalLM(config).eval()


def owl2_inputs(model, length: int) -> dict:
    rows = model.config.tokens_per_image
    ids = torch.randint(3, model.config.vocab_size, (1, length - rows + 1))
    ids[0, 0], ids[0, 5] = 1, -200  # BOS, one image after a short prefix
    size = model.config.image_size
    return dict(input_ids=ids, pixel_values=torch.randn(1, 3, size, size), use_cache=False)


def owl3_model(quick: bool):
    from owl_lab.models.owl3 import Owl3Config, Owl3ForCausalLM

    hidden, layers, heads, kv = (64, 2, 4, 2) if quick else (512, 4, 8, 4)
    config = Owl3Config(
        hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, vocab_size=1000, max_position_embeddings=8192,
        hyper_layers=[1, 3] if layers >= 3 else [1], hyper_attention="gated", projector="linear",
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 56 if quick else 112, "patch_size": 14},
    )
    torch.manual_seed(0)
    return Owl3ForCausalLM(config).eval()


def owl3_inputs(model, n_images: int, text: int) -> dict:
    ids = torch.randint(3, model.config.vocab_size, (1, text))
    starts = torch.linspace(4, text // 2, n_images).long().unique()  # images spread over the first half
    if starts.numel() != n_images:
        raise ValueError(f"{n_images} images do not fit a text of {text} tokens")
    size = model.config.vision_config.image_size
    return dict(input_ids=ids, pixel_values=torch.randn(n_images, 3, size, size), media_offset=[starts],
                use_cache=False)


# ---------------------------------------------------------------------------------- bench
def bench_one(model, batch: dict, repeats: int, eager: bool, label: dict) -> list[dict]:
    from hooks.capture import capture  # (not `from hooks import`: robust to a stale editable install)

    def plain():
        with torch.no_grad():
            return model(**batch).logits

    def captured():
        with torch.no_grad(), capture(model) as rec:
            logits = model(**batch).logits
        return logits, rec

    def eager_attn():
        with torch.no_grad():
            out = model(**batch, output_attentions=True)
        return out.logits, out.attentions

    modes = [("plain", plain), ("capture", captured)] + ([("eager", eager_attn)] if eager else [])
    best = {m: {"seconds": float("inf"), "wall_seconds": float("inf"), "peak_mb": 0.0, "status": "ok"} for m, _ in modes}
    # Interleave the modes (warm-up round first) so that load changes on a shared CPU hit all alike.
    for round_ in range(repeats + 1):
        for mode, fn in modes:
            if best[mode]["status"] != "ok":
                continue
            try:
                cpu, wall, mb = measure_once(fn)
            except (RuntimeError, MemoryError) as exc:  # eager may not fit: that is a result too
                best[mode].update(seconds=float("nan"), wall_seconds=float("nan"), peak_mb=float("nan"),
                                  status=f"failed: {type(exc).__name__}: {str(exc)[:80]}")
                continue
            if round_:
                b = best[mode]
                b.update(seconds=min(b["seconds"], cpu), wall_seconds=min(b["wall_seconds"], wall),
                         peak_mb=max(b["peak_mb"], mb))
            gc.collect()
    rows = [{**label, "mode": mode, **best[mode]} for mode, _ in modes]
    base = rows[0]
    for r in rows:
        r["time_ratio"] = r["seconds"] / base["seconds"]
        r["mem_ratio"] = r["peak_mb"] / base["peak_mb"] if base["peak_mb"] > 0 else float("nan")
    return rows


def _header() -> None:
    print(f"{'family':6s} {'L':>5s} {'images':>6s} {'mode':8s} {'time s':>8s} {'peak MB':>9s} "
          f"{'time x':>7s} {'mem x':>7s}  status")


def _print(rows: list[dict]) -> None:
    for r in rows:
        print(f"{r['family']:6s} {r['L']:5d} {r['images']:6d} {r['mode']:8s} {r['seconds']:8.3f} "
              f"{r['peak_mb']:9.1f} {r['time_ratio']:7.2f} {r['mem_ratio']:7.2f}  {r['status']}", flush=True)


def run(args) -> int:
    _malloc_returns_memory()
    try:
        _reset_peak()
    except OSError:
        print("owl-lab bench needs Linux /proc/self/clear_refs to measure peak memory")
        return 1
    torch.set_num_threads(args.threads)
    print(f"owl-lab bench: torch {torch.__version__}, {args.threads} thread(s); ratios are vs the plain SDPA "
          "forward of the same row (time: CPU seconds, best of repeats; memory: peak RSS growth during the call)")
    _header()
    rows: list[dict] = []
    lengths = [64, 128] if args.quick else args.lengths
    images = [2] if args.quick else args.images
    text = 64 if args.quick else args.owl3_text
    repeats = 1 if args.quick else args.repeats
    if "owl2" in args.families:
        model = owl2_model(args.quick)
        for length in lengths:
            new = bench_one(model, owl2_inputs(model, length), repeats, not args.no_eager,
                            {"family": "owl2", "L": length, "images": 1})
            _print(new)
            rows += new
        del model
    if "owl3" in args.families:
        model = owl3_model(args.quick)
        for n in images:
            new = bench_one(model, owl3_inputs(model, n, text), repeats, not args.no_eager,
                            {"family": "owl3", "L": text, "images": n})
            _print(new)
            rows += new
        del model
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")
    return 0
