"""Is the answer position's image attention *selective*? (issue 18, the "bag of conjunctions" question)

Single-image QA can be solved in two ways. A selective read puts the answer position's image attention
on the asked-about object's patches. A *bag* read attends nearly uniformly, and the MLP reads the
answer from the mean of the patch values, which works when the encoder emits conjunctive codes
("red circle"); with several images the bags of all images mix. Two tools separate them:

    focus = cross_focus(model, processor, examples)            # one row per (example, layer, head)
    with blind_cross_attention(model, "uniform"):              # causal check: no selection at all
        acc = exact_match(model, processor, examples)

:func:`cross_focus` reduces the attention of the **last prompt position** over the image keys to
entropy, max weight and the mass on object patches (any object; the object the question names), with
their chance levels (what a uniform pattern would give). Owl3 gated/static/sum layers (kind ``cross``),
and fused ones (``joint``, image part renormalised) are supported; object masses need a square patch
grid (``tokens_per_image`` = grid²).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch

from owl_lab.synth.shapes import BACKGROUND, Obj, Scene, render
from owl_lab.synth.vocab import COLORS, SHAPES

OBJECT_SHARE_MIN = 0.5  # a patch "holds" an object when at least half of its native pixels are that object's


def asked_object(question: str, scene: Scene) -> Obj | None:
    """The object of ``scene`` that the question names by shape (and colour, when one is named).

    None when the question names no shape (e.g. "How many objects are there?") or more / fewer than
    one object of the scene match (e.g. "Is there a red circle?" when there is none).
    """
    words = set(re.findall(r"[a-z]+", question.lower()))
    shapes, colors = words & set(SHAPES), words & set(COLORS)
    if len(shapes) != 1:
        return None
    match = [o for o in scene.objects if o.shape in shapes and (not colors or o.color in colors)]
    return match[0] if len(match) == 1 else None


def patch_object_share(scene: Scene, grid: int, only: Obj | None = None, size: int = 112) -> torch.Tensor:
    """[grid²] share of each patch square's native pixels covered by an object (raster order).

    ``only`` restricts the count to one object of the scene (rendered alone, so occlusion-free).
    """
    drawn = Scene((only,)) if only is not None else scene
    array = np.asarray(render(drawn, size).convert("RGB"))
    side = size // grid * grid
    mask = ~(array[:side, :side] == np.asarray(BACKGROUND, dtype=np.uint8)).all(-1)
    return torch.tensor(mask.reshape(grid, side // grid, grid, side // grid).mean((1, 3)).reshape(-1))


def _image_layers(model) -> tuple[list[int], str]:
    hyper = list(getattr(model.config, "hyper_layer_indices", []) or [])
    if not hyper:
        raise ValueError(
            "cross_focus / uniform_cross_attention need an Owl3 model (config.hyper_layer_indices)"
        )
    return hyper, ("joint" if getattr(model.config, "hyper_attention", "gated") == "fused" else "cross")


def _attention_modules(model) -> dict[int, torch.nn.Module]:
    found = {}
    for name, module in model.named_modules():
        m = re.search(r"language_model\.model\.layers\.(\d+)\.self_attn$", name)
        if m and hasattr(module, "hook_attn"):
            found[int(m.group(1))] = module
    if not found:
        raise ValueError("no decoder attention modules with hook_attn found; is this an Owl model?")
    return found


def _last_row_probs(event, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-key probabilities of each sample's last real query, renormalised over image keys.

    Returns probs [B, H, K_img] (zeros on keys the query may not see) and which image keys it may see
    [B, K_img] (one layout for the batch: image keys are the same columns in every row).
    """
    rows = event.query_index.tolist()
    b = event.query.shape[0]
    pick = torch.tensor([rows.index(int(t)) for t in last])  # row of each sample's last position
    allowed = event.allowed(0, len(rows))  # [B, (H,) Lq, Lk]
    if allowed.dim() == 3:
        allowed = allowed[torch.arange(b), pick][:, None]  # [B, 1, Lk]
    else:
        allowed = allowed[torch.arange(b), :, pick]  # per-head mask: [B, H, Lk]
    q = event.query[torch.arange(b), :, pick]  # [B, H, D]
    k = event.key.repeat_interleave(q.shape[1] // event.key.shape[1], dim=1)  # [B, H, Lk, D]
    scores = torch.einsum("bhd,bhkd->bhk", q.float(), k.float()) * event.scale
    image = event.key_image >= 0  # [B, Lk]
    keep = allowed & image[:, None]  # [B, 1 | H, Lk]
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)  # rows with no visible image key: all zero
    cols = image[0].nonzero().squeeze(-1)
    return probs[..., cols], keep.any(1)[:, cols]


