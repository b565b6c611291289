"""The shapes world: a few coloured, patterned objects on a 3 × 3 board, rendered with PIL.

A :class:`Scene` is pure data (what is where); :func:`render` draws it at a *native* resolution
(default 112 px). Models see it through their processor, which resizes to the model's
``image_size`` — so a low-resolution model really loses the fine detail, as in the Owl2
resolution ablation.

Fine detail by construction: ``striped`` and ``checkered`` objects alternate two tones, ``c + d``
and ``c − d``, in 2-pixel bands (native pixels). Their *mean* colour equals the ``plain``
colour ``c``, so once an image is downsampled enough (28 px from 112) the three patterns become
indistinguishable while colour, shape and position survive.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from owl_lab.synth.vocab import COLORS, GRID, PATTERNS, SHAPES, SIZES, position_name

NATIVE_SIZE = 112
BACKGROUND = (16, 16, 16)
# mid-range RGB so that c ± PATTERN_DELTA stays inside 0..255 (the pattern's mean stays exactly c)
RGB = {
    "red": (210, 60, 60),
    "green": (60, 170, 60),
    "blue": (60, 90, 215),
    "yellow": (215, 200, 50),
    "purple": (150, 60, 190),
    "orange": (215, 130, 45),
    "gray": (150, 150, 150),
}
PATTERN_DELTA = 35
PATTERN_BAND = 2  # native pixels per stripe / checker square
SIZE_FRACTION = {"small": 0.45, "large": 0.8}  # object diameter as a fraction of a cell
assert set(RGB) == set(COLORS)


@dataclass(frozen=True)
class Obj:
    """One object on the board. ``row``/``col`` index the 3 × 3 grid; ``dx``/``dy`` jitter the
    centre by a fraction of a cell (in [-0.1, 0.1]) so positions are not pixel-identical."""

    shape: str
    color: str
    size: str
    pattern: str
    row: int
    col: int
    dx: float = 0.0
    dy: float = 0.0

    @property
    def position(self) -> str:
        return position_name(self.row, self.col)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]

    def at(self, row: int, col: int) -> Obj | None:
        for o in self.objects:
            if (o.row, o.col) == (row, col):
                return o
        return None

    def sorted(self) -> tuple[Obj, ...]:
        """Objects in reading order (row-major), the order captions use."""
        return tuple(sorted(self.objects, key=lambda o: (o.row, o.col)))


def sample_scene(rng: random.Random, n_min: int = 1, n_max: int = 4, patterns=PATTERNS) -> Scene:
    """A scene with ``n_min..n_max`` objects in distinct cells, attributes uniform."""
    n = rng.randint(n_min, n_max)
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], n)
    objs = tuple(
        Obj(
            shape=rng.choice(SHAPES),
            color=rng.choice(COLORS),
            size=rng.choice(SIZES),
            pattern=rng.choice(patterns),
            row=r,
            col=c,
            dx=rng.uniform(-0.1, 0.1),
            dy=rng.uniform(-0.1, 0.1),
        )
        for r, c in cells
    )
    return Scene(objs)


def _shape_mask(obj: Obj, size: int) -> tuple[tuple[slice, slice], np.ndarray]:
    """Where one object's pixels are: ``(box, mask)`` with ``box`` a (rows, cols) slice pair into the
    ``size × size`` image and ``mask`` a boolean array of the box's shape.

    The shape is drawn on the full canvas (so its rasterisation never depends on the crop); only the
    bounding box is returned, because the image writes that follow cost in proportion to the area
    they touch and an object covers a small part of one of the nine cells.
    """
    cell = size / GRID
    cx = (obj.col + 0.5 + obj.dx) * cell
    cy = (obj.row + 0.5 + obj.dy) * cell
    r = SIZE_FRACTION[obj.size] * cell / 2
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif obj.shape == "square":
        s = r * 0.85  # same visual area as the circle, roughly
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=255)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=255)
    elif obj.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=255)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")
    left, top, right, bottom = canvas.getbbox() or (0, 0, 0, 0)  # box of the non-zero pixels
    return (slice(top, bottom), slice(left, right)), np.asarray(canvas.crop((left, top, right, bottom))) > 127


@lru_cache(maxsize=16)
def _pattern_sign(pattern: str, size: int) -> np.ndarray:
    """[size, size] int array of +1/-1 (0 for plain): which tone each pixel of a pattern takes."""
    yy, xx = np.mgrid[0:size, 0:size]
    if pattern == "plain":
        return np.zeros((size, size), dtype=np.int32)
    if pattern == "striped":  # horizontal bands
        return np.where((yy // PATTERN_BAND) % 2 == 0, 1, -1).astype(np.int32)
    if pattern == "checkered":
        return np.where(((yy // PATTERN_BAND) + (xx // PATTERN_BAND)) % 2 == 0, 1, -1).astype(np.int32)
    raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")


def render(scene: Scene, size: int = NATIVE_SIZE) -> Image.Image:
    """Draw a scene as an RGB PIL image of ``size × size`` pixels (deterministic).

    Each object's pixels take its colour ``c`` plus ``PATTERN_DELTA × sign`` of its pattern
    (sign ±1 in 2-pixel bands, 0 for plain), so the pattern's mean is exactly ``c``.
    """
    if size < 2 * GRID * PATTERN_BAND:
        raise ValueError(f"render size must be at least {2 * GRID * PATTERN_BAND} px, got {size}")
    img = np.empty((size, size, 3), dtype=np.int32)
    img[:] = BACKGROUND
    for obj in scene.objects:  # in order: a later object paints over an earlier one
        box, mask = _shape_mask(obj, size)
        sign = _pattern_sign(obj.pattern, size)[box][mask]  # [n_pixels]
        img[box][mask] = np.asarray(RGB[obj.color], dtype=np.int32)[None, :] + PATTERN_DELTA * sign[:, None]
    return Image.fromarray(img.clip(0, 255).astype(np.uint8), mode="RGB")


# --- numbered frames (world option ``frame_tags``) ---------------------------------------------
# Issue 18: in a labelled multi-image prompt ("Image k: <|image|> …") image k may be drawn on a
# background whose tint encodes k. The tint covers every background pixel, so every patch of the
# image (also the patches holding objects) carries the label: a hyper layer's query built from the
# question's "Image X" can then select image X by content. 124 tints: 5 dim levels per channel,
# greys excluded (the default background is grey), in a seeded order so that neighbouring labels get
# unrelated tints. All levels stay ≤ 72, below every object colour's darkest tone (c − 35 ≥ 25 in
# one channel only), so objects stay readable.
_TAG_LEVELS = (0, 18, 36, 54, 72)
_TAG_TINTS = [(r, g, b) for r in _TAG_LEVELS for g in _TAG_LEVELS for b in _TAG_LEVELS if not r == g == b]
random.Random("frame-tags").shuffle(_TAG_TINTS)
FRAME_TAGS: tuple[tuple[int, int, int], ...] = tuple(_TAG_TINTS)


def frame_tag_color(label: int) -> tuple[int, int, int]:
    """The background tint of image ``label`` (1-based) under the ``frame_tags`` world option."""
    if not 1 <= label <= len(FRAME_TAGS):
        raise ValueError(f"frame tag label must be in 1..{len(FRAME_TAGS)}; got {label}")
    return FRAME_TAGS[label - 1]


# Mode ``"all"`` (issue 18, second session): the tint of the background alone reaches only the
# patches that show background; a frozen or briefly trained encoder does not copy it into the patches
# that hold an object (linear probe 3–13 %), so "the circle of image X" cannot be found in one look-up.
# In this mode every object pixel of image k is also shifted by a small per-label offset, so every
# patch carries the label in its own pixels. 64 offsets (≥ MAX_IMAGES labels): 4 levels per channel,
# ±6 / ±18 — small against the gaps between object colours (≥ 60 in some channel), so a colour
# stays nearest to its own name under every offset (tests/owl_lab/synth/test_frame_tags.py checks it).
_OBJECT_LEVELS = (-18, -6, 6, 18)
_OBJECT_OFFSETS = [(r, g, b) for r in _OBJECT_LEVELS for g in _OBJECT_LEVELS for b in _OBJECT_LEVELS]
random.Random("frame-tags/objects").shuffle(_OBJECT_OFFSETS)
OBJECT_TAG_OFFSETS: tuple[tuple[int, int, int], ...] = tuple(_OBJECT_OFFSETS)
# Mode ``"objects"`` (issue 18, session 12): the object offset alone, on a plain (untinted) background.
# With a tinted background, find prompts ("In which image is the red circle?") taught the answer
# position to read the label from background patches, which hold no content, so it could not match
# "the label of the red circle" in one attention step (its mass on the target's objects stayed below
# chance). Here the label exists only in the object pixels, in the same patches as the object's content.
FRAME_TAG_MODES = ("background", "all", "objects", "dots")

# Mode ``"dots"`` (issue 18, session 12b): the ±6 / ±18 offset of ``"objects"`` is a weak code. A patch must
# subtract the object's unknown palette colour and the ±35 pattern tones to read it: from the 7 × 7 × 3 pixels
# the Owl3 tiny encoder sees, a 256-wide MLP reads it at 47 % (sparse scenes), the encoder itself at 62 %
# after 5000 steps. Here image k's objects carry small dots of one absolute dark tint per label instead:
# a tint is ≥ 35 from every other tint and ≥ 45 from every object tone, so it names the label whatever the
# object's colour, and the same MLP reads it at 96 % (a linear read-out at 29 % vs 4 %). The dots sit at fixed
# places of each 7-px patch of a 56-px image (the Owl3 tiny grid, 8 × 8): 4 dots per patch, 1 px at 56 px
# (2 × 2 at the native 112), on object pixels only, 8 % of them; the other object pixels keep their tones.
_DOT_LEVELS = (0, 35, 70, 105, 140)
_DOT_MIN_TO_TONE = 45  # tint distance (L2) to every object tone c, c ± PATTERN_DELTA
_DOT_MIN_TO_BACKGROUND = 30
_DOT_GRID_PX = 56  # the resolution whose 7-px patches the dot lattice follows
_DOT_PHASES = (1, 5)  # rows / columns of a 7-px patch that hold dots


def _dot_tints(n: int = 64) -> tuple[tuple[int, int, int], ...]:
    """``n`` label tints: the 5-level grid minus tints near an object tone or the background, in
    farthest-point order (each next tint the farthest from those before it), so any prefix is spread out."""
    tones = np.array(
        [np.clip(np.asarray(c) + d, 0, 255) for c in RGB.values() for d in (-PATTERN_DELTA, 0, PATTERN_DELTA)]
    )
    grid = np.array([(r, g, b) for r in _DOT_LEVELS for g in _DOT_LEVELS for b in _DOT_LEVELS])
    to_tone = np.linalg.norm(grid[:, None] - tones[None], axis=-1).min(1)
    to_background = np.linalg.norm(grid - np.asarray(BACKGROUND), axis=-1)
    pool = grid[(to_tone >= _DOT_MIN_TO_TONE) & (to_background >= _DOT_MIN_TO_BACKGROUND)]
    order = [int(np.argmax(np.linalg.norm(pool - np.asarray(BACKGROUND), axis=-1)))]
    nearest = np.linalg.norm(pool - pool[order[0]], axis=-1)
    while len(order) < n:
        order.append(int(np.argmax(nearest)))
        nearest = np.minimum(nearest, np.linalg.norm(pool - pool[order[-1]], axis=-1))
    return tuple(tuple(int(v) for v in pool[i]) for i in order)


OBJECT_DOT_TINTS: tuple[tuple[int, int, int], ...] = _dot_tints()


def object_dot_tint(label: int) -> tuple[int, int, int]:
    """The dot colour of image ``label``'s objects (1-based) under ``frame_tags: "dots"``."""
    if not 1 <= label <= len(OBJECT_DOT_TINTS):
        raise ValueError(f"object dot label must be in 1..{len(OBJECT_DOT_TINTS)}; got {label}")
    return OBJECT_DOT_TINTS[label - 1]


