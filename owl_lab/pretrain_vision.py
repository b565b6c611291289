"""Stage ``"kind": "vision"``: pre-train the vision encoder on per-patch object attributes.

The real Owls start from a pre-trained vision encoder (CLIP ViT-L for Owl2, SigLIP for Owl3). A
tiny encoder trained from scratch only through the language loss sits for a long time on a plateau
where it reports the average colour of the image and nothing else. This stage plays the part of
the encoder's pre-training: a temporary linear head reads every patch feature the decoder side will
consume (Owl2: the ViT output without CLS; Owl3: ``encode_images``, i.e. SigLIP hidden_states[-2]
through the projector) and predicts the shape / colour / size / pattern of the object in the grid
cell under that patch (or "empty"), and which cell that is. The head is thrown away afterwards; nothing
it adds is saved.

Objective ``"board"`` (stage key ``"objectives"``, default ``["patches"]``) trains the *whole* visual path
the decoder reads (Owl2: ViT → abstractor → ``visual_fc``; Owl3: SigLIP → projector), as Owl2's stage-1
pre-training trains the abstractor: a small read-out (:class:`BoardReadout`, one learned query per
board cell attending over the visual tokens) must recover every cell's attributes. Through the language
loss alone, the abstractor's queries stay interchangeable for thousands of steps (every visual token
carries the same "bag of colours" and nothing binds a shape to a place); the read-out gives them a
short gradient path to specialise.

Objective ``"tags"`` (issue 18, for worlds with ``frame_tags``): each image is drawn with a random
label tag (or none, half of the time, as single-image prompts show it) and every patch must predict
that tag through a linear head. Without it the frozen encoder carries the tag only in background
patches (linear probe 80 %) and not in patches holding an object (2–13 %, chance 2 %), so a hyper
layer cannot ask for "the circle of image X" in one look-up; the objective makes the encoder's
attention broadcast the tag into every patch. In mode ``frame_tags: "objects"`` the label is drawn only
into object pixels and only object patches are asked for it (background patches must answer "untagged"),
see :func:`tag_targets`.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from owl_lab.families import FamilySpec, family_of, get_family, resolve_path
from owl_lab.optim import apply_step
from owl_lab.synth.shapes import (
    CELL_ATTRIBUTES,
    cell_targets,
    frame_tag_mode,
    n_frame_tags,
    patch_object_shares,
    render,
    sample_scene,
    with_frame_tag,
)
from owl_lab.synth.vocab import GRID, IMAGE_PLACEHOLDER


def patch_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """[N, 3, S, S] → [N, G*G, W] patch features in raster order (no CLS); the family says which."""
    return family_of(model).patch_features(model, pixel_values)


def visual_tokens(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """[N, 3, S, S] → [N, T, H]: the visual tokens the decoder reads (Owl2 abstractor rows; Owl3 patches)."""
    return resolve_path(model, family_of(model), "encode_images")(pixel_values)


class BoardReadout(nn.Module):
    """One learned query per board cell attends (single head) over visual tokens [N, T, W]; a linear
    head classifies the attended vector → logits [N, GRID², sum(sizes)]."""

    def __init__(self, width: int, sizes: list[int]):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.cells = nn.Parameter(torch.randn(GRID * GRID, width) / width**0.5)  # [C, W]
        self.key = nn.Linear(width, width)
        self.head = nn.Linear(width, sum(sizes))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm(tokens)  # [N, T, W]
        scores = torch.einsum("cw,ntw->nct", self.cells, self.key(x)) / x.shape[-1] ** 0.5  # [N, C, T]
        pooled = scores.softmax(-1) @ x  # [N, C, W]
        return self.head(pooled)  # [N, C, sum(sizes)]


def patch_cells(grid: int, image_size: int) -> torch.Tensor:
    """[G*G] index of the board cell under each patch centre (row-major cells)."""
    centre = (torch.arange(grid) + 0.5) * image_size / grid  # px
    cell = (centre * GRID / image_size).long().clamp(max=GRID - 1)  # [G]
    return (cell[:, None] * GRID + cell[None, :]).flatten()


def vision_parameters(model, board: bool = False, bridge: bool = True) -> list[nn.Parameter]:
    """The parameters the vision stage trains: the family's ``vision_pretrain`` components (with
    ``board``, ``vision_pretrain_board``: the whole visual path up to the decoder). ``bridge=False``
    keeps only the encoder (``vision_tower``): the read-out heads then see the encoder through the
    bridge's initial weights (the recipe key ``train_bridge``)."""
    spec = family_of(model)
    components = spec.vision_pretrain_board if board else spec.vision_pretrain
    if not bridge:
        components = tuple(c for c in components if c != "bridge")
    return [p for c in components for p in resolve_path(model, spec, c).parameters()]


