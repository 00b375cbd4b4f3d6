"""builder: declarative, verified model builds from YAML recipes.

Importing this package imports neither torch nor any other heavy library; the build steps import them lazily.
"""

from builder.errors import BuilderError, RecipeError
from builder.plan import Plan, make_plan
from builder.recipe import LoadedRecipe, Recipe, load_recipes

__all__ = ["BuilderError", "LoadedRecipe", "Plan", "Recipe", "RecipeError", "load_recipes", "make_plan"]
