"""A causal yardstick for pixel maps: occlude image cells, and score maps against the asked-about object.

    drop = occlusion_map(model, processor, example)        # [N_img, gh, gw] fall of the answer's log-prob
    obj = asked_object(example)                             # the Obj the question names (or None)
    cover = object_cover(obj, (gh, gw))                     # [gh, gw] fraction of each cell the object covers
    object_share(some_map, cover)                           # share of the map's weight on the object
    float(cover.mean())                                     # ... and what a uniform map would get (chance)

Occlusion uses captum's ``FeatureAblation``: the input is one image's ``pixel_values`` [1, 3, S, S], the
feature mask groups its pixels into the cells of the patch grid, and each cell in turn is replaced by
the baseline: by default the world's empty background (the cell's content is erased; a flat
mean-colour patch, the integrated-gradients baseline, reads as a new grey object on these dark
scenes and moves answers wherever it is put). The scored quantity is
the teacher-forced log-probability of the chosen answer tokens (sum over them; ``score="prob"`` for the
probability), so a cell's value is ``log p(answer) - log p(answer | cell occluded)``: positive where
hiding the cell hurts the answer.

The procedural scenes know where every object is (:mod:`owl_lab.synth.shapes`), so a map can be
scored by the share of its (positive) weight that lands on the object the question names.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import torch
from captum.attr import FeatureAblation
from PIL import Image
from tqdm.auto import tqdm

from owl_lab.analysis.attribution import attribute
from owl_lab.analysis.pixels import _choose, answer_positions, answer_to_pixels
from owl_lab.synth.shapes import BACKGROUND, NATIVE_SIZE, Obj, _shape_mask
from owl_lab.synth.vocab import COLORS, POSITIONS, SHAPES


# ------------------------------------------------------------------------------- the asked object
def asked_object(example) -> Obj | None:
    """The object of ``example.scenes[0]`` the question names, or None (counts, captions, absent objects).

    A position (``at the top left``) names the object in that cell; otherwise the colour and/or shape
    words must single out exactly one object of the scene.
    """
    if not getattr(example, "scenes", None) or len(example.scenes) != 1:
        return None
    scene, text = example.scenes[0], example.text.lower()
    for r, c in ((r, c) for r in range(3) for c in range(3)):
        name = POSITIONS[3 * r + c]
        if re.search(rf"\bat the {name}\?", text):
            return scene.at(r, c)
    if text.split("?")[0].split()[-1:] == ["there"]:  # "how many ... are there": no single object
        return None
    colors = [w for w in COLORS if re.search(rf"\b{w}\b", text)]
    shapes = [w for w in SHAPES if re.search(rf"\b{w}\b", text)]
    if not colors and not shapes:
        return None
    hits = [
        o for o in scene.objects if all(o.color == c for c in colors) and all(o.shape == s for s in shapes)
    ]
    return hits[0] if len(hits) == 1 else None


def object_cover(obj: Obj, grid: tuple[int, int], size: int = NATIVE_SIZE) -> torch.Tensor:
    """[gh, gw] fraction of each patch cell covered by ``obj`` (rendered at ``size``, then pooled)."""
    gh, gw = grid
    mask = np.zeros((size, size), dtype=np.float64)
    box, shape = _shape_mask(obj, size)
    mask[box] = shape
    # pixel i of the native render lands in cell floor(i * g / size) after the processor's resize
    rows = [np.arange(size)[(np.arange(size) * gh) // size == k] for k in range(gh)]
    cols = [np.arange(size)[(np.arange(size) * gw) // size == k] for k in range(gw)]
    cover = np.array([[mask[np.ix_(r, c)].mean() for c in cols] for r in rows])
    return torch.from_numpy(cover).float()


def object_share(weights: torch.Tensor, cover: torch.Tensor) -> float:
    """Share of a map's positive weight on the object: Σ relu(w)·cover / Σ relu(w) (NaN if the map is 0).

    A uniform map scores ``cover.mean()`` (the object's area share: chance).
    """
    w = torch.as_tensor(weights, dtype=torch.float64).clamp(min=0)
    if w.shape != cover.shape:
        raise ValueError(f"map {tuple(w.shape)} and object cover {tuple(cover.shape)} differ in grid")
    total = float(w.sum())
    return float((w * cover.double()).sum()) / total if total > 0 else float("nan")


# ------------------------------------------------------------------------------- occlusion
def patch_grid(pixel_size: int, model) -> tuple[int, int]:
    """The vision encoder's patch grid for square images of ``pixel_size`` (from its config)."""
    config = model.config
    vision = getattr(config, "vision_config", None) or getattr(config, "vision_settings", None)
    g = pixel_size // int(vision.patch_size)
    return g, g


def cell_mask(size: int, grid: tuple[int, int]) -> torch.Tensor:
    """[1, 1, size, size] long: the patch-grid cell id (row-major) of every pixel."""
    gh, gw = grid
    r = (torch.arange(size) * gh) // size
    c = (torch.arange(size) * gw) // size
    return (r[:, None] * gw + c[None, :])[None, None]


def background_pixels(processor, example, color=BACKGROUND) -> torch.Tensor:
    """[N, 3, S, S] the processor's pixel_values of empty scenes (every pixel the world's background)."""
    blank = [Image.new("RGB", im.size, color) for im in example.images]
    return processor(text=example.text, images=blank)["pixel_values"]


def occlusion_map(
    model,
    processor,
    example,
    *,
    answer: str | None = None,
    tokens="first",
    grid=None,
    baseline="background",
    score: str = "logprob",
    perturbations_per_eval: int = 16,
) -> torch.Tensor:
    """Drop of the answer's probability when each patch cell of each image is occluded: [N_img, gh, gw].

    Args:
        model, processor, example: as for :func:`owl_lab.analysis.pixels.answer_to_pixels`.
        answer: the answer to score (default ``example.answer``); tokens: which answer tokens
            (``"first"``, ``"all"`` or indices), their probabilities multiplied.
        grid: occlusion cells (default the encoder's patch grid).
        baseline: what an occluded cell shows: ``"background"`` (default: the scene's empty background,
            i.e. the cell's content is erased), ``"mean"`` (0 in normalised pixel space, the mean colour;
            on these dark scenes a grey square reads as a new object) or a number.
        score: ``"logprob"`` (default: the drop in log p(answer), informative also when p is near 1)
            or ``"prob"`` (the drop in p(answer)).
        perturbations_per_eval: occluded copies per forward.
    """
    images = list(example.images)
    if not images:
        raise ValueError("occlusion_map needs a prompt with at least one image.")
    if score not in ("logprob", "prob"):
        raise ValueError(f"score must be 'logprob' or 'prob'; got {score!r}")
    answer = example.answer if answer is None else answer
    batch = processor(text=example.text, images=images, answers=answer)
    positions, token_ids = answer_positions(model, batch)
    chosen = _choose(tokens, len(positions))
    pos = torch.tensor([positions[i] for i in chosen])
    tgt = torch.tensor([token_ids[i] for i in chosen])
    pixels = batch["pixel_values"]  # [N, 3, S, S]
    N, S = pixels.shape[0], pixels.shape[-1]
    grid = patch_grid(S, model) if grid is None else tuple(grid)
    mask = cell_mask(S, grid)
    if baseline == "background":
        fill = background_pixels(processor, example)  # [N, 3, S, S]
    elif baseline == "mean":
        fill = torch.zeros_like(pixels)
    elif isinstance(baseline, (int, float)):
        fill = torch.full_like(pixels, float(baseline))
    else:
        raise ValueError(f"baseline must be 'background', 'mean' or a number; got {baseline!r}")
    copies: dict[int, dict] = {}

    def k_batch(k: int) -> dict:  # the prompt k times (the processor lays out k samples' images)
        if k not in copies:
            b = processor(text=[example.text] * k, images=[images] * k, answers=[answer] * k)
            copies[k] = {key: v for key, v in b.items() if key not in ("labels", "pixel_values")}
        return copies[k]

    out = torch.zeros(N, *grid)
    for n in range(N):

        def prob(image_n: torch.Tensor, n: int = n) -> torch.Tensor:  # image_n [k, 3, S, S] → score [k]
            k = image_n.shape[0]
            px = pixels.repeat(k, 1, 1, 1).view(k, N, *pixels.shape[1:]).clone()
            px[:, n] = image_n
            with torch.no_grad():
                logits = model(**k_batch(k), pixel_values=px.view(k * N, *pixels.shape[1:])).logits
            logp = torch.log_softmax(logits[:, pos].float(), -1)  # [k, T, V]
            total = logp.gather(-1, tgt[None, :, None].expand(k, -1, 1)).sum((1, 2))
            return total if score == "logprob" else total.exp()

        ablation = FeatureAblation(prob)
        attr = ablation.attribute(
            pixels[n : n + 1],
            baselines=fill[n : n + 1],
            feature_mask=mask,
            perturbations_per_eval=perturbations_per_eval,
        )  # [1, 3, S, S]
        flat = torch.zeros(grid[0] * grid[1])
        flat[mask.flatten()] = attr[0, 0].flatten().float()  # every pixel of a cell holds the cell's value
        out[n] = flat.view(grid)
    return out


# ------------------------------------------------------------------------------- scoring many questions
MAP_TYPES = ("raw", "composed", "rollout", "integrated_gradients", "occlusion")


def askable(examples) -> list:
    """The examples whose question names one object of a single-image scene (see :func:`asked_object`)."""
    return [ex for ex in examples if asked_object(ex) is not None]


def object_hits(
    model,
    processor,
    examples,
    *,
    maps=MAP_TYPES,
    ig_steps: int = 8,
    perturbations_per_eval: int = 64,
    progress: bool = True,
):
    """Per question and map type, the share of the map's weight on the asked-about object.

    Maps (all for the first answer token, teacher-forced on the reference answer): ``raw``,
    ``composed`` and ``rollout`` from :func:`~owl_lab.analysis.pixels.answer_to_pixels`,
    ``integrated_gradients`` (|IG| per patch, :func:`~owl_lab.analysis.attribution.attribute`,
    ``ig_steps`` steps) and ``occlusion`` (:func:`occlusion_map`, drops clipped at 0).

    Returns:
        DataFrame: question, task, map, share, chance (the object's area share), lift = share / chance.
    """
    unknown = sorted(set(maps) - set(MAP_TYPES))
    if unknown:
        raise ValueError(f"unknown map types {unknown}; choose from {MAP_TYPES}")
    rows = []
    for q, ex in enumerate(tqdm(examples, disable=not progress, desc="questions")):
        obj = asked_object(ex)
        if obj is None:
            raise ValueError(f"question {q} ({ex.text!r}) names no single object; filter with askable()")
        found = {}
        if {"raw", "composed", "rollout"} & set(maps):
            path = answer_to_pixels(model, processor, ex, rollout_encoder="rollout" in maps)
            found.update({k: v[0, 0] for k, v in path.maps.items() if k in maps})
        if "integrated_gradients" in maps:
            batch = processor(text=ex.text, images=ex.images)
            found["integrated_gradients"] = (
                attribute(model, batch, target=ex.answer, n_steps=ig_steps, tokenizer=processor)
                .patch_maps[0]
                .abs()
            )
        if "occlusion" in maps:
            found["occlusion"] = occlusion_map(
                model, processor, ex, perturbations_per_eval=perturbations_per_eval
            )[0]
        grid = tuple(next(iter(found.values())).shape)
        cover = object_cover(obj, grid)
        chance = float(cover.mean())
        for name in maps:
            share = object_share(found[name], cover)
            rows.append(
                {
                    "question": q,
                    "task": ex.task,
                    "map": name,
                    "share": share,
                    "chance": chance,
                    "lift": share / chance,
                }
            )
    return pd.DataFrame(rows)
