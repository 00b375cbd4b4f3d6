"""The recipe language: the schema (`schema`), YAML read with marks (`marks`), located messages (`messages`,
`wording`) and the loader that resolves `extends` and `variants` (`loader`). Needs only pydantic and pyyaml."""

from builder.recipe.loader import (
    LoadedRecipe,
    files_defining,
    find_recipe_files,
    load_recipes,
    name_clashes,
    require_unique_names,
)
from builder.recipe.schema import (
    COMMIT_PATTERN,
    GPU_PROVIDERS,
    REPO_ID_PATTERN,
    Bnb4Bit,
    Bnb8Bit,
    Load,
    OnnxExport,
    Publish,
    Recipe,
    Source,
    Thresholds,
    Verify,
    is_local_path,
    json_schema,
)

__all__ = ["COMMIT_PATTERN", "GPU_PROVIDERS", "REPO_ID_PATTERN", "Bnb4Bit", "Bnb8Bit", "LoadedRecipe", "Load",
           "OnnxExport", "Publish", "Recipe", "Source", "Thresholds", "Verify", "files_defining", "find_recipe_files",
           "is_local_path", "json_schema", "load_recipes", "name_clashes", "require_unique_names"]
