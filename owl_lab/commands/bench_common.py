"""What ``owl-lab bench`` and its causal rows (:mod:`owl_lab.commands.bench_causal`) share: the size options,
the mid-size random Owl2 / Owl3 configs, and the peak-memory measurement of one forward in a child process.

Memory: peak resident-set growth during one forward call, in a fresh child process per (config, mode):
glibc is told to return freed blocks to the OS (so RSS follows the live tensors), the peak is reset
through ``/proc/self/clear_refs`` after a warm-up call and read from ``VmHWM`` after the measured call.
"""

from __future__ import annotations

import ctypes
import gc
import json
import subprocess
import sys
from collections.abc import Callable

import torch
from transformers import LlavaForConditionalGeneration

from owl_lab.models.llava import llava_config, prepare_llava
from owl_lab.models.owl2 import IMAGE_TOKEN_INDEX, Owl2Config, Owl2ForCausalLM
from owl_lab.models.owl3 import Owl3Config, Owl3ForCausalLM

OWL2_LENGTHS = (512, 2048, 4096)
OWL3_IMAGES = (8, 32, 64)


def add_arguments(parser):
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=list(OWL2_LENGTHS),
        help="Owl2 decoder sequence lengths L (default: 512 2048 4096)",
    )
    parser.add_argument(
        "--images",
        type=int,
        nargs="+",
        default=list(OWL3_IMAGES),
        help="Owl3 image counts (default: 8 32 64)",
    )
    parser.add_argument("--owl3-text", type=int, default=1024, help="Owl3 text length (default 1024)")
    parser.add_argument("--hidden", type=int, default=512, help="decoder width (default 512)")
    parser.add_argument("--heads", type=int, default=8, help="attention heads (default 8, head dim 64)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per mode (best is reported)")
    parser.add_argument(
        "--families", nargs="+", default=["owl2", "owl3", "llava"], choices=["owl2", "owl3", "llava"]
    )
    parser.add_argument("--no-eager", action="store_true", help="skip the eager output_attentions baseline")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test of the command itself)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: stable numbers on a shared CPU)",
    )
    parser.add_argument("--csv", default="bench.csv", help="where to write the results (default bench.csv)")


# ---------------------------------------------------------------------------------- models
def _sizes(spec: dict) -> tuple[int, int, int]:
    return (64, 2, 4) if spec["quick"] else (spec["hidden"], spec["layers"], spec["heads"])


def build(spec: dict):
    """(model, batch) for one bench row: spec has family, length/images, text, sizes, quick."""
    torch.manual_seed(0)
    hidden, layers, heads = _sizes(spec)
    common = dict(
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        vocab_size=1000,
        max_position_embeddings=8192,
    )
    return BUILDERS[spec["family"]](spec, common)


def _build_owl2(spec: dict, common: dict):
    """Owl2 scales with the decoder length L: one image, L - rows text tokens."""
    heads = common["num_attention_heads"]
    config = Owl2Config(
        num_key_value_heads=heads,
        visual_config={
            "visual_model": {
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 56,
                "patch_size": 14,
            },
            "visual_abstractor": {
                "num_learnable_queries": 32,
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "intermediate_size": 128,
                "encoder_hidden_size": 64,
            },
        },
        **common,
    )
    model = Owl2ForCausalLM(config).eval()
    rows = config.tokens_per_image
    ids = torch.randint(3, config.vocab_size, (1, spec["length"] - rows + 1))
    ids[0, 0], ids[0, 5] = 1, IMAGE_TOKEN_INDEX  # BOS, one image (its rows) after a short prefix
    size = config.image_size
    return model, dict(input_ids=ids, pixel_values=torch.randn(1, 3, size, size), use_cache=False)


