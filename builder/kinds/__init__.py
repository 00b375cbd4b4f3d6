"""Build kinds: one module each behind `base.BuildKind`, registered in `KINDS` under the name a recipe gives its
kind (`quantize.method`, or `export.format`). A new kind is one module and one line here (and its recipe block in
`builder.recipe.schema`); everything else asks `kind_of`.
"""

from __future__ import annotations

from builder.kinds import bnb_4bit, bnb_8bit, onnx
from builder.kinds.base import BuildKind, thresholds
from builder.recipe import Recipe

KINDS: dict[str, BuildKind] = {bnb_4bit.NAME: bnb_4bit, bnb_8bit.NAME: bnb_8bit, onnx.NAME: onnx}


def kind_name(recipe: dict) -> str:
    """The kind a recipe (as JSON: a manifest's `recipe`) names: its `quantize.method` or `export.format`."""
    return recipe["quantize"]["method"] if recipe.get("quantize") else recipe["export"]["format"]


def kind_of(recipe: Recipe | dict) -> BuildKind:
    """The registered kind of `recipe` (a `Recipe`, or a manifest's recipe JSON)."""
    data = recipe if isinstance(recipe, dict) else recipe.model_dump(mode="json", include={"quantize", "export"})
    return KINDS[kind_name(data)]


def block_of(recipe: dict) -> dict:
    """The recipe's (JSON) block of its kind: `quantize` or `export`."""
    return recipe.get("quantize") or recipe["export"]


__all__ = ["KINDS", "BuildKind", "block_of", "kind_name", "kind_of", "thresholds"]
