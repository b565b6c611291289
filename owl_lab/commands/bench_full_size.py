"""``owl-lab bench --full-size owl2|owl3``: the real-size code path end to end on a CPU, no download.

Builds mPLUG-Owl2-LLaMA2-7B or mPLUG-Owl3-7B-240728 at its released config with random bf16 weights
and runs one forward of a one-image prompt, plain and under ``hooks.capture()``; reports wall time,
peak RSS against the weights' size, capture's overhead and the table sizes. Not part of CI.

The model is built on the meta device. ``--resident`` materialises every weight once (peak RSS ≈
the weights, ~16 GB: needs that much free memory). The default, *streaming*, materialises each
block of a ``ModuleList`` (decoder layers, ViT layers, abstractor layers) just before it runs and
drops it after (its matrices are views into one seeded random pool, so this costs almost nothing and
every pass sees the same values); the peak is the embeddings, one block and the activations (a few
GB) while every shape, kernel and hook is the real one. Materialising is timed apart and subtracted.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from hooks.capture import capture
from owl_lab.families import get_family
from owl_lab.models.owl2 import Owl2Config
from owl_lab.models.owl3 import Owl3Config
from owl_lab.models.owl3.loading_owl3 import _rebuild_buffers

OWL3_7B_240728 = dict(  # data/reference/owl3/SPEC.md §2 (config of 7B-240728)
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=151851,
    rope_theta=1e6,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    hyper_layers=[1, 9, 17, 25],
    hyper_attention="gated",
    projector="linear",
    vision_config=dict(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        image_size=384,
        patch_size=14,
    ),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("family", choices=["owl2", "owl3"])
    parser.add_argument(
        "--text", type=int, default=64, help="prompt text tokens around the image (default 64)"
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="keep only this many decoder layers (a scaled-down smoke test; default: all)",
    )
    parser.add_argument(
        "--resident",
        action="store_true",
        help="materialise all weights at once (~16 GB) instead of streaming block by block",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())


def full_size_config(family: str, layers: int | None = None):
    """The released config (optionally cut to ``layers`` decoder layers)."""
    if family == "owl2":
        config = Owl2Config()  # defaults = mPLUG-Owl2-LLaMA2-7B (data/reference/owl2/SPEC.md §1)
    else:
        config = Owl3Config(**OWL3_7B_240728)
    if layers is not None:
        config.num_hidden_layers = layers
        if family == "owl3":
            config.hyper_layers = [h for h in config.hyper_layers if h <= layers] or [1]
    return config


_POOL: dict = {}


def _random_pool(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """One seeded N(0, 0.02²) buffer that streamed blocks take views of (no per-pass generation)."""
    pool = _POOL.get(dtype)
    if pool is None or pool.numel() < numel:
        g = torch.Generator().manual_seed(0)
        pool = _POOL[dtype] = (torch.randn(max(numel, 1 << 20), generator=g) * 0.02).to(dtype)
    return pool


def _fill(module: nn.Module, seed: int, dtype: torch.dtype, pool_size: int | None = None) -> None:
    """Give every meta parameter of ``module`` (recursively) random values (norm scales: ones).

    With ``pool_size``, matrices are views into one shared random pool at a seed-dependent offset
    (nothing is generated or copied: a block costs no time to materialise); else fresh randn."""
    g = torch.Generator().manual_seed(seed)
    for name, param in list(module.named_parameters()):
        if param.device.type != "meta":
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        n = param.numel()
        if attr == "weight" and param.dim() == 1:
            value = torch.ones(param.shape, dtype=dtype)  # norm scales
        elif param.dim() == 1:
            value = torch.zeros(param.shape, dtype=dtype)
        elif pool_size is not None and n <= pool_size:
            pool = _random_pool(pool_size, dtype)
            offset = (seed * 7919 + hash(name)) % (pool.numel() - n + 1)
            value = pool[offset : offset + n].view(param.shape)
        else:
            value = (torch.randn(param.shape, generator=g, dtype=torch.float32) * 0.02).to(dtype)
        setattr(owner, attr, nn.Parameter(value, requires_grad=False))


def _drop(module: nn.Module) -> None:
    for name, param in list(module.named_parameters()):
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        setattr(
            owner,
            attr,
            nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"), requires_grad=False),
        )


class Materialiser:
    """Forward pre/post hooks that materialise each streamed block before it runs and drop it after."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, resident: bool):
        self.dtype, self.fill_seconds, self.handles = dtype, 0.0, []
        blocks = [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst]
        blocks = [b for b in blocks if not any(b is not o and _contains(o, b) for o in blocks)]  # outermost
        self.pool_size = max((p.numel() for b in blocks for p in b.parameters()), default=0)
        self.blocks = {id(b): i for i, b in enumerate(blocks)}
        inside = {id(p) for b in blocks for p in b.parameters()}
        rest = [(n, p) for n, p in model.named_parameters() if id(p) not in inside]
        for name, _ in rest:  # embeddings, lm_head, final norms, projector: resident
            owner_name, _, attr = name.rpartition(".")
            holder = nn.Module()
            setattr(holder, attr, getattr(model.get_submodule(owner_name), attr))
            _fill(holder, hash(name) % (2**31), dtype)
            setattr(model.get_submodule(owner_name), attr, getattr(holder, attr))
        for b in blocks:
            if resident:
                self._timed_fill(b)
            else:
                self.handles.append(b.register_forward_pre_hook(lambda m, a: self._timed_fill(m)))
                self.handles.append(b.register_forward_hook(lambda m, a, o: _drop(m)))

    def _timed_fill(self, block: nn.Module) -> None:
        t = time.perf_counter()
        _fill(block, 1000 + self.blocks[id(block)], self.dtype, self.pool_size)
        self.fill_seconds += time.perf_counter() - t


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def build(family: str, layers: int | None = None, resident: bool = False, text: int = 64):
    """(model, batch, materialiser, weight bytes) at the real config, bf16 on CPU."""
    config = full_size_config(family, layers)
    with torch.device("meta"):
        model = get_family(family).model_class(config)
    weight_bytes = sum(p.numel() for p in model.parameters()) * 2
    mat = Materialiser(model, torch.bfloat16, resident)
    if family == "owl2":
        model.rebuild_buffers(torch.device("cpu"))
    else:
        _rebuild_buffers(model)
    model.eval()
    torch.manual_seed(0)
    ids = torch.randint(3, 30000, (1, text))
    size = config.image_size if family == "owl2" else config.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, dtype=torch.bfloat16)
    if family == "owl2":
        ids[0, 0], ids[0, 5] = 1, -200  # BOS, the image marker (its rows replace it)
        batch = dict(input_ids=ids, pixel_values=pixels, use_cache=False)
    else:
        batch = dict(input_ids=ids, pixel_values=pixels, media_offset=[torch.tensor([4])], use_cache=False)
    return model, batch, mat, weight_bytes