def _build_owl3(spec: dict, common: dict):
    """Owl3 scales with the number of images (visual keys at the hyper layers), text length fixed."""
    heads, layers = common["num_attention_heads"], common["num_hidden_layers"]
    config = Owl3Config(
        num_key_value_heads=max(1, heads // 2),
        hyper_layers=[1, 3] if layers >= 3 else [1],
        hyper_attention="gated",
        projector="linear",
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 56 if spec["quick"] else 112,
            "patch_size": 14,
        },
        **common,
    )
    model = Owl3ForCausalLM(config).eval()
    text, n = spec["text"], spec["images"]
    ids = torch.randint(3, config.vocab_size, (1, text))
    starts = torch.linspace(4, text // 2, n).long().unique()  # images spread over the first half
    if starts.numel() != n:
        raise ValueError(f"{n} images do not fit a text of {text} tokens")
    size = config.vision_config.image_size
    return model, dict(
        input_ids=ids, pixel_values=torch.randn(n, 3, size, size), media_offset=[starts], use_cache=False
    )


#: each family is benched along its own scaling axis (Owl2: sequence length; Owl3: image count)
def _build_llava(spec: dict, common: dict):
    """A stock transformers LLaVA with Owl2's decoder size, scaled by the decoder length L like Owl2: one
    image (64 visual tokens, one per patch) after a short prefix, L - 64 text tokens; attention observed
    through transformers' attention registry (:mod:`owl_lab.models.transformers_attention`)."""
    vision = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 56,
        "patch_size": 7,
    }
    text = {k: v for k, v in common.items() if k != "vocab_size"}
    config = llava_config(
        {**text, "num_key_value_heads": common["num_attention_heads"], "vision_config": vision},
        vocab_size=common["vocab_size"],
        image_token_id=3,
        bos_token_id=1,
    )
    model = prepare_llava(LlavaForConditionalGeneration(config).eval())
    n = config.image_seq_length
    ids = torch.randint(4, config.text_config.vocab_size, (1, spec["length"]))
    ids[0, 0], ids[0, 5 : 5 + n] = 1, config.image_token_id
    return model, dict(input_ids=ids, pixel_values=torch.randn(1, 3, 56, 56), use_cache=False)


#: each family is benched along its own scaling axis (Owl2, LLaVA: sequence length; Owl3: image count)
BUILDERS = {"owl2": _build_owl2, "owl3": _build_owl3, "llava": _build_llava}


# ---------------------------------------------------------------------------------- measuring
def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memory_child(spec: dict, runner: Callable[[torch.nn.Module, dict, str], Callable[[], object]]) -> None:
    """Child-process body: print the peak RSS growth (MB) of one forward of
    ``runner(model, batch, spec['mode'])``."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD fixed: large blocks are mmapped and unmapped on free
    libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD: give the heap top back eagerly
    torch.set_num_threads(spec["threads"])
    model, batch = build(spec)
    fn = runner(model, batch, spec["mode"])
    fn()  # warm-up (lazy buffers, allocator)
    gc.collect()
    base = status_kb("VmRSS")
    reset_peak()
    out = fn()
    peak = (status_kb("VmHWM") - base) / 1024
    del out
    print(json.dumps({"peak_mb": peak}))


def measure_memory(module: str, spec: dict) -> tuple[float, str]:
    """(peak MB, status) of ``module.memory_child(spec_json)`` run in a fresh Python process."""
    code = f"import sys; from {module} import memory_child; memory_child(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["killed"])[-1]
        return float("nan"), f"failed (exit {proc.returncode}): {last[:100]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"], "ok"


def specs_for(args) -> list[dict]:
    """The bench rows' specs (family, L, images, sizes) that ``args`` selects."""
    base = {
        "quick": args.quick,
        "hidden": args.hidden,
        "layers": args.layers,
        "heads": args.heads,
        "threads": args.threads,
    }
    specs = []
    if "owl2" in args.families:
        for length in [64, 128] if args.quick else args.lengths:
            specs.append({**base, "family": "owl2", "L": length, "length": length, "images": 1, "text": 0})
    if "llava" in args.families:
        for length in [96, 128] if args.quick else args.lengths:
            specs.append({**base, "family": "llava", "L": length, "length": length, "images": 1, "text": 0})
    if "owl3" in args.families:
        text = 64 if args.quick else args.owl3_text
        for n in [2] if args.quick else args.images:
            specs.append({**base, "family": "owl3", "L": text, "length": text, "images": n, "text": text})
    return specs
