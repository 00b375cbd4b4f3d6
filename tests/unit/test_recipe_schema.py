"""docs/recipe.schema.json, as an editor uses it: every valid recipe passes a standard validator, bad ones fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from builder.recipe import json_schema

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[2]
VALID = sorted([*ROOT.glob("recipes/*/*.yaml"), *(ROOT / "tests/recipes/valid").glob("*.yaml")])
# Bad values and unknown keys an editor can see in the file alone (not parents, cycles or cross-field rules).
INVALID = [
    "unknown-key-top",
    "unknown-key-source",
    "unknown-key-quantize",
    "unknown-key-export",
    "unknown-key-load",
    "unknown-key-publish",
    "unknown-key-thresholds",
    "unknown-key-verify",
    "unknown-key-other-method",
    "enum-quant-type",
    "enum-dtype-alias",
    "enum-provider",
    "range-opset",
    "range-top1-agreement",
    "range-max-new-tokens",
    "type-bool-quoted",
    "type-float-for-integer",
    "type-string-for-list",
    "missing-schema-version",
    "missing-source-model",
    "missing-publish-repo",
    "discriminator-unknown",
    "schema-version-unknown",
    "name-uppercase",
    "top-level-list",
]


def validator():
    cls = jsonschema.validators.validator_for(json_schema())
    cls.check_schema(json_schema())
    return cls(json_schema())


def test_the_schema_has_an_id_and_is_the_one_in_docs():
    assert json_schema()["$id"]
    assert json.loads((ROOT / "docs/recipe.schema.json").read_text()) == json_schema(), "run `make schema`"


@pytest.mark.parametrize("path", VALID, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_valid_recipe_passes(path):
    errors = [
        f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator().iter_errors(yaml.safe_load(path.read_text()))
    ]
    assert errors == []


def test_the_shipped_child_recipes_are_valid():
    assert {"onnx-cuda.yaml", "onnx-cpu.yaml"} <= {p.name for p in VALID if "extends" in p.read_text()}


@pytest.mark.parametrize("name", INVALID)
def test_invalid_recipes_are_rejected(name):
    data = yaml.safe_load((ROOT / "tests/recipes/invalid" / f"{name}.yaml").read_text())
    assert not validator().is_valid(data)


def test_a_child_still_may_not_write_unknown_keys_or_bad_values():
    child = {"extends": "_base.yaml", "export": {"provider": "CUDAExecutionProvider"}}
    assert validator().is_valid(child)
    assert not validator().is_valid({**child, "export": {"provider": "cuda"}})
    assert not validator().is_valid({**child, "export": {"provder": "CUDAExecutionProvider"}})