@torch.no_grad()
def cross_focus(
    model, processor, examples: Sequence, batch_size: int = 8, min_share: float = OBJECT_SHARE_MIN
) -> pd.DataFrame:
    """How concentrated the last prompt position's image attention is, per (example, layer, head).

    Columns: ``example``, ``layer``, ``head``, ``n_keys`` (image keys visible), ``entropy`` (nats, of
    the attention renormalised over image keys), ``norm_entropy`` (entropy / ln n_keys; 1 = uniform),
    ``max_weight``, ``argmax`` (index of the heaviest visible key) and ``uniform_weight`` (1 / n_keys);
    about the *focus image* (the only image, or ``meta["target"]`` of a multi-image example whose images
    are all visible), when its scene is known and its keys form a square patch grid: ``target_mass`` (mass
    on the focus image; chance T / n_keys), ``object_mass`` (mass on its patches holding any object, i.e.
    at least ``min_share`` of their pixels) and ``asked_mass`` (on the patches of the object the question
    names, :func:`asked_object`), each with its ``*_chance`` (the share of keys, what a uniform pattern
    gives). These are NaN where they do not apply (no scene, no named object, no patch reaching
    ``min_share``).
    """
    layers, kind = _image_layers(model)
    modules = _attention_modules(model)
    rows: list[dict] = []
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start : start + batch_size])
        batch = processor(text=[ex.text for ex in chunk], images=[list(ex.images) for ex in chunk])
        last = batch["attention_mask"].sum(1) - 1  # right padding: each row's last real token
        seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def make_hook(layer: int, seen=seen, last=last):
            def hook(module, args, output):
                event = args[0]
                if event.kind == kind:
                    seen[layer] = _last_row_probs(event, last)

            return hook

        handles = [modules[i].hook_attn.register_forward_hook(make_hook(i)) for i in layers]
        try:
            model(**batch)
        finally:
            for h in handles:
                h.remove()
        for layer, (probs, visible) in sorted(seen.items()):
            for b, ex in enumerate(chunk):
                rows += _rows_of(start + b, layer, probs[b], visible[b], ex, min_share)
    if not rows:
        raise ValueError("no image attention at the last prompt positions; do the prompts hold images?")
    return pd.DataFrame(rows)


