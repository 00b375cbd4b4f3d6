"""Recipe files that are too large to be recipes are refused quickly, saying which limit they hit; files under the
limits load in work linear in their size (variants included)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from builder.cli import main
from builder.errors import RecipeError
from builder.recipe import load_recipes

HEAD = "schema_version: 1\nname: big\nsource: {model: org/model}\n"


def _refused(path) -> str:
    started = time.monotonic()
    with pytest.raises(RecipeError) as refused:
        load_recipes(path)
    assert time.monotonic() - started < 15  # generous: a 2-core machine; these took 24 s and 113 s before
    return str(refused.value)


def test_a_file_over_1_mib_is_refused_before_parsing(tmp_path, capsys):
    recipe = tmp_path / "keys.yaml"
    recipe.write_text(HEAD + "".join(f"k{i}: 1\n" for i in range(1_000_000)))  # 1M keys, 10.9 MB
    assert (
        _refused(recipe) == f"{recipe}:1:1: the file is over 1,048,576 bytes (1 MiB), the limit for a recipe; "
        "recipes are a few KiB: is this the right file?"
    )
    assert main(["validate", str(recipe)]) == 1
    assert "1 MiB" in capsys.readouterr().out


def test_a_file_of_exactly_1_mib_is_read(tmp_path):
    recipe = tmp_path / "padded.yaml"
    text = HEAD + "description: ok\n"
    recipe.write_text(text + "#" * (1024 * 1024 - len(text) - 1) + "\n")
    assert "1 MiB" not in _refused(recipe)  # refused by the schema (no such field), not by the size cap


@pytest.mark.parametrize(
    "body",
    [
        "big: [" + "0," * 400_000 + "0]\n",  # a flow list of 400k items, 800 KB
        "big: {" + ", ".join(f"k{i}: 1" for i in range(60_000)) + "}\n",  # 60k keys
        "".join(f"- {i}\n" for i in range(100_000)),
    ],
)  # block list (not a mapping)
def test_a_yaml_with_too_many_nodes_stops_at_the_limit(tmp_path, body):
    recipe = tmp_path / "nodes.yaml"
    recipe.write_text(body if body.startswith("-") else HEAD + body)
    message = _refused(recipe)
    assert "more than 20,000 values, keys and list items (the limit was hit here)" in message
    assert "alias" not in message


def test_an_alias_bomb_still_names_the_aliases(tmp_path):
    levels = ["a: &a [x,x,x,x,x,x,x,x,x]"] + [
        f"{b}: &{b} [{', '.join(['*' + a] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi", strict=True)
    ]
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(HEAD + "\n".join(levels) + "\n")
    assert "through aliases" in _refused(recipe)


RECIPE_PACKAGE = str(Path(load_recipes.__code__.co_filename).parent)


def _lines_run_loading(folder: Path, variants: int) -> int:
    """Lines of builder/recipe/ run to load a file of `variants` variants: the loader's work, counted exactly (the
    same on every machine), where a timing would depend on the host."""
    recipe = folder / f"v{variants}.yaml"
    overrides = ("{quantize: {quant_type: fp4}}", "{}")
    recipe.write_text(
        HEAD
        + "quantize: {method: bnb-4bit}\nvariants:\n"
        + "".join(f"  v{i}: {overrides[i % 2]}\n" for i in range(variants))
    )
    lines = 0

    def count_lines(frame, event, arg):
        nonlocal lines
        lines += event == "line"
        return count_lines

    def trace_recipe_code(frame, event, arg):
        return count_lines if frame.f_code.co_filename.startswith(RECIPE_PACKAGE) else None

    sys.settrace(trace_recipe_code)
    try:
        loaded = load_recipes(recipe)
    finally:
        sys.settrace(None)
    assert [item.recipe.quantize.quant_type for item in loaded[:2]] == ["fp4", "nf4"]
    assert len(loaded) == variants
    return lines


def test_loading_variants_is_linear_in_their_number(tmp_path):
    # Twice the variants is twice the work. It was quadratic: every variant's merge copied locations by scanning
    # every other variant's (6,000 variants validated in 126-198 s on a 2-core host, 9,900 in 463 s).
    small, large = _lines_run_loading(tmp_path, 200), _lines_run_loading(tmp_path, 400)
    assert large / small < 2.2
