"""The genai exporter (onnxruntime-genai's model builder) on the tiny random Llama: the folder its runtime loads,
the gate's generation through its Generator, how recipe options map onto the model builder, and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.context import BuildContext
from builder.errors import BuildError
from builder.plan import make_plan
from builder.recipe import OnnxExport, load_recipes
from builder.steps import export_genai
from builder.steps.export import choose_exporter, export
from builder.steps.verify_onnx import onnx_metrics

PROMPTS = ("The capital of France is", "def add(a, b):")


def _context(tmp_path: Path, source: Path, export_block: str) -> BuildContext:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"schema_version: 1\nname: tiny-genai\nsource:\n  model: {source}\n  task: text-generation\n"
        f"export:\n  format: onnx\n  exporter: genai\n{export_block}"
    )
    loaded = load_recipes(recipe)[0]
    workdir = tmp_path / "work"
    workdir.mkdir()
    return BuildContext(loaded, make_plan(loaded), workdir, "cpu", source_dir=source)


@pytest.fixture(scope="session")
def tiny_genai(tiny_llama, tmp_path_factory) -> BuildContext:
    ctx = _context(tmp_path_factory.mktemp("tiny-genai"), tiny_llama, "")
    export(ctx)
    return ctx


def test_the_folder_is_one_onnxruntime_genai_loads(tiny_genai):
    import onnxruntime_genai as og

    work = Path(tiny_genai.workdir)
    names = {p.name for p in work.iterdir()}
    assert {"model.onnx", "genai_config.json", "tokenizer.json", "config.json"} <= names
    assert not {n for n in names if n.startswith(".") or n.endswith(".log")}  # its cache and log are gone
    record = tiny_genai.onnx
    assert (record.exporter, record.with_past, record.attention_nodes) == ("genai", True, 2)
    assert record.model_builder == {"precision": "fp32", "execution_provider": "cpu"}
    assert record.inputs[:3] == ["input_ids", "attention_mask", "past_key_values.0.key"]
    assert record.files == [f for f in ("model.onnx", "model.onnx.data") if f in names]
    assert tiny_genai.footprint.artifact_bytes == sum((work / f).stat().st_size for f in record.files)
    assert json.loads((work / "genai_config.json").read_text())["model"]["decoder"]["num_hidden_layers"] == 2
    og.Model(str(work))


def test_gate_generates_through_onnxruntime_genai_like_pytorch(tiny_genai, tiny_llama, monkeypatch):
    calls = []
    generate = export_genai.generate

    def recorded(*args, **kwargs):
        calls.append(args[1])
        return generate(*args, **kwargs)

    monkeypatch.setattr(export_genai, "generate", recorded)
    result = onnx_metrics(
        tiny_genai.workdir,
        tiny_llama,
        task="text-generation",
        provider="CPUExecutionProvider",
        prompts=PROMPTS,
        max_new_tokens=8,
    )
    assert len(calls) == 1 and len(calls[0]) == len(PROMPTS)  # the Generator made the continuations
    metrics = result["metrics"]
    assert metrics["generation_match"] == 1.0
    assert metrics["top1_agreement"] == 1.0
    assert metrics["max_abs_diff"] < 1e-3


def test_recipe_options_map_onto_the_model_builder():
    int4 = OnnxExport(format="onnx", exporter="genai", quantize="int4", quant_algorithm="k_quant", accuracy_level=1)
    assert export_genai.precision(int4) == "int4"
    assert export_genai.builder_options(int4, trust_remote_code=False) == {
        "block_size": "32",
        "accuracy_level": "1",
        "algo_config": "k_quant",
    }
    int8 = OnnxExport(format="onnx", exporter="genai", quantize="int8", block_size=128)
    assert export_genai.builder_options(int8, trust_remote_code=True) == {"block_size": "128", "hf_remote": "true"}
    bf16 = OnnxExport(format="onnx", exporter="genai", dtype="bfloat16", provider="CUDAExecutionProvider")
    assert (export_genai.precision(bf16), export_genai.builder_options(bf16, False)) == ("bf16", {})


def test_genai_refuses_what_the_model_builder_does_not_build():
    spec = OnnxExport(format="onnx", exporter="genai")
    with pytest.raises(BuildError, match=r"builds text-generation decoders, not feature-extraction.*exporter: torch"):
        choose_exporter(spec, "feature-extraction", {"architectures": ["BertModel"]})
    with pytest.raises(BuildError, match=r"model builder does not build GPT2LMHeadModel; use `exporter: torch`"):
        choose_exporter(spec, "text-generation", {"architectures": ["GPT2LMHeadModel"]})
    assert choose_exporter(spec, "text-generation", {"architectures": ["LlamaForCausalLM"]}) == "genai"


@pytest.mark.slow  # the model builder's subprocess imports torch and transformers before it fails: 15-50 s here
def test_a_failing_model_builder_leaves_no_model_and_says_why(tiny_llama, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (broken / name).write_bytes((tiny_llama / name).read_bytes())
    config = json.loads((tiny_llama / "config.json").read_text())
    config["intermediate_size"] *= 2  # the weights no longer fit the config: the model builder cannot load them
    (broken / "config.json").write_text(json.dumps(config))
    ctx = _context(tmp_path, broken, "")
    with pytest.raises(BuildError, match=r"onnxruntime-genai's model builder failed \(exit 1\): .+exporter: torch"):
        export(ctx)
    assert not [p.name for p in Path(ctx.workdir).iterdir()]
