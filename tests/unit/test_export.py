"""The ONNX export step on the tiny random Llama: layout and names, KV-cache generation, exporter choice, provider
checks and the errors a user sees (opset, task, missing provider), each leaving no model behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from builder.context import BuildContext
from builder.errors import BuildError
from builder.plan import make_plan
from builder.recipe import load_recipes
from builder.steps import ort
from builder.steps.export import choose_exporter, export
from builder.steps.verify_onnx import onnx_metrics

PROMPTS = ("The capital of France is", "def add(a, b):")


def default_thresholds(task: str, dtype: str = "float32", quantize: str = "none") -> dict[str, float]:
    """The gate's default bounds for an ONNX export of `task` (a recipe without overrides)."""
    from builder.kinds import KINDS, thresholds
    from builder.recipe import Recipe

    recipe = Recipe.model_validate(
        {
            "schema_version": 1,
            "name": "x",
            "source": {"model": "/nowhere"},
            "export": {"format": "onnx", "dtype": dtype, "quantize": quantize},
        }
    )
    return thresholds(KINDS["onnx"], recipe, task, None)


def _context(tmp_path: Path, source: Path, export_block: str, task: str = "text-generation") -> BuildContext:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"schema_version: 1\nname: tiny-onnx\nsource:\n  model: {source}\n  task: {task}\n"
        f"export:\n  format: onnx\n{export_block}"
    )
    loaded = load_recipes(recipe)[0]
    workdir = tmp_path / "work"
    workdir.mkdir()
    return BuildContext(loaded, make_plan(loaded), workdir, "cpu", source_dir=source)


@pytest.fixture(scope="session")
def tiny_with_past(tiny_llama, tmp_path_factory) -> BuildContext:
    ctx = _context(tmp_path_factory.mktemp("tiny-past"), tiny_llama, "  exporter: torch\n  with_past: true\n")
    export(ctx)
    return ctx


