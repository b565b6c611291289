"""Text-only forward speed of the Owl2 decoder vs stock transformers ``LlamaForCausalLM``.

    python -m owl_lab.models.owl2.benchmark_owl2 [--hidden 512 --layers 8 --length 512 --repeats 10]

Both models get the same LLaMA weights (our ``multiway.0`` branches = LLaMA's K/V/norms), so the
script also checks that the text path computes LLaMA exactly. Runs are interleaved and the median
is reported, which keeps the ratio meaningful on a busy machine. Target: ratio ≥ 0.9.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .configuration_owl2 import Owl2Config
from .modeling_owl2 import Owl2ForCausalLM

SMALL_VISION = {
    "visual_model": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 28,
        "patch_size": 14,
    },
    "visual_abstractor": {
        "hidden_size": 32,
        "encoder_hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "num_learnable_queries": 4,
    },
}


def build_pair(hidden=512, layers=8, heads=8, vocab=32000, seed=0):
    llm = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(seed)
    stock = LlamaForCausalLM(LlamaConfig(**llm, attn_implementation="sdpa")).eval()
    ours = Owl2ForCausalLM(Owl2Config(**llm, visual_config=SMALL_VISION, attn_implementation="sdpa")).eval()
    mapped = {}
    for k, v in stock.state_dict().items():
        for name in ("self_attn.k_proj", "self_attn.v_proj", "input_layernorm", "post_attention_layernorm"):
            if f".{name}." in k:
                for branch in (0, 1):
                    mapped[k.replace(f".{name}.", f".{name}.multiway.{branch}.")] = v
                break
        else:
            mapped[k] = v
    missing, unexpected = ours.load_state_dict(mapped, strict=False)
    assert not unexpected and all(
        k.startswith(("model.vision_model", "model.visual_abstractor")) for k in missing
    )
    return stock, ours


def _time(model, ids) -> float:
    t = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    return time.perf_counter() - t


def run(hidden=512, layers=8, length=512, repeats=10, vocab=32000) -> dict:
    """Returns {'stock_s', 'ours_s', 'ratio' (stock/ours, >1 = we are faster), 'max_abs_diff'}."""
    stock, ours = build_pair(hidden, layers, vocab=vocab)
    ids = torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (stock(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max().item()
    for _ in range(2):  # warm-up
        _time(stock, ids), _time(ours, ids)
    t_stock, t_ours = [], []
    for _ in range(repeats):
        t_stock.append(_time(stock, ids))
        t_ours.append(_time(ours, ids))
    s, o = statistics.median(t_stock), statistics.median(t_ours)
    return {"stock_s": s, "ours_s": o, "ratio": s / o, "max_abs_diff": diff}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args(argv)
    r = run(a.hidden, a.layers, a.length, a.repeats)
    print(f"hidden {a.hidden}, {a.layers} layers, L={a.length}, threads {torch.get_num_threads()}")
    print(
        f"stock LlamaForCausalLM: {r['stock_s'] * 1e3:.1f} ms   Owl2 decoder: {r['ours_s'] * 1e3:.1f} ms   "
        f"speed ratio (stock/ours): {r['ratio']:.3f}   max |Δ logits| {r['max_abs_diff']:.2e}"
    )
    return r


if __name__ == "__main__":
    main()
