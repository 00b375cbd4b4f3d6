"""The conformance matrix: each architecture family x {nf4+dq, fp4, int8, ONNX fp32} is validated, planned and built
(the gate reloads the artifact from its folder with stock transformers), and does what docs/support.md says:
streamed (byte for byte the transformers path's tensors), the transformers path for the reason given, exported, or
refused with exit 1 and the reason, never an internal error; and every snippet of a built cell's card runs.

The default tier builds a few fast cells that cover each path; `make test-conformance` builds them all.
"""

from __future__ import annotations

import pytest
from families import BY_NAME, FAMILIES, slug
from matrix import METHODS, SUPPORT_TABLE, build_cell, predict, predictions, recipe_file, render

from builder.artifact import WeightShare

DEFAULT_TIER = {
    ("Llama", "nf4-dq"),
    ("GPT-2", "int8"),
    ("BERT", "nf4-dq"),
    ("Mixtral (MoE)", "fp4"),
    ("BERT", "onnx-fp32"),
    ("Falcon", "int8"),
    ("T5", "nf4-dq"),
    ("ViT", "int8"),
    ("Whisper", "onnx-fp32"),
}
CELLS = [
    pytest.param(f.name, m, id=f"{slug(f)}-{m}", marks=() if (f.name, m) in DEFAULT_TIER else pytest.mark.slow)
    for f in FAMILIES
    for m in METHODS
]


def test_the_support_table_is_what_the_code_reports(conformance_root):
    """docs/support.md, recomputed from the plan's refusals, `streamable()` and the exporter's choice."""
    assert SUPPORT_TABLE.read_text(encoding="utf-8") == render(predictions(conformance_root)), (
        "docs/support.md is stale: run `python tests/conformance/matrix.py --build` and commit it"
    )


@pytest.mark.parametrize("name, method", CELLS)
def test_cell(name, method, conformance_root):
    from builder.cli import main

    family = BY_NAME[name]
    source = conformance_root / "sources" / slug(family)
    recipe = recipe_file(family, method, source, conformance_root / "recipes")
    cell = predict(family, method, recipe)
    assert main(["validate", str(recipe)]) == 0
    outcome = build_cell(recipe, conformance_root / "out")
    artifact = conformance_root / "out" / recipe.stem
    if cell.status == "refused":
        assert outcome.exit_code == 1, outcome.stderr
        assert cell.detail in outcome.stderr and not artifact.exists()
        return
    assert outcome.exit_code == 0, outcome.stderr
    manifest = outcome.manifest
    assert manifest["verification"]["passed"] and manifest["files"]
    if method == "onnx-fp32":
        assert manifest["kind"] == "export" and "model.onnx" in manifest["files"]
        return
    # The footprint gate keeps its default: the plan's expected ratio plus the margin.
    assert manifest["verification"]["thresholds"]["footprint_ratio"] < 1.0
    if cell.share:  # a mixture of experts: the share the table shows is the manifest's
        assert WeightShare.model_validate(manifest["weight_share"]).describe() == cell.share
    if cell.status == "transformers":
        assert manifest["quantize_path"] == f"transformers ({cell.detail})"
        return
    assert manifest["quantize_path"] == "stream"
    _same_tensors_as_the_transformers_path(
        recipe, source, artifact, family.task or "text-generation", conformance_root / "transformers" / recipe.stem
    )


@pytest.mark.slow  # `make test-conformance`: after test_cell, whose artifact is then up to date
@pytest.mark.parametrize("name, method", [pytest.param(*cell.values, id=cell.id) for cell in CELLS])
def test_cell_card_snippets_run(name, method, conformance_root):
    """Every snippet of a built cell's card runs as written in a fresh interpreter without builder."""
    from card_snippets import run_card_snippets

    family = BY_NAME[name]
    recipe = recipe_file(family, method, conformance_root / "sources" / slug(family), conformance_root / "recipes")
    if predict(family, method, recipe).status == "refused":
        pytest.skip("the build is refused: no card")
    outcome = build_cell(recipe, conformance_root / "out")
    assert outcome.exit_code == 0, outcome.stderr
    assert run_card_snippets(conformance_root / "out" / recipe.stem)


def _same_tensors_as_the_transformers_path(recipe_path, source, artifact, task, reference) -> None:
    from stream_compare import differences, transformers_build

    from builder.recipe import load_recipes

    [loaded] = load_recipes(recipe_path)
    transformers_build(loaded.recipe, source, reference, task=task)
    assert differences(artifact, reference) == []
