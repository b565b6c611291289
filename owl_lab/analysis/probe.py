"""Linear probes: which object attributes can be read, linearly, from each vision patch feature?

The vision pre-training stage (:mod:`owl_lab.pretrain_vision`) asks every patch feature to name the
shape / colour / size / pattern of the object in its board cell. A *probe* measures what is left
of that afterwards: features of held-out scenes go through a frozen encoder, one linear classifier
per attribute is fitted on object patches of some scenes and scored on object patches of others.
An attribute the encoder does not carry cannot be answered by the decoder either, so the probe
separates "the ViT never saw it" from "the language model did not learn to look it up" (e.g. a
``pattern`` question failing on a frozen ViT whose pattern probe is at chance).

Shapes: features ``[n_patches, width]`` (object patches only, every scene's patches pooled),
targets ``[n_patches, 4]`` with the classes of :data:`owl_lab.synth.shapes.CELL_ATTRIBUTES`
(0 = empty cell, k + 1 = the k-th value).
"""

from __future__ import annotations

import random

import torch
from torch import nn

from owl_lab.pretrain_vision import patch_cells, patch_features
from owl_lab.synth.shapes import (
    CELL_ATTRIBUTES,
    cell_targets,
    patch_object_shares,
    render,
    sample_scene,
    with_frame_tag,
)
from owl_lab.synth.vocab import IMAGE_PLACEHOLDER

ATTRIBUTES = tuple(name for name, _ in CELL_ATTRIBUTES)