OBJECTIVES = ("patches", "board", "tags")


def run_vision_stage(
    model,
    processor,
    family: str | FamilySpec,
    stage: dict,
    seed: str,
    world: dict,
    history: dict,
    global_step: int,
    si: int,
    progress: bool,
) -> int:
    """Train the visual path for ``stage["steps"]`` on ``stage["objectives"]``; return the new global step.

    ``family`` (the recipe's) must be the model's; which modules train is the registry's knowledge."""
    if get_family(family) is not family_of(model):
        raise ValueError(f"recipe family {family!r} but the model is {family_of(model).name!r}")
    steps, bs = stage["steps"], stage["batch_size"]
    objectives = stage.get("objectives", ["patches"])
    if not objectives or set(objectives) - set(OBJECTIVES):
        raise ValueError(
            f"vision stage objectives must be a non-empty subset of {OBJECTIVES}; got {objectives}"
        )
    lo, hi = stage.get("n_objects", (1, 8))
    size = world.get("render_size", 112)
    with torch.no_grad():  # probe shapes once
        probe = processor(text=[IMAGE_PLACEHOLDER], images=[[render(sample_scene(random.Random(0)), size)]])
        feats = patch_features(model, probe["pixel_values"])
        token_width = visual_tokens(model, probe["pixel_values"]).shape[-1]
    n_patches, width = feats.shape[1], feats.shape[2]
    grid = int(round(n_patches**0.5))
    cells = patch_cells(grid, probe["pixel_values"].shape[-1])
    # one class per attribute value (+ "empty"), and the cell index itself, so features keep "where"
    sizes = [len(values) + 1 for _, values in CELL_ATTRIBUTES] + [GRID * GRID]
    weights = attribute_weights(stage)
    heads = nn.ModuleDict()
    if "patches" in objectives:
        heads["patches"] = nn.Linear(width, sum(sizes))
    if "board" in objectives:
        heads["board"] = BoardReadout(token_width, sizes[:-1])
    if "tags" in objectives:
        tag_mode = world.get("frame_tags") or True  # the world's tag mode; background-only by default
        heads["tags"] = nn.Linear(width, n_frame_tags(tag_mode) + 1)  # 0 = untagged
    params = vision_parameters(model, board="board" in objectives, bridge=stage.get("train_bridge", True))
    opt = torch.optim.AdamW(
        params + list(heads.parameters()),
        lr=stage["lr"],
        betas=(0.9, 0.98),
        weight_decay=stage.get("weight_decay", 0.0),
    )
    bar = tqdm(
        range(steps), disable=not progress, desc=f"stage {si + 1} (vision pre-training)", mininterval=2.0
    )
    for step in bar:
        scenes = [sample_scene(random.Random(f"{seed}/{step * bs + j}"), lo, hi) for j in range(bs)]
        images = plain = [render(s, size) for s in scenes]
        if "tags" in heads:  # half untagged, half a uniform label
            n_tags = n_frame_tags(tag_mode)
            tags = [_draw_tag(random.Random(f"{seed}/{step * bs + j}/tag"), n_tags) for j in range(bs)]
            images = [with_frame_tag(im, t, tag_mode) if t else im for im, t in zip(plain, tags, strict=True)]
        batch = processor(text=[IMAGE_PLACEHOLDER] * bs, images=[[im] for im in images])
        board = torch.tensor([cell_targets(s) for s in scenes])  # [B, GRID², 4]
        loss = 0.0
        if "patches" in heads:
            targets = torch.cat([board[:, cells], cells.expand(bs, -1)[..., None]], dim=-1)  # [B, G², 5]
            logits = heads["patches"](patch_features(model, batch["pixel_values"]))  # [B, G², sum(sizes)]
            loss = loss + _cross_entropy(logits, targets, sizes, weights + [1.0])
        if "board" in heads:
            logits = heads["board"](visual_tokens(model, batch["pixel_values"]))  # [B, GRID², Σ]
            loss = loss + _cross_entropy(logits, board, sizes[:-1], weights)
        if "tags" in heads:
            logits = heads["tags"](patch_features(model, batch["pixel_values"]))  # [B, G², tags + 1]
            target = tag_targets(tags, plain, tag_mode, int(round(logits.shape[1] ** 0.5)))  # [B, G²]
            loss = loss + stage.get("tag_weight", 1.0) * nn.functional.cross_entropy(
                logits.flatten(0, 1), target.flatten(), ignore_index=-100
            )
        for group in opt.param_groups:
            group["lr"] = stage["lr"] * min(1.0, (step + 1) / max(1, stage.get("warmup", 50)))
        global_step = apply_step(opt, loss, params, 1.0, history, global_step, si)
        if progress and step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return global_step