@lru_cache(maxsize=8)
def dot_lattice(size: int) -> np.ndarray:
    """[size, size] bool: the pixels of a ``size``-px image that hold a label dot in mode ``"dots"``."""
    index = np.arange(size) * _DOT_GRID_PX // size  # each pixel's row / column at 56 px
    on = np.isin(index % 7, _DOT_PHASES)
    return on[:, None] & on[None, :]


def frame_tag_mode(frame_tags: bool | str) -> str | None:
    """The mode a ``frame_tags`` world value names: ``False``/``None`` → None (untagged), ``True`` or
    ``"background"`` → ``"background"``, ``"all"`` / ``"objects"`` → itself; anything else raises
    ValueError."""
    if frame_tags is False or frame_tags is None:
        return None
    if frame_tags is True:
        return "background"
    if isinstance(frame_tags, str) and frame_tags in FRAME_TAG_MODES:
        return frame_tags
    raise ValueError(f"frame_tags must be false, true or one of {FRAME_TAG_MODES}; got {frame_tags!r}")


def n_frame_tags(frame_tags: bool | str = True) -> int:
    """How many distinct labels the mode can draw (the vision ``tags`` objective's classes)."""
    mode = frame_tag_mode(frame_tags)
    if mode == "dots":
        return len(OBJECT_DOT_TINTS)
    return len(OBJECT_TAG_OFFSETS) if mode in ("all", "objects") else len(FRAME_TAGS)


