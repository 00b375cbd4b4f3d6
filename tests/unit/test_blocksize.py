"""Issue 31: `quantize.blocksize` for bitsandbytes 4-bit. The streaming quantizer writes it; `plan` refuses a size
that does not divide every quantized layer's input size (bitsandbytes' CPU kernel cannot load such an artifact) and
a size other than 64 on a build that cannot be streamed (transformers' BitsAndBytesConfig has no blocksize)."""

from __future__ import annotations

from pathlib import Path

import pytest

# SmolLM2-135M's Linear layers as (out, in): q/o_proj, k/v_proj, gate/up_proj, down_proj.
SMOLLM2_LAYERS = [(576, 576), (192, 576), (1536, 576), (576, 1536)]


def _recipe(folder: Path, source: Path, quantize: str, name: str = "bs") -> Path:
    recipe = folder / f"{name}.yaml"
    recipe.write_text(
        f"schema_version: 1\nname: {name}\nsource: {{model: {source}}}\nquantize: {quantize}\n", encoding="utf-8"
    )
    return recipe


@pytest.mark.parametrize("blocksize", [128, 256, 4096])
def test_plan_refuses_a_blocksize_that_smollm2s_shapes_cannot_take(blocksize, smollm2, tmp_path, capsys):
    from builder.cli import main

    recipe = _recipe(tmp_path, smollm2, f"{{method: bnb-4bit, blocksize: {blocksize}}}")
    assert main(["plan", str(recipe)]) == 1
    error = capsys.readouterr().err
    assert f"{recipe}:4:" in error and "quantize.blocksize: " in error
    assert f"{blocksize} does not divide the input size of every quantized layer" in error
    assert error.rstrip().endswith("use 32 or 64")


def test_plan_refuses_a_blocksize_the_transformers_path_would_drop(smollm2, tmp_path, capsys):
    from builder.cli import main

    recipe = _recipe(tmp_path, smollm2, "{method: bnb-4bit, blocksize: 32, dequantize: true}")
    assert main(["plan", str(recipe)]) == 1
    error = capsys.readouterr().err
    assert f"{recipe}:4:" in error
    assert "only the streaming quantizer writes a blocksize other than 64" in error
    assert "`dequantize: true` needs the quantized model in memory" in error
    assert main(["plan", str(_recipe(tmp_path, smollm2, "{method: bnb-4bit, dequantize: true}", "b"))]) == 0


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
def test_the_plans_rule_is_bitsandbytes_cpu_packing(blocksize, smollm2, tmp_path):
    """What `plan` accepts for SmolLM2 is exactly what bitsandbytes' CPU kernel (AVX512-BF16) can repack."""
    import torch
    from bitsandbytes.functional import _convert_weight_packed_for_cpu, quantize_4bit

    from builder.plan import make_plan
    from builder.recipe import load_recipes

    def packs(out: int, inputs: int) -> bool:
        packed, state = quantize_4bit(torch.randn(out, inputs), blocksize=blocksize, quant_type="nf4")
        try:
            _convert_weight_packed_for_cpu(packed, state)
        except (RuntimeError, AssertionError):
            return False
        return True

    try:
        make_plan(load_recipes(_recipe(tmp_path, smollm2, f"{{method: bnb-4bit, blocksize: {blocksize}}}"))[0])
        accepted = True
    except Exception as error:
        assert type(error).__name__ == "RecipeError"
        accepted = False
    assert accepted == all(packs(out, inputs) for out, inputs in SMOLLM2_LAYERS)


def _context(recipe_file: Path, workdir: Path):
    from builder.context import BuildContext
    from builder.plan import make_plan
    from builder.recipe import load_recipes
    from builder.steps.load import resolve

    loaded = load_recipes(recipe_file)[0]
    ctx = BuildContext(loaded, make_plan(loaded), workdir, "cpu", device_map={"": "cpu"})
    resolve(ctx)
    return ctx


def test_the_streaming_quantizer_writes_the_blocksize_and_stock_transformers_reads_it(tiny_llama, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from builder.steps.quantize import quantize

    ctx = _context(_recipe(tmp_path, tiny_llama, "{method: bnb-4bit, blocksize: 32}"), tmp_path / "work")
    ctx.workdir.mkdir()
    quantize(ctx)
    assert ctx.quantize_path == "stream"
    assert ctx.quantized_layers is not None and ctx.quantized_layers.bits_per_param > 5  # 4 + 32/32, plus maps
    model = AutoModelForCausalLM.from_pretrained(ctx.workdir, device_map={"": "cpu"})
    state = model.model.layers[0].self_attn.q_proj.weight.quant_state
    assert (state.blocksize, state.absmax.numel()) == (32, 64 * 64 // 32)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.slow
def test_a_blocksize_32_build_passes_its_gate_and_reloads_in_stock_transformers(tiny_llama, tmp_path):
    import json

    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from builder.cli import main

    recipe = _recipe(tmp_path, tiny_llama, "{method: bnb-4bit, blocksize: 32}", "tiny-bs32")
    assert main(["build", str(recipe), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    artifact = tmp_path / "out" / "tiny-bs32"
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["verification"]["passed"] is True
    assert manifest["recipe"]["quantize"]["blocksize"] == 32
    assert manifest["quantize_path"] == "stream"
    assert "| `quantize.blocksize` | `32` |" in (artifact / "README.md").read_text()
    with safe_open(artifact / "model.safetensors", "pt") as weights:  # one absmax per 32 weights of a 64x64 layer
        assert weights.get_slice("model.layers.0.self_attn.q_proj.weight.absmax").get_shape() == [64 * 64 // 32]
    model = AutoModelForCausalLM.from_pretrained(artifact, device_map={"": "cpu"})
    assert model.model.layers[0].self_attn.q_proj.weight.quant_state.blocksize == 32
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_the_transformers_path_refuses_a_blocksize_it_cannot_write(tiny_llama, tmp_path, monkeypatch):
    from builder.errors import BuildError
    from builder.steps import quantize as quantize_module

    ctx = _context(_recipe(tmp_path, tiny_llama, "{method: bnb-4bit, blocksize: 32}"), tmp_path / "work")
    monkeypatch.setattr(quantize_module, "streamable", lambda recipe, source_dir: "a model-level reason")
    with pytest.raises(BuildError, match="blocksize 32 is written by the streaming quantizer only.*a model-level"):
        quantize_module.quantize(ctx)


def test_the_report_names_a_blocksize_other_than_the_default():
    from builder.report import _method

    four_bit = {"method": "bnb-4bit", "quant_type": "nf4", "double_quant": False}
    assert _method({"quantize": four_bit | {"blocksize": 32}}) == "bnb-4bit nf4 blocksize 32"
    assert _method({"quantize": four_bit | {"blocksize": 64}}) == "bnb-4bit nf4"
    assert _method({"quantize": four_bit}) == "bnb-4bit nf4"  # a manifest from before the field
