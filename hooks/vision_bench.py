"""Cost of observing the vision encoder: ``capture(vision=...)`` vs the encoder's plain forward.

    from hooks.vision_bench import vision_capture_cost
    vision_capture_cost()                  # DataFrame: family, mode, cpu_seconds, ratio (to plain)
    vision_capture_cost(family="owl3")     # the SigLIP-so400m-width tower at 378 px

Owl2: a random ViT of ViT-L/14 width at 448 px (1,024 patches + CLS; width 1024, 16 heads, MLP 4096).
Owl3: a random SigLIP of so400m width at 378 px (729 patches, no CLS; width 1152, 16 heads, MLP 4304);
its observation point recomputes q and k (transformers' SigLIP attention does not hand them out), so it
costs a little more. Both with ``layers`` blocks: every block pays the same observation cost, so the
ratio of a 2-block tower is the ratio of the full one. Time is process CPU time of one encoder forward,
one intra-op thread, best of ``repeats``, modes interleaved (a shared machine's noise hits every mode
alike).
"""

from __future__ import annotations

import time

import pandas as pd
import torch

from hooks.capture import capture
from owl_lab.models.owl2 import Owl2Config, Owl2ForCausalLM
from owl_lab.models.owl3 import Owl3Config, Owl3ForCausalLM


def vit_l_448(layers: int = 2) -> Owl2ForCausalLM:
    """A random Owl2 whose ViT has ViT-L/14 width at 448 px (tiny decoder, unused here)."""
    torch.manual_seed(0)
    config = Owl2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=100,
        visual_config={
            "visual_model": {
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_hidden_layers": layers,
                "num_attention_heads": 16,
                "image_size": 448,
                "patch_size": 14,
            },
            "visual_abstractor": {
                "num_learnable_queries": 8,
                "hidden_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 128,
                "encoder_hidden_size": 1024,
                "grid_size": 32,
            },
        },
    )
    return Owl2ForCausalLM(config).eval()


def siglip_378(layers: int = 2) -> Owl3ForCausalLM:
    """A random Owl3 whose SigLIP tower has so400m width at 378 px (tiny decoder, unused here)."""
    torch.manual_seed(0)
    config = Owl3Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=100,
        hyper_layers=[1],
        hyper_attention="gated",
        projector="linear",
        vision_config={
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": layers,
            "num_attention_heads": 16,
            "image_size": 378,
            "patch_size": 14,
        },
    )
    return Owl3ForCausalLM(config).eval()


def vision_capture_cost(
    layers: int = 2, repeats: int = 3, modes=("plain", "mass", "grid"), threads: int = 1, family: str = "owl2"
) -> pd.DataFrame:
    """CPU seconds of one encoder forward per mode, and the ratio to the plain forward.

    ``family="owl2"``: the ViT at 448 px; ``"owl3"``: ``encode_images`` at 378 px (SigLIP ``layers``
    blocks, the last block of the tower is skipped as the model does, plus the projector). Modes: ``plain``
    (no hooks), ``mass`` (``capture(vision=True)``), ``grid`` (``vision="grid"``), ``full``
    (``vision="full"``, head-mean [T, T] maps kept).
    """
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if family == "owl2":
            model = vit_l_448(layers)
            size = 448

            def encode(pixels):
                return model.model.vision_model(pixels).last_hidden_state
        elif family == "owl3":
            model = siglip_378(layers + 1)  # encode_images skips the tower's last block
            size, encode = 378, model.encode_images
        else:
            raise ValueError(f"family must be 'owl2' or 'owl3'; got {family!r}")
        pixels = torch.randn(1, 3, size, size)

        def run(mode):
            if mode == "plain":
                return encode(pixels)
            with capture(model, attention=False, vision=True if mode == "mass" else mode) as rec:
                out = encode(pixels)
            return out, rec

        best = {m: float("inf") for m in modes}
        with torch.no_grad():
            for m in modes:
                run(m)  # warm-up
            for _ in range(repeats):
                for m in modes:
                    t0 = time.process_time()
                    run(m)
                    best[m] = min(best[m], time.process_time() - t0)
    finally:
        torch.set_num_threads(old_threads)
    return pd.DataFrame(
        {
            "family": family,
            "mode": list(modes),
            "cpu_seconds": [best[m] for m in modes],
            "ratio": [best[m] / best["plain"] for m in modes],
        }
    )


if __name__ == "__main__":
    print(
        pd.concat([vision_capture_cost(family=f) for f in ("owl2", "owl3")]).round(3).to_string(index=False)
    )