def test_decoder_with_past_has_optimums_layout_and_names(tiny_with_past):
    import onnx

    work = Path(tiny_with_past.workdir)
    assert {"model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in work.iterdir()}
    assert not (work / "model.onnx_data").exists()  # a few MB: one file, as optimum writes it
    onnx.checker.check_model(str(work / "model.onnx"))
    record = tiny_with_past.onnx
    past = [f"past_key_values.{i}.{kind}" for i in range(2) for kind in ("key", "value")]
    assert record.inputs == ["input_ids", "attention_mask", "position_ids", *past]
    assert record.outputs == ["logits", *[name.replace("past_key_values", "present") for name in past]]
    assert (record.exporter, record.provider, record.verified_on) == (
        "torch",
        "CPUExecutionProvider",
        "CPUExecutionProvider",
    )
    assert record.target_checked is True
    assert tiny_with_past.footprint.artifact_bytes == (work / "model.onnx").stat().st_size


def test_decoder_with_past_generates_like_pytorch(tiny_with_past, tiny_llama):
    result = onnx_metrics(
        tiny_with_past.workdir,
        tiny_llama,
        task="text-generation",
        provider="CPUExecutionProvider",
        prompts=PROMPTS,
        max_new_tokens=8,
    )
    metrics = result["metrics"]
    assert metrics["generation_match"] == 1.0
    assert metrics["top1_agreement"] == 1.0
    assert metrics["max_abs_diff"] < 1e-3
    assert set(result["outputs"]) == {"logits", *[f"present.{i}.{k}" for i in range(2) for k in ("key", "value")]}
    assert result["performance"]["candidate_latency_ms"] > 0


def test_cache_continues_from_an_empty_past(tiny_with_past, tiny_llama):
    """One step with an empty cache then one token with the returned cache equals the full sequence at once."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(Path(tiny_with_past.workdir) / "model.onnx"))
    shape = (1, 2, 0, 16)  # tiny Llama: 2 key/value heads of 16
    past_names = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")]

    def run(ids, past, offset):
        feed = {
            "input_ids": np.array([ids]),
            "attention_mask": np.ones((1, offset + len(ids)), np.int64),
            "position_ids": np.arange(offset, offset + len(ids))[None],
        }
        feed.update(past or {n: np.zeros(shape, np.float32) for n in past_names})
        return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))

    whole = run([5, 6, 7, 8], None, 0)
    first = run([5, 6, 7], None, 0)
    step = run([8], {n: first[n.replace("past_key_values", "present")] for n in past_names}, 3)
    np.testing.assert_allclose(step["logits"][0, -1], whole["logits"][0, -1], atol=1e-4)


def test_decoder_without_past_has_no_cache_inputs(tiny_llama, tmp_path):
    ctx = _context(tmp_path, tiny_llama, "  exporter: torch\n")
    export(ctx)
    assert ctx.onnx.inputs == ["input_ids", "attention_mask", "position_ids"]
    assert ctx.onnx.outputs == ["logits"]
    metrics = onnx_metrics(
        ctx.workdir,
        tiny_llama,
        task="text-generation",
        provider="CPUExecutionProvider",
        prompts=PROMPTS[:1],
        max_new_tokens=4,
    )["metrics"]
    assert metrics["generation_match"] == 1.0


@pytest.fixture(scope="session")
def tiny_classifier(minilm, tmp_path_factory) -> Path:
    """A random 2-layer BERT sequence classifier (3 labels) with MiniLM's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-bert-classifier")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(folder)
    return folder


def test_text_classification(tiny_classifier, tmp_path):
    ctx = _context(tmp_path, tiny_classifier, "  optimize: O2\n", task="text-classification")
    export(ctx)
    assert ctx.onnx.inputs == ["input_ids", "attention_mask", "token_type_ids"]
    assert ctx.onnx.outputs == ["logits"]
    metrics = onnx_metrics(
        ctx.workdir,
        tiny_classifier,
        task="text-classification",
        provider="CPUExecutionProvider",
        prompts=["A fine day.", "Terrible, awful weather today."],
    )
    assert metrics["metrics"]["top1_agreement"] == 1.0
    assert metrics["metrics"]["max_abs_diff"] < 1e-4
    assert set(metrics["outputs"]) == {"logits"}


def test_auto_picks_genai_for_a_language_model_it_builds_else_torch_without_optimum_onnx(tiny_llama, tmp_path):
    ctx = _context(tmp_path, tiny_llama, "  exporter: auto\n")
    spec, config = ctx.loaded.recipe.export, ctx.plan.source.config
    assert choose_exporter(spec, "text-generation", config) == "genai"
    assert choose_exporter(spec, "feature-extraction", config) == "torch"
    optimized = spec.model_copy(update={"optimize": "O2"})
    assert choose_exporter(optimized, "text-generation", config) == "torch"


def test_auto_records_why_a_language_model_did_not_take_the_genai_exporter(tiny_llama, tmp_path):
    ctx = _context(tmp_path, tiny_llama, "  optimize: O1\n")
    export(ctx)
    assert ctx.onnx.exporter == "torch"
    assert ctx.onnx.genai_fallback == (
        "export.optimize: the genai exporter writes an already fused graph; remove `optimize` (or set none)"
    )


def test_opset_below_18_is_refused_for_the_torch_exporter(tiny_llama, tmp_path):
    ctx = _context(tmp_path, tiny_llama, "  exporter: torch\n  opset: 17\n")
    with pytest.raises(BuildError, match=r"opset 17 is too low for the torch exporter .*needs opset 18"):
        export(ctx)
    assert list(Path(ctx.workdir).iterdir()) == []


def test_optimum_exporter_without_optimum_onnx_says_how_to_get_it(tiny_llama, tmp_path):
    ctx = _context(tmp_path, tiny_llama, "  exporter: optimum\n")
    with pytest.raises(BuildError, match=r"needs optimum-onnx.*transformers < 4.58"):
        export(ctx)
    assert list(Path(ctx.workdir).iterdir()) == []


def test_task_the_torch_exporter_cannot_export(tiny_llama, tmp_path):
    ctx = _context(tmp_path, tiny_llama, "  exporter: torch\n", task="question-answering")
    with pytest.raises(BuildError, match=r"does not export task 'question-answering'.*exporter: optimum"):
        export(ctx)
    assert list(Path(ctx.workdir).iterdir()) == []


def test_architecture_without_the_tasks_head(tiny_llama, tmp_path):
    ctx = _context(tmp_path, tiny_llama, "  exporter: torch\n", task="fill-mask")
    with pytest.raises(BuildError, match=r"cannot be loaded for task 'fill-mask'.*set `source.task`"):
        export(ctx)
    assert list(Path(ctx.workdir).iterdir()) == []


def test_missing_provider_fails_with_the_reason_and_no_artifact(tiny_llama, tmp_path):
    ctx = _context(tmp_path, tiny_llama, "  provider: CUDAExecutionProvider\n  dtype: float16\n")
    with pytest.raises(
        BuildError,
        match=r"cannot verify on CUDAExecutionProvider: this onnxruntime build "
        r"\(onnxruntime\) lacks CUDAExecutionProvider; pip install onnxruntime-gpu",
    ):
        export(ctx)
    assert not (Path(ctx.workdir) / "model.onnx").exists()
    assert ctx.onnx is None


def test_rocm_needs_onnxruntimes_rocm_build(tiny_with_past):
    problem = ort.provider_problem("ROCMExecutionProvider", Path(tiny_with_past.workdir) / "model.onnx")
    assert "lacks ROCMExecutionProvider" in problem and "ROCm build" in problem


def test_gpu_package_listing_cuda_on_a_cpu_host_is_not_a_pass(tiny_with_past, monkeypatch):
    """onnxruntime-gpu on a host without a GPU lists CUDA yet runs on the CPU: the session's first provider decides."""
    import onnxruntime

    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    model = Path(tiny_with_past.workdir) / "model.onnx"
    assert ort.provider_problem("CUDAExecutionProvider", model) == (
        "no CUDA GPU is visible, so onnxruntime fell back to CPUExecutionProvider"
    )
    with pytest.raises(BuildError, match="cannot verify on CUDAExecutionProvider: no CUDA GPU is visible"):
        ort.place("CUDAExecutionProvider", None, model)


def test_float16_for_tensorrt_verified_on_cpu(tiny_llama, tmp_path):
    """float16 weights with float32 inputs and outputs; TensorRT is absent, so `verify_on` places it on the CPU
    and the record says so."""
    import onnx

    ctx = _context(
        tmp_path,
        tiny_llama,
        "  with_past: true\n  dtype: float16\n  provider: TensorrtExecutionProvider\n"
        "  verify_on: CPUExecutionProvider\n",
    )
    export(ctx)
    record = ctx.onnx
    assert (record.provider, record.verified_on, record.target_checked) == (
        "TensorrtExecutionProvider",
        "CPUExecutionProvider",
        False,
    )
    assert "lacks TensorrtExecutionProvider" in record.fallback_reason
    json.dumps(record.model_dump(mode="json"))  # goes into manifest.json
    model = onnx.load(str(Path(ctx.workdir) / "model.onnx"))
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    io_types = {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]} & float_types
    weights = {t.data_type for t in model.graph.initializer} & float_types
    assert io_types == {onnx.TensorProto.FLOAT}
    assert weights == {onnx.TensorProto.FLOAT16}
    metrics = onnx_metrics(
        ctx.workdir,
        tiny_llama,
        task="text-generation",
        provider="CPUExecutionProvider",
        prompts=PROMPTS,
        max_new_tokens=4,
    )["metrics"]
    assert metrics["top1_agreement"] >= default_thresholds("text-generation", "float16")["top1_agreement"]