def _peak_rss_gb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20


def run(args) -> int:

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, batch, mat, weight_bytes = build(args.family, args.layers, args.resident, args.text)
    print(
        f"owl-lab bench --full-size {args.family}: {weight_bytes / 1e9:.1f} GB of bf16 weights "
        f"({'resident' if args.resident else 'streamed block by block'}), built in "
        f"{time.perf_counter() - t0:.1f} s; {args.threads} thread(s)",
        flush=True,
    )
    results = {}
    for mode in ("plain", "capture", "capture_mean_last"):
        mat.fill_seconds = 0.0
        t = time.perf_counter()
        with torch.no_grad():
            if mode == "plain":
                logits, rows = model(**batch).logits, 0
            else:
                kw = {} if mode == "capture" else {"heads": "mean", "queries": "last"}
                with capture(model, **kw) as rec:
                    logits = model(**batch).logits
                rows = len(rec.attention_mass)
        wall = time.perf_counter() - t - mat.fill_seconds
        results[mode] = (wall, rows, logits.float())
        print(
            f"  {mode:18s} forward {wall:7.1f} s (+{mat.fill_seconds:.1f} s making weights)  "
            f"mass rows {rows:>9,d}  peak RSS {_peak_rss_gb():.1f} GB",
            flush=True,
        )
    same = torch.equal(results["plain"][2], results["capture"][2])
    print(
        f"capture overhead {results['capture'][0] / results['plain'][0]:.2f}x (mean/last: "
        f"{results['capture_mean_last'][0] / results['plain'][0]:.2f}x); logits equal: {same}; "
        f"peak RSS {_peak_rss_gb():.1f} GB vs weights {weight_bytes / 2**30:.1f} GiB"
    )
    return 0 if same else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="owl-lab bench --full-size", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
