"""The closed word list of the lab worlds (one place, fixed order ⇒ deterministic token ids).

Every word a generator in :mod:`owl_lab.synth` can emit, plus the prompt-template words of both
families, is listed here. ``tests/owl_lab/synth`` checks that generated examples never hit ``<unk>``.
"""

from __future__ import annotations

# --- the shapes world -------------------------------------------------------------------------
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "gray")
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
PATTERNS = ("plain", "striped", "checkered")
GRID = 3  # objects sit in the cells of a GRID × GRID board
ROW_WORDS = ("top", "middle", "bottom")
COL_WORDS = ("left", "center", "right")


def position_name(row: int, col: int) -> str:
    """Cell (row, col) → a 1–2 word name: "top left", "top", "center", "bottom right", ..."""
    if row == 1 and col == 1:
        return "center"
    if row == 1:
        return COL_WORDS[col]
    if col == 1:
        return ROW_WORDS[row]
    return f"{ROW_WORDS[row]} {COL_WORDS[col]}"


POSITIONS = tuple(position_name(r, c) for r in range(GRID) for c in range(GRID))

# numbers are single words ("17"), large enough for counts, arithmetic and 32 image indices
NUMBERS = tuple(str(i) for i in range(65))

# --- words used by prompts and answers, grouped only for readability --------------------------
TEMPLATE_WORDS = ("user", "assistant", "system")
PUNCTUATION = (":", "?", ",", ".")
QUESTION_WORDS = (
    "what",
    "which",
    "where",
    "how",
    "many",
    "is",
    "are",
    "there",
    "the",
    "a",
    "an",
    "of",
    "at",
    "in",
    "and",
    "or",
    "objects",
    "object",
    "color",
    "shape",
    "size",
    "pattern",
    "image",
    "describe",
    "this",
    "it",
    "yes",
    "no",
    "nothing",
    "empty",
)
TEXT_TASK_WORDS = (
    "plus",
    "minus",
    "larger",
    "smaller",
    "greater",
    "less",
    "than",
    "comes",
    "after",
    "before",
    "even",
    "odd",
    "number",
)

WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(  # de-duplicate, keep first occurrence ⇒ stable order
        TEMPLATE_WORDS
        + PUNCTUATION
        + QUESTION_WORDS
        + TEXT_TASK_WORDS
        + COLORS
        + SHAPES
        + SIZES
        + PATTERNS
        + ROW_WORDS
        + COL_WORDS
        + NUMBERS
    )
)

IMAGE_PLACEHOLDER = "<|image|>"