@torch.no_grad()
def cell_features(
    model,
    processor,
    n_scenes: int,
    seed: int | str = 0,
    *,
    render_size: int = 112,
    n_objects: tuple[int, int] = (1, 8),
    batch_size: int = 50,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch features of ``n_scenes`` seeded scenes and the attributes of the cell under each patch.

    Returns ``features`` [n_scenes * G², W] (Owl2: ViT output without CLS; Owl3: SigLIP through the
    projector, as in :func:`owl_lab.pretrain_vision.patch_features`) and ``targets`` [n_scenes * G², 4].
    Scene ``i`` is drawn from ``random.Random(f"probe/{seed}/{i}")``, so two seeds give disjoint scenes.
    """
    if n_scenes < 1:
        raise ValueError(f"n_scenes must be >= 1; got {n_scenes}")
    features, targets = [], []
    for start in range(0, n_scenes, batch_size):
        scenes = [
            sample_scene(random.Random(f"probe/{seed}/{i}"), *n_objects)
            for i in range(start, min(start + batch_size, n_scenes))
        ]
        batch = processor(
            text=[IMAGE_PLACEHOLDER] * len(scenes), images=[[render(s, render_size)] for s in scenes]
        )
        pixels = batch["pixel_values"].to(next(model.parameters()).dtype)
        feats = patch_features(model, pixels)  # [B, G², W]
        cells = patch_cells(int(round(feats.shape[1] ** 0.5)), pixels.shape[-1])  # [G²] board cell per patch
        board = torch.tensor([cell_targets(s) for s in scenes])  # [B, GRID², 4]
        features.append(feats.float().flatten(0, 1))  # [B * G², W]
        targets.append(board[:, cells].flatten(0, 1))  # [B * G², 4]
    return torch.cat(features), torch.cat(targets)


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    steps: int = 300,
    lr: float = 1e-2,
    seed: int = 0,
) -> float:
    """Fit a softmax-linear classifier on standardised ``train_x`` [N, W] → ``train_y`` [N] (class ids);
    return its accuracy (%) on ``test_x`` [M, W] / ``test_y`` [M]. Full-batch Adam, seeded."""
    if len(train_x) == 0 or len(test_x) == 0:
        raise ValueError("linear_probe needs at least one training and one test example")
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    generator = torch.Generator().manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    head = nn.Linear(train_x.shape[1], n_classes)
    with torch.no_grad():  # seeded init, independent of the global RNG
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.01)
        head.bias.zero_()
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    x = (train_x - mean) / std
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(head(x), train_y).backward()
            opt.step()
    with torch.no_grad():
        predicted = head((test_x - mean) / std).argmax(-1)
    return 100.0 * (predicted == test_y).float().mean().item()


def probe_cell_attributes(
    model,
    processor,
    *,
    n_train: int = 1000,
    n_test: int = 400,
    seed: int = 0,
    render_size: int = 112,
    steps: int = 300,
) -> dict[str, float]:
    """Linear-probe accuracy (%) of each cell attribute on object patches (empty cells left out).

    Probes are fitted on ``n_train`` scenes and scored on ``n_test`` other scenes (1–8 objects).
    Chance is 1 / (number of values): shape 1/4, colour 1/7, size 1/2, pattern 1/3 in the shapes
    world. Returns ``{"shape": ..., "color": ..., "size": ..., "pattern": ...}``.
    """
    train_x, train_y = cell_features(model, processor, n_train, f"{seed}/train", render_size=render_size)
    test_x, test_y = cell_features(model, processor, n_test, f"{seed}/test", render_size=render_size)
    train_obj, test_obj = train_y[:, 0] > 0, test_y[:, 0] > 0  # patches over an object
    return {
        name: linear_probe(
            train_x[train_obj],
            train_y[train_obj, a] - 1,
            test_x[test_obj],
            test_y[test_obj, a] - 1,
            steps=steps,
            seed=seed,
        )
        for a, name in enumerate(ATTRIBUTES)
    }


@torch.no_grad()
def probe_frame_tags(
    model,
    processor,
    frame_tags: bool | str = True,
    *,
    n_train: int = 500,
    n_test: int = 200,
    n_labels: int = 50,
    seed: int = 0,
    render_size: int = 112,
    n_objects: tuple[int, int] = (1, 4),
    steps: int = 300,
) -> dict[str, float]:
    """Linear-probe accuracy (%) of an image's frame tag (world option ``frame_tags``, labels 1..``n_labels``)
    from single patch features, split by what the patch shows (issue 18).

    A hyper layer can ask for "the circle of image X" in one look-up only if the patches that hold the
    circle carry X's tag. Patches are ``background`` (no object pixel in the patch's square of the native
    render) or ``object`` (at least half of its pixels belong to an object). Chance is 1 / ``n_labels``.
    Returns ``{"background": ..., "object": ...}``.
    """
    splits = {}
    for part, n in (("train", n_train), ("test", n_test)):
        rng = random.Random(f"tag-probe/{seed}/{part}")
        feats, labels, shares = [], [], []
        for start in range(0, n, 50):
            scenes = [sample_scene(rng, *n_objects) for _ in range(start, min(start + 50, n))]
            tags = [rng.randint(1, n_labels) for _ in scenes]
            plain = [render(s, render_size) for s in scenes]
            images = [with_frame_tag(im, t, frame_tags) for im, t in zip(plain, tags, strict=True)]
            batch = processor(text=[IMAGE_PLACEHOLDER] * len(images), images=[[im] for im in images])
            f = patch_features(model, batch["pixel_values"].to(next(model.parameters()).dtype))  # [B, G², W]
            grid = int(round(f.shape[1] ** 0.5))
            feats.append(f.float().flatten(0, 1))
            labels.append(torch.tensor(tags).repeat_interleave(f.shape[1]) - 1)
            shares.append(torch.cat([_object_share(im, grid) for im in plain]))
        splits[part] = torch.cat(feats), torch.cat(labels), torch.cat(shares)
    (train_x, train_y, _), (test_x, test_y, test_share) = splits["train"], splits["test"]
    out = {}
    for name, keep in (("background", test_share == 0), ("object", test_share >= 0.5)):
        out[name] = linear_probe(train_x, train_y, test_x[keep], test_y[keep], steps=steps, seed=seed)
    return out


def _object_share(image, grid: int) -> torch.Tensor:
    """[grid²] share of each patch square's native pixels that are not :data:`BACKGROUND` (raster order)."""
    return torch.tensor(patch_object_shares(image, grid))
