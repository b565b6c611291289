"""Training recipes: ``data/recipes/<name>.json`` files, their ``extends`` chains, and what they freeze.

A recipe names the family, the model config, the world options, one or more training *stages*
and the held-out evaluation (see ``data/recipes/README.md``). Variants ``"extends"`` a base recipe
and override only what differs (dicts merge recursively; lists and scalars replace).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from owl_lab.families import FAMILIES
from owl_lab.synth.shapes import frame_tag_mode
from owl_lab.zoo import data_dir

__all__ = ["recipes_dir", "load_recipe", "shipped_recipes", "stage_freeze"]


def recipes_dir() -> Path:
    return data_dir() / "recipes"


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = (
            _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
        )
    return out


def load_recipe(name_or_path: str | Path) -> dict:
    """Read a recipe by name (``data/recipes/<name>.json``) or path and resolve ``extends``."""
    path = Path(name_or_path)
    if not path.is_file():
        path = recipes_dir() / f"{name_or_path}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in recipes_dir().glob("*.json"))) or "(none)"
        raise FileNotFoundError(f"No recipe {str(name_or_path)!r}; known recipes: {known}")
    recipe = json.loads(path.read_text())
    parent = recipe.pop("extends", None)
    if parent:
        recipe = _merge(load_recipe(path.parent / f"{parent}.json"), recipe)
    recipe.setdefault("name", path.stem)
    missing = [k for k in ("family", "config", "stages") if k not in recipe]
    if missing or recipe["family"] not in FAMILIES:
        raise ValueError(
            f"recipe {path}: needs keys family ∈ {sorted(FAMILIES)}, config, stages; missing "
            f"{missing}, family={recipe.get('family')!r}"
        )
    for where, world in [("world", recipe.get("world", {}))] + [
        (f"stages[{i}].world", st.get("world", {})) for i, st in enumerate(recipe["stages"])
    ]:
        if "frame_tags" in world:
            try:
                frame_tag_mode(world["frame_tags"])
            except ValueError as err:
                raise ValueError(f"recipe {path}: {where}: {err}") from None
    return recipe


def shipped_recipes() -> list[str]:
    """Names of recipes whose checkpoints are shipped (``"ship": true``)."""
    return [p.stem for p in sorted(recipes_dir().glob("*.json")) if load_recipe(p).get("ship", False)]


def stage_freeze(recipe: dict, stage: dict) -> list[str]:
    """The parameter-name regexes a language stage freezes: its own ``freeze``, else the recipe's.

    A recipe-level ``freeze`` lets a variant change the rule for every stage at once (e.g.
    ``owl2-tiny-vittrain`` sets ``"freeze": []``) without repeating the stage list, which would
    silently stop following the base recipe's stages. Vision pre-training stages never freeze.
    """
    if stage.get("kind") == "vision":
        return []
    return list(stage.get("freeze", recipe.get("freeze", [])))
