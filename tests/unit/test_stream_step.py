"""`stream_quantize` as a build step: same files' tensors and the same manifest records as the quantize step."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_compare import differences


def _context(recipe_file: Path, workdir: Path):
    from builder.recipe import load_recipes
    from builder.pipeline import BuildContext
    from builder.plan import make_plan
    from builder.steps.load import resolve

    loaded = load_recipes(recipe_file)[0]
    ctx = BuildContext(loaded, make_plan(loaded), None, workdir, "cpu")
    ctx.record["device_map"] = {"": "cpu"}
    resolve(ctx)
    return ctx


@pytest.mark.parametrize("quantize", ["{method: bnb-4bit, quant_type: nf4, double_quant: true}",
                                      "{method: bnb-8bit}"])
def test_stream_step_records_what_the_quantize_step_records(quantize, tiny_llama, tmp_path):
    from builder.steps.quantize import quantize as quantize_step
    from builder.steps.stream import stream_quantize

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(f"schema_version: 1\nname: tiny\nsource: {{model: {tiny_llama}}}\nquantize: {quantize}\n")
    streamed = _context(recipe, tmp_path / "stream")
    stream_quantize(streamed)
    reference = _context(recipe, tmp_path / "transformers")
    quantize_step(reference)
    assert differences(streamed.workdir, reference.workdir) == []
    assert sorted(p.name for p in streamed.workdir.iterdir()) == sorted(p.name for p in reference.workdir.iterdir())
    for key in ("footprint", "quantized_layers", "bits_per_param"):
        assert streamed.record[key] == reference.record[key], key
    assert streamed.record["quantize_path"] == "stream"