def object_tag_offset(label: int) -> tuple[int, int, int]:
    """The RGB shift of image ``label``'s object pixels (1-based) under ``frame_tags`` "all" or "objects"."""
    if not 1 <= label <= len(OBJECT_TAG_OFFSETS):
        raise ValueError(f"object tag label must be in 1..{len(OBJECT_TAG_OFFSETS)}; got {label}")
    return OBJECT_TAG_OFFSETS[label - 1]


def with_frame_tag(image: Image.Image, label: int, frame_tags: bool | str = True) -> Image.Image:
    """A copy of a rendered image carrying image ``label``'s tag (1-based), by ``frame_tags`` mode:

    - ``True`` / ``"background"``: background pixels (exactly :data:`BACKGROUND`) take the tint of ``label``;
      object pixels are untouched (no object tone equals the background);
    - ``"all"``: the tint, and every object pixel shifted by :func:`object_tag_offset` (clipped to 0..255);
    - ``"objects"``: only the object shift; the background stays :data:`BACKGROUND`;
    - ``"dots"``: the object pixels on :func:`dot_lattice` take :func:`object_dot_tint`; nothing else changes.
    """
    mode = frame_tag_mode(frame_tags)
    array = np.asarray(image.convert("RGB")).copy()
    if mode is None:
        return Image.fromarray(array, mode="RGB")
    background = (array == np.asarray(BACKGROUND, dtype=np.uint8)).all(axis=-1)
    if mode in ("all", "objects"):
        shifted = array.astype(np.int32) + np.asarray(object_tag_offset(label), dtype=np.int32)
        array[~background] = shifted[~background].clip(0, 255).astype(np.uint8)
    if mode == "dots":
        array[~background & dot_lattice(array.shape[0])] = object_dot_tint(label)
    if mode in ("background", "all"):
        array[background] = frame_tag_color(label)
    return Image.fromarray(array, mode="RGB")


