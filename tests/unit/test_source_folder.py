"""`source.model: mymodels/tiny` with that folder beside the recipe is the folder, not a Hub repo id."""

from __future__ import annotations

from builder.cli import main
from builder.recipe import load_recipes

RECIPE = "schema_version: 1\nname: tiny-nf4\nsource:\n  model: {model}\nquantize:\n  method: bnb-4bit\n"


def test_a_folder_beside_the_recipe_written_without_dot_slash_is_that_folder(tiny_llama, tmp_path, capsys):
    (tmp_path / "mymodels").mkdir()
    (tmp_path / "mymodels" / "tiny").symlink_to(tiny_llama, target_is_directory=True)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(model="mymodels/tiny"))
    [loaded] = load_recipes(recipe)
    assert loaded.recipe.source.model == "./mymodels/tiny" and loaded.recipe.source.is_local
    assert loaded.source_path == tiny_llama.resolve()
    assert main(["plan", str(recipe)]) == 0  # no Hub lookup: the plan pins the folder's content digest
    assert "source:      ./mymodels/tiny @ sha256:" in capsys.readouterr().out


def test_variants_and_a_missing_folder(tmp_path):
    (tmp_path / "org" / "model").mkdir(parents=True)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(model="org/model") + "variants:\n  a: {}\n  b: {source: {model: org/other}}\n")
    models = {r.recipe.name: r.recipe.source.model for r in load_recipes(recipe)}
    assert models == {"tiny-nf4-a": "./org/model", "tiny-nf4-b": "org/other"}  # no such folder: a Hub repo id