def tag_targets(tags: list[int], plain: list, frame_tags: bool | str, grid: int) -> torch.Tensor:
    """[B, grid²] per-patch class of the ``tags`` objective (0 = untagged, -100 = not scored).

    ``tags[b]`` is image b's label (0: drawn untagged); ``plain[b]`` its untagged render. In the modes that
    tint the background, every patch of a tagged image must report its label. In modes ``"objects"`` and
    ``"dots"`` the label is only in the object pixels, and we want it only *there*, in the patches that hold
    the content: a patch with at least a quarter object pixels must report the label, a pure-background patch
    must report "untagged" (so the encoder does not copy the label into the background, where find prompts
    learned to read it), and a patch with a sliver of object is not scored.
    """
    if len(tags) != len(plain):
        raise ValueError(f"tag_targets needs one render per tag; got {len(tags)} tags, {len(plain)} images")
    label = torch.tensor(tags, dtype=torch.long)[:, None].expand(-1, grid * grid).clone()
    if frame_tag_mode(frame_tags) not in ("objects", "dots"):
        return label
    share = torch.tensor(np.stack([patch_object_shares(im, grid) for im in plain]))  # [B, grid²]
    label[share == 0] = 0
    label[(share > 0) & (share < 0.25) & (label > 0)] = -100
    return label


def _draw_tag(rng: random.Random, n_tags: int) -> int:
    """0 (untagged) with probability 1/2, else a label in 1..n_tags."""
    return 0 if rng.random() < 0.5 else rng.randint(1, n_tags)


def attribute_weights(stage: dict) -> list[float]:
    """Loss weight of each cell attribute (order of ``CELL_ATTRIBUTES``) from the stage's optional
    ``"attribute_weights"`` (e.g. ``{"pattern": 4}``; unnamed attributes weigh 1)."""
    given = dict(stage.get("attribute_weights", {}))
    names = [name for name, _ in CELL_ATTRIBUTES]
    unknown = set(given) - set(names)
    if unknown:
        raise ValueError(f"attribute_weights names unknown attributes {sorted(unknown)}; known: {names}")
    if any(w < 0 for w in given.values()):
        raise ValueError(f"attribute_weights must be >= 0; got {given}")
    return [float(given.get(name, 1.0)) for name in names]


def _cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, sizes: list[int], weights: list[float]
) -> torch.Tensor:
    """Weighted sum over attributes of the mean cross-entropy.

    logits [B, C, Σ sizes], targets [B, C, len(sizes)]."""
    return sum(
        w * nn.functional.cross_entropy(part.flatten(0, 1), targets[..., k].flatten())
        for k, (w, part) in enumerate(zip(weights, logits.split(sizes, dim=-1), strict=True))
    )