def test_default_thresholds_tighten_with_precision():
    fp32 = default_thresholds("feature-extraction")
    int8 = default_thresholds("feature-extraction", "float32", "dynamic-int8")
    assert fp32["cosine"] > int8["cosine"] and "max_abs_diff" not in int8
    assert default_thresholds("text-generation")["generation_match"] == 1.0
    assert "generation_match" not in default_thresholds("text-generation", "float16")


def test_graph_past_the_protobuf_limit_goes_to_model_onnx_data(tiny_with_past, tmp_path, monkeypatch):
    """optimum's layout for big graphs: tensors in one model.onnx_data beside model.onnx; checker and onnxruntime
    read it through the path."""
    import onnx
    import onnxruntime

    monkeypatch.setattr(ort, "PROTOBUF_LIMIT", 1024)
    target = tmp_path / "model.onnx"
    ort.save(ort.load(Path(tiny_with_past.workdir) / "model.onnx"), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx_data"]
    assert target.stat().st_size < (tmp_path / "model.onnx_data").stat().st_size
    onnx.checker.check_model(str(target))
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    assert session.get_providers()[0] == "CPUExecutionProvider"


@pytest.mark.parametrize(
    ("method", "operator"), [("int4", "MatMulNBits"), ("nf4", "MatMulBnb4"), ("fp4", "MatMulBnb4")]
)
def test_weight_only_4bit_decoder_runs_in_plain_onnxruntime(tiny_llama, tmp_path, capsys, method, operator):
    """int4 (MatMulNBits) and nf4/fp4 (MatMulBnb4) replace every linear layer's MatMul; the graph with its KV cache
    runs in a plain onnxruntime session and stays close to the float32 source. The quantizers print nothing to
    stdout, which is `builder build --json`'s (int4's RTN prints a progress bar there)."""
    import onnx

    ctx = _context(tmp_path, tiny_llama, f"  exporter: torch\n  with_past: true\n  quantize: {method}\n")
    export(ctx)
    assert "Progress" not in capsys.readouterr().out
    record = ctx.onnx.quantization
    ops = [node.op_type for node in onnx.load(str(ctx.workdir / "model.onnx")).graph.node]
    assert record["method"] == method and record["quantized_nodes"] == ops.count(operator) >= 2 * 7
    assert "MatMul" not in ops or ops.count("MatMul") < ops.count(operator)  # attention's MatMuls stay float
    metrics = onnx_metrics(
        ctx.workdir,
        tiny_llama,
        task="text-generation",
        provider="CPUExecutionProvider",
        prompts=PROMPTS[:1],
        max_new_tokens=4,
    )["metrics"]
    assert metrics["top1_agreement"] > 0.5 and metrics["kl_divergence_mean"] < 1.0


def test_a_passing_onnx_text_generation_report_prints_its_generation_bound():
    # `builder build` prints this summary after a build; the ONNX bound on greedy generation once crashed it.
    from builder.gates import check
    from builder.steps.gate import format_summary
    from builder.verification import VerificationReport

    thresholds = default_thresholds("text-generation")
    metrics = {"max_abs_diff": 1e-3, "top1_agreement": 1.0, "kl_divergence_mean": 1e-6, "generation_match": 1.0}
    report = {"passed": True, "task": "text-generation", "device": "cpu", "thresholds": thresholds, "metrics": metrics}
    summary = format_summary(VerificationReport.model_validate(report | {"failures": [], "performance": {}}))
    assert "    generation_match        1.000  >= 1.000" in summary.splitlines()
    missed = check(metrics | {"generation_match": 0.5}, thresholds)
    assert [failure["metric"] for failure in missed] == ["generation_match"]
