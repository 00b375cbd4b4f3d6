"""Defaults derived from the model: the footprint bound from the plan, the compute-dtype warning, file modes."""

from __future__ import annotations

import json
import shutil
import stat

import pytest

from builder.cli import main
from builder.kinds.base import footprint_threshold
from builder.plan import make_plan
from builder.recipe import Recipe, load_recipes


def write(folder, model, name: str, quantize: str, verify: str = "verify:\n  max_new_tokens: 4\n"):
    recipe = folder / f"{name}.yaml"
    recipe.write_text(
        f"schema_version: 1\nname: {name}\nsource:\n  model: {model}\n  dtype: bfloat16\nquantize:\n{quantize}{verify}"
    )
    return recipe


def test_the_footprint_bound_follows_the_model_and_stays_below_a_build_that_quantized_nothing():
    assert footprint_threshold(0.30) == pytest.approx(0.35)
    assert 0.98 < footprint_threshold(0.98) < 1.0  # halfway to 1.0, not past it
    assert footprint_threshold(None) < 1.0


def test_plan_expects_a_large_vocabulary_model_to_barely_shrink(tiny_llama, tmp_path, capsys):
    """tiny_llama is mostly its 49152x64 embedding table: nf4 leaves ~98% of its memory in place."""
    recipe = write(tmp_path, tiny_llama, "tiny", "  method: bnb-4bit\n  compute_dtype: bfloat16\n")
    [plan] = [make_plan(loaded) for loaded in load_recipes(recipe)]
    assert 0.95 < plan.expected_footprint_ratio < 0.99
    assert main(["plan", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert f"footprint:   ~{plan.expected_footprint_ratio:.4f}x the source" in out
    assert f"footprint_ratio <= {footprint_threshold(plan.expected_footprint_ratio)}" in out


def test_a_large_vocabulary_model_passes_nf4_with_the_default_footprint_bound(tiny_llama, tmp_path):
    """The old constant (0.60) failed this build: the embeddings stay bfloat16. The derived bound passes it, the
    card shows the expected ratio, and the artifact's files are readable by all (save_file makes them 0600)."""
    recipe = write(tmp_path, tiny_llama, "tiny-nf4", "  method: bnb-4bit\n  compute_dtype: bfloat16\n")
    out = tmp_path / "artifacts"
    assert main(["build", str(recipe), "--out", str(out), "--device", "cpu"]) == 0
    manifest = json.loads((out / "tiny-nf4" / "manifest.json").read_text())
    thresholds = manifest["verification"]["thresholds"]
    assert 0.95 < thresholds["footprint_ratio"] < 1.0
    assert manifest["verification"]["metrics"]["footprint_ratio"] > 0.60
    expected = manifest["footprint"]["expected_ratio"]
    assert manifest["verification"]["metrics"]["footprint_ratio"] == pytest.approx(expected, abs=0.005)
    assert f"expected footprint ratio (from the plan): {expected:.4f}" in (out / "tiny-nf4" / "README.md").read_text()
    assert "warnings" not in manifest


def test_a_build_that_quantized_nothing_fails_the_default_footprint_bound(tiny_llama, tmp_path):
    """The source folder itself as the 'artifact': ratio 1.0, above the derived bound."""
    from builder.steps.verify import run_checks

    recipe = Recipe.model_validate(
        {
            "schema_version": 1,
            "name": "x",
            "source": {"model": str(tiny_llama), "dtype": "bfloat16"},
            "quantize": {"method": "bnb-4bit"},
            "verify": {"max_new_tokens": 4},
        }
    )
    artifact = tmp_path / "unquantized"
    shutil.copytree(tiny_llama, artifact)
    report = run_checks(recipe, "text-generation", tiny_llama, artifact, "cpu")
    assert not report["passed"]
    assert [f["metric"] for f in report["failures"]] == ["footprint_ratio"]
    assert report["metrics"]["footprint_ratio"] == pytest.approx(1.0)


def test_a_compute_dtype_other_than_the_load_dtype_is_warned_in_plan_build_and_card(tiny_llama, tmp_path, capsys):
    recipe = write(tmp_path, tiny_llama, "tiny-int8-fp32", "  method: bnb-4bit\n  compute_dtype: float32\n")
    assert main(["plan", str(recipe)]) == 0
    warning = (
        "quantize.compute_dtype is float32 but the model loads in bfloat16 (source.dtype): the 4-bit "
        "matmuls cast every activation; set `quantize.compute_dtype: bfloat16`"
    )
    assert f"warning: {warning}" in capsys.readouterr().out
    out = tmp_path / "artifacts"
    assert main(["build", str(recipe), "--out", str(out), "--device", "cpu"]) == 0
    assert f"warning: {warning}" in capsys.readouterr().err
    artifact = out / "tiny-int8-fp32"
    assert warning in json.loads((artifact / "manifest.json").read_text())["warnings"][0]
    assert "## Warnings" in (artifact / "README.md").read_text() and warning in (artifact / "README.md").read_text()


def test_no_warning_when_compute_dtype_matches_what_config_json_loads(tiny_llama):
    recipe = Recipe.model_validate(
        {
            "schema_version": 1,
            "name": "x",
            "source": {"model": str(tiny_llama)},
            "quantize": {"method": "bnb-4bit", "compute_dtype": "bfloat16"},
        }
    )
    from builder.plan import compute_dtype_warning

    config = json.loads((tiny_llama / "config.json").read_text())
    assert compute_dtype_warning(recipe, config, ()) is None
    float32 = recipe.model_copy(update={"quantize": recipe.quantize.model_copy(update={"compute_dtype": "float32"})})
    assert "loads in bfloat16 (config.json)" in compute_dtype_warning(float32, config, ())


def test_int8_artifact_files_are_readable_by_all(tiny_llama, tmp_path):
    """int8 of a model the streaming quantizer cannot take goes through save_pretrained (safetensors' save_file
    writes 0600); every artifact file gets the mode of a plain open under the umask."""
    import os

    recipe = write(tmp_path, tiny_llama, "tiny-int8", "  method: bnb-8bit\n  dequantize: true\n")
    out = tmp_path / "artifacts"
    assert main(["build", str(recipe), "--out", str(out), "--device", "cpu"]) == 0
    manifest = json.loads((out / "tiny-int8" / "manifest.json").read_text())
    assert manifest["quantize_path"].startswith("transformers")
    umask = os.umask(0)
    os.umask(umask)
    for path in (out / "tiny-int8").rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o777 if path.is_dir() else 0o666) & ~umask, path.name