def patch_object_shares(image: Image.Image, grid: int) -> np.ndarray:
    """[grid²] share of each patch square's pixels that are not :data:`BACKGROUND` (raster order).

    Pass the untagged render: a tinted background would count as object pixels."""
    array = np.asarray(image.convert("RGB"))
    if grid < 1 or array.shape[0] < grid:
        raise ValueError(f"grid must be in 1..{array.shape[0]} for a {array.shape[0]} px image; got {grid}")
    side = array.shape[0] // grid * grid
    mask = ~(array[:side, :side] == np.asarray(BACKGROUND, dtype=np.uint8)).all(-1)
    return mask.reshape(grid, side // grid, grid, side // grid).mean((1, 3)).reshape(-1)


def caption(scene: Scene) -> str:
    """Reading-order caption, e.g. ``"red circle top left, blue square center"``."""
    return ", ".join(f"{o.color} {o.shape} {o.position}" for o in scene.sorted())


CELL_ATTRIBUTES = (("shape", SHAPES), ("color", COLORS), ("size", SIZES), ("pattern", PATTERNS))


def cell_targets(scene: Scene) -> list[list[int]]:
    """Per grid cell (row-major, GRID² rows) the class of each attribute in :data:`CELL_ATTRIBUTES`:
    0 = empty cell, k + 1 = the k-th value. Targets of the vision-encoder pre-training stage."""
    rows = []
    for r in range(GRID):
        for c in range(GRID):
            o = scene.at(r, c)
            rows.append(
                [0 if o is None else values.index(getattr(o, name)) + 1 for name, values in CELL_ATTRIBUTES]
            )
    return rows
