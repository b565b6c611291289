"""Wall time and peak memory of one Owl3 forward with many images on a mid-size random config.

Run as ``python -m owl_lab.models.owl3.bench_owl3 [--images 32] [--kind gated]``; prints one JSON line.
Peak memory is the process's max RSS (``resource.getrusage``), so run it in a fresh process; the
baseline RSS after building the model and inputs is reported too, so the forward's own share is the
difference.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from owl_lab.models.owl3 import Owl3Config, Owl3ForCausalLM


def mid_config(kind: str) -> Owl3Config:
    """hidden 512, 8 layers (hyper: 0 and 4), 8 heads / 2 kv; SigLIP hidden 256, 4 layers, 224 px
    (256 tokens)."""
    return Owl3Config(
        vocab_size=1000,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        hyper_layers=[1, 5],
        rope_theta=1e6,
        max_window_layers=8,
        hyper_attention=kind,
        projector="mlp" if kind == "fused" else "linear",
        vision_config=dict(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=224,
            patch_size=14,
        ),
    )


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run(images: int = 32, kind: str = "gated", text_per_image: int = 4, attn: str = "sdpa") -> dict:
    torch.manual_seed(0)
    config = mid_config(kind)
    config._attn_implementation = attn
    model = Owl3ForCausalLM(config).eval()
    length = 16 + images * text_per_image
    ids = torch.randint(1, config.vocab_size, (1, length))
    starts = torch.arange(images) * text_per_image + 8  # one placeholder every few tokens
    pixels = torch.randn(images, 3, 224, 224)
    base = max_rss_mb()
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(input_ids=ids, pixel_values=pixels, media_offset=[starts], use_cache=False)
        seconds = time.perf_counter() - t0
    assert torch.isfinite(out.logits).all()
    return {
        "kind": kind,
        "images": images,
        "seq_len": length,
        "image_keys": images * config.tokens_per_image,
        "attn": attn,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "forward_s": round(seconds, 3),
        "rss_before_MB": round(base, 1),
        "peak_rss_MB": round(max_rss_mb(), 1),
        "threads": torch.get_num_threads(),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--kind", default="gated", choices=("gated", "static_gate", "sum", "fused"))
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(run(args.images, args.kind, attn=args.attn)))


if __name__ == "__main__":
    main()
