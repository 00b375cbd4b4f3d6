"""The quantize step's two paths (streamed, transformers) write the same files' tensors and record the same sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
from stream_compare import differences


def _context(recipe_file: Path, workdir: Path):
    from builder.context import BuildContext
    from builder.plan import make_plan
    from builder.recipe import load_recipes
    from builder.steps.load import resolve

    loaded = load_recipes(recipe_file)[0]
    ctx = BuildContext(loaded, make_plan(loaded), workdir, "cpu", device_map={"": "cpu"})
    resolve(ctx)
    return ctx


@pytest.mark.parametrize("quantize", ["{method: bnb-4bit, quant_type: nf4, double_quant: true}", "{method: bnb-8bit}"])
def test_stream_path_records_what_the_transformers_path_records(quantize, tiny_llama, tmp_path, monkeypatch):
    from builder.steps import quantize as quantize_module

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(f"schema_version: 1\nname: tiny\nsource: {{model: {tiny_llama}}}\nquantize: {quantize}\n")
    streamed = _context(recipe, tmp_path / "stream")
    streamed.workdir.mkdir()
    quantize_module.quantize(streamed)
    monkeypatch.setattr(quantize_module, "stream_plan", lambda recipe, source_dir, task: "forced by the test")
    reference = _context(recipe, tmp_path / "transformers")
    quantize_module.quantize(reference)
    assert differences(streamed.workdir, reference.workdir) == []
    assert sorted(p.name for p in streamed.workdir.iterdir()) == sorted(p.name for p in reference.workdir.iterdir())
    assert streamed.footprint == reference.footprint
    assert streamed.quantized_layers == reference.quantized_layers
    assert (streamed.quantize_path, reference.quantize_path) == ("stream", "transformers (forced by the test)")