def _rows_of(
    example: int, layer: int, probs: torch.Tensor, visible: torch.Tensor, ex, min_share: float
) -> list[dict]:
    """probs [H, K] over image keys (0 on hidden ones), visible [K] bool → one dict per head."""
    n = int(visible.sum())
    p = probs[:, visible]  # [H, n]
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
    nan = float("nan")
    out = [
        dict(
            example=example,
            layer=layer,
            head=h,
            n_keys=n,
            entropy=float(entropy[h]),
            norm_entropy=float(entropy[h] / math.log(n)) if n > 1 else float("nan"),
            max_weight=float(p[h].max()),
            argmax=int(p[h].argmax()),
            uniform_weight=1.0 / n,
            object_mass=nan,
            object_chance=nan,
            asked_mass=nan,
            asked_chance=nan,
            target_mass=nan,
            target_chance=nan,
        )
        for h in range(p.shape[0])
    ]
    scenes = getattr(ex, "scenes", None) or []
    n_images = len(ex.images)
    focus = 0 if n_images == 1 else int((getattr(ex, "meta", None) or {}).get("target", 0)) - 1
    t = n // n_images if n_images and n % n_images == 0 else 0  # all images visible: N blocks of T keys
    grid = math.isqrt(t)
    if len(scenes) != n_images or focus < 0 or grid * grid != t or t == 0:
        return out
    block = slice(focus * t, (focus + 1) * t)  # the focus image's keys
    on_object = patch_object_share(scenes[focus], grid) >= min_share  # [T]
    target = asked_object(ex.text, scenes[focus])
    asked = patch_object_share(scenes[focus], grid, only=target) >= min_share if target else None
    for h, row in enumerate(out):
        row["target_mass"], row["target_chance"] = float(p[h][block].sum()), t / n
        if bool(on_object.any()):
            row["object_mass"] = float(p[h][block][on_object].sum())
            row["object_chance"] = float(on_object.sum()) / n
        if asked is not None and bool(asked.any()):
            row["asked_mass"] = float(p[h][block][asked].sum())
            row["asked_chance"] = float(asked.sum()) / n
    return out


@contextmanager
def blind_cross_attention(model, mode: str = "uniform", layers: Sequence[int] | None = None, seed: int = 0):
    """Inside the block, the Owl3 hyper layers' cross softmax (all, or the given 0-based ``layers``) no
    longer knows *where* the content is:

    * ``uniform``: uniform over the image keys each query may see (the query is zeroed for that
      softmax only), so the cross context is the mean image value;
    * ``shuffle``: the image keys are permuted within each image (one random permutation of the T
      patches per layer, from ``seed``), values untouched: the pattern keeps its shape (entropy, sink
      weight) but its weights land on the wrong patches.

    The self-attention, the gate and the rows that see no image are untouched. Fused (241101) models have
    no separate cross softmax: ValueError.
    """
    if mode not in ("uniform", "shuffle"):
        raise ValueError(f"mode must be 'uniform' or 'shuffle'; got {mode!r}")
    hyper, kind = _image_layers(model)
    if kind != "cross":
        raise ValueError(
            "blind_cross_attention needs a gated/static/sum Owl3 model (a separate cross softmax); "
            f"this model's image attention is kind {kind!r}"
        )
    chosen = list(hyper if layers is None else layers)
    bad = sorted(set(chosen) - set(hyper))
    if bad:
        raise ValueError(f"layers {bad} are not hyper layers (hyper layers: {hyper})")
    modules = _attention_modules(model)
    generator = torch.Generator().manual_seed(seed)
    for i in chosen:
        module, original = modules[i], modules[i].attend

        def attend(q, k, v, ctx, kind, allowed, *args, _original=original, **kwargs):
            if kind == "cross" and mode == "uniform":
                q = torch.zeros_like(q)  # all scores 0: uniform over the allowed image keys
            elif kind == "cross":
                t = ctx.tokens_per_image
                b, h, nt, d = k.shape  # [B, nKV, N*T, D]
                order = torch.randperm(t, generator=generator)
                k = k.view(b, h, nt // t, t, d)[:, :, :, order].reshape(b, h, nt, d)
            return _original(q, k, v, ctx, kind, allowed, *args, **kwargs)

        module.attend = attend
    try:
        yield model
    finally:
        for i in chosen:
            del modules[i].attend  # back to the class method


def uniform_cross_attention(model, layers: Sequence[int] | None = None):
    """:func:`blind_cross_attention` with ``mode="uniform"``."""
    return blind_cross_attention(model, "uniform", layers)


__all__ = [
    "OBJECT_SHARE_MIN",
    "asked_object",
    "blind_cross_attention",
    "cross_focus",
    "patch_object_share",
    "uniform_cross_attention",
]
