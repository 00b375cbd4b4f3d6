"""The recipe fleet as units of work: one entry per artifact that a set of recipe files builds (a recipe, or one
variant of it), the device it wants, and the GitHub Actions matrix made of them.

`builder matrix` prints the matrix for CI runners; `builder build --executor ray` schedules the same units as Ray
tasks. Reading the recipes is all it takes: no source is resolved, so it runs on the core install.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from builder.errors import BuilderError, RecipeError
from builder.recipe import GPU_PROVIDERS, LoadedRecipe, Recipe, load_recipes

GITHUB_MATRIX_LIMIT = 256
"""GitHub Actions runs at most 256 jobs from one matrix."""


@dataclass(frozen=True)
class ArtifactUnit:
    """One artifact to build: `builder build RECIPE_FILE --name NAME` builds exactly it."""

    recipe_file: Path
    variant: str | None
    name: str
    device: str
    """"cuda" when the recipe wants a GPU (bitsandbytes builds unless `load.device_map` keeps them on the CPU; ONNX
    exports for a GPU provider), else "cpu"."""
    loaded: LoadedRecipe = field(compare=False, repr=False)

    def as_json(self) -> dict:
        return {"recipe": str(self.recipe_file), "variant": self.variant, "artifact": self.name, "device": self.device}


@dataclass(frozen=True)
class UnreadableFile:
    """A recipe file that does not load: the units it would give are unknown, its error is reported instead."""

    recipe_file: Path
    error: RecipeError


def artifact_units(files: list[Path], names: list[str] | None = None) -> list[ArtifactUnit | UnreadableFile]:
    """Every artifact the files define, in file order (only those in `names` when given)."""
    units: list[ArtifactUnit | UnreadableFile] = []
    for file in files:
        try:
            loaded = load_recipes(file)
        except RecipeError as error:
            units.append(UnreadableFile(file, error))
            continue
        units += [
            ArtifactUnit(file, item.variant, item.recipe.name, wanted_device(item.recipe), item)
            for item in loaded
            if not names or item.recipe.name in names
        ]
    return units


def wanted_device(recipe: Recipe) -> str:
    """ "cuda" or "cpu": where the recipe's build would rather run (see `ArtifactUnit.device`)."""
    if recipe.export is not None:
        return "cuda" if recipe.export.provider in GPU_PROVIDERS else "cpu"
    device_map = recipe.load.device_map
    if isinstance(device_map, dict):
        return "cuda" if any(str(d) not in ("cpu", "disk") for d in device_map.values()) else "cpu"
    return "cpu" if device_map == "cpu" else "cuda"


def github_matrix(units: list[ArtifactUnit | UnreadableFile]) -> dict:
    """`{"include": [one entry per artifact]}` for `strategy.matrix`; refuses an unreadable file or more entries
    than GitHub runs."""
    if broken := [unit for unit in units if isinstance(unit, UnreadableFile)]:
        raise broken[0].error
    if len(units) > GITHUB_MATRIX_LIMIT:
        raise BuilderError(
            f"{len(units)} artifacts, but a GitHub Actions matrix runs at most {GITHUB_MATRIX_LIMIT} jobs; "
            "split the recipes into several workflows (one `builder matrix` per folder), narrow it with --name "
            "or --changed-since, or build them on a cluster (`builder build --executor ray`, docs/cluster.md)"
        )
    return {"include": [unit.as_json() for unit in units if isinstance(unit, ArtifactUnit)]}
