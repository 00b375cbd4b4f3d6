"""The provider placement report: which execution provider ran how many nodes of each op type in the gate's
onnxruntime session, the rule that fails a GPU build whose compute-heavy nodes ran on the CPU, and where the report
goes (verification report, manifest, card)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.artifact import parse_manifest
from builder.card import render_card
from builder.context import BuildContext
from builder.errors import ArtifactError
from builder.plan import make_plan
from builder.recipe import load_recipes
from builder.steps import ort, placement
from builder.steps.export import export
from builder.steps.gate import failure_message, format_report
from builder.steps.verify_onnx import onnx_report
from builder.verification import NodePlacement, VerificationReport

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
PROMPT = "The capital of France is"


def _exported(folder: Path, source: Path, export_block: str) -> BuildContext:
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        f"schema_version: 1\nname: tiny-placement\nsource:\n  model: {source}\n  task: text-generation\n"
        f"export:\n  format: onnx\n  exporter: torch\n  with_past: true\n{export_block}"
        f"verify:\n  prompts: ['{PROMPT}']\n  max_new_tokens: 2\n"
    )
    loaded = load_recipes(recipe)[0]
    workdir = folder / "work"
    workdir.mkdir()
    ctx = BuildContext(loaded, make_plan(loaded), workdir, "cpu", source_dir=source)
    export(ctx)
    return ctx


@pytest.fixture(scope="module")
def tiny_for_cuda(tiny_llama, tmp_path_factory) -> BuildContext:
    """The tiny Llama exported for CUDA and, this being a CPU host, verified on the CPU (`export.verify_on`)."""
    return _exported(
        tmp_path_factory.mktemp("placement"),
        tiny_llama,
        f"  provider: {CUDA}\n  verify_on: {CPU}\n",
    )


def _feed(model: Path) -> dict:
    """The tiny decoder's inputs for three tokens with an empty cache."""
    import numpy as np
    import onnx

    feed: dict = {}
    for value in onnx.load(str(model), load_external_data=False).graph.input:
        if value.name.startswith("past_key_values."):
            feed[value.name] = np.zeros((1, 2, 0, 16), np.float32)  # 2 KV heads of 64 / 4
        else:
            feed[value.name] = np.arange(3, dtype=np.int64)[None] + (value.name == "input_ids")
    return feed


def test_the_sessions_nodes_on_cpu_are_counted_by_op_type(tiny_for_cuda):
    """The exported decoder in a CPU session: every node on CPUExecutionProvider; model.onnx's 19 MatMuls (2 layers x
    7 projections, the LM head, 2 x 2 attention products) as MatMul or, where onnxruntime's own optimizations fused
    a scale into them, FusedMatMul; fewer nodes in all than model.onnx has."""
    import onnx

    model = Path(tiny_for_cuda.workdir) / ort.MODEL_FILE
    options = placement.profiling_options()
    session = ort.session(model, CPU, options)
    measured = placement.measure(session, _feed(model), CPU)
    assert not Path(options.profile_file_prefix).parent.exists()  # the profile and its folder are gone
    assert measured.measured_on == CPU
    assert list(measured.nodes) == [CPU]
    ops = measured.nodes[CPU]
    graph_ops = [node.op_type for node in onnx.load(str(model)).graph.node]
    assert ops.get("MatMul", 0) + ops.get("FusedMatMul", 0) == graph_ops.count("MatMul")
    assert {"Softmax", "Gather"} <= set(ops)
    assert sum(ops.values()) < len(graph_ops)  # counted after the session's optimizations, not model.onnx's nodes
    assert placement.failures(measured) == []
    session.run(None, _feed(model))  # profiling has ended: later runs (the gate's latency) are not profiled
    assert session.end_profiling() == ""
    with pytest.raises(ValueError, match="created with placement.profiling_options"):
        placement.measure(ort.session(model, CPU), _feed(model), CPU)


def test_a_cuda_session_that_falls_back_to_the_cpu_fails_naming_matmul(tiny_for_cuda):
    """On this CPU host the CUDA provider has no kernel for any op, so a session asked for CUDA then CPU runs every
    node on the CPU: the placement of a graph whose ops the target lacks. Measured for CUDA, it fails the gate,
    naming the compute-heavy op types and counts; Softmax and Gather, which are small, are not named."""
    import onnxruntime

    model = Path(tiny_for_cuda.workdir) / ort.MODEL_FILE
    with pytest.warns(UserWarning, match="CUDAExecutionProvider"):
        session = onnxruntime.InferenceSession(str(model), placement.profiling_options(), providers=[CUDA, CPU])
    measured = placement.measure(session, _feed(model), CUDA)
    assert list(measured.nodes) == [CPU]
    ops = measured.nodes[CPU]
    heavy = ops["MatMul"] + ops.get("FusedMatMul", 0)  # attention's scaled Q.K^T fuses into FusedMatMul
    [failure] = placement.failures(measured)
    assert (failure["metric"], failure["value"], failure["threshold"]) == ("placement", heavy, 0)
    message = failure["message"]
    assert f"{heavy} compute-heavy node(s) ran on {CPU}, not {CUDA}: MatMul x{ops['MatMul']}" in message
    assert "Softmax" not in message and "Gather" not in message
    assert "OperatorKernels.md" in message and "target CPUExecutionProvider" in message
    report = {"passed": False, "task": "text-generation", "device": "cuda", "failures": [failure]}
    shown = failure_message("tiny-placement", VerificationReport.model_validate(report | _NO_METRICS))
    assert message in shown and "relax the named thresholds" not in shown  # no threshold changes a placement


def test_shape_arithmetic_on_the_cpu_of_a_gpu_session_passes():
    """onnxruntime keeps shape computations on the CPU in a CUDA session on purpose: reported, not a failure."""
    measured = NodePlacement(
        measured_on=CUDA,
        nodes={CUDA: {"MatMul": 15, "Softmax": 2}, CPU: {"Shape": 4, "Gather": 3, "Concat": 2}},
    )
    assert placement.failures(measured) == []
    [failure] = placement.failures(measured.model_copy(update={"nodes": {CPU: {"Gemm": 1, "Shape": 4}}}))
    assert (
        "1 compute-heavy node(s) ran on CPUExecutionProvider, not CUDAExecutionProvider: Gemm x1"
        in (failure["message"])
    )


def test_count_nodes_counts_each_node_once_and_only_kernel_events():
    events = [
        {"cat": "Session", "name": "model_run", "args": {}},
        {"cat": "Node", "name": "body/MatMul_0_kernel_time", "args": {"provider": CUDA, "op_name": "MatMul"}},
        {"cat": "Node", "name": "body/MatMul_0_kernel_time", "args": {"provider": CUDA, "op_name": "MatMul"}},
        {"cat": "Node", "name": "Loop_1_kernel_time", "args": {"provider": CPU, "op_name": "Loop"}},
        {"cat": "Node", "name": "Loop_1_fence_before", "args": {"op_name": "Loop"}},
    ]
    assert placement.count_nodes(events) == {CPU: {"Loop": 1}, CUDA: {"MatMul": 1}}


def test_a_cuda_target_verified_on_the_cpu_reports_the_cpu_placement_and_passes(tiny_for_cuda, tiny_llama):
    """`export.verify_on: CPUExecutionProvider` for a CUDA target runs on the CPU by design: the report says the
    placement was measured there, the gate does not fail it, and the card says it is not the target's."""
    report = onnx_report(tiny_for_cuda.loaded.recipe, tiny_for_cuda.onnx, tiny_for_cuda.workdir, tiny_llama, "cpu")
    assert (report["provider"], report["target_provider"]) == (CPU, CUDA)
    measured = NodePlacement.model_validate(report["placement"])
    assert measured.measured_on == CPU and list(measured.nodes) == [CPU] and measured.nodes[CPU]["MatMul"] > 0
    assert not [f for f in report["failures"] if f["metric"] == "placement"]
    assert f"nodes by provider (session on {CPU}):" in format_report(VerificationReport.model_validate(report))

    resolved = tiny_for_cuda.loaded.recipe.model_dump(mode="json")
    manifest = parse_manifest(
        json.dumps(_manifest(report, resolved, tiny_for_cuda.onnx.model_dump(mode="json"))), "manifest.json"
    )
    assert manifest.placement == measured
    card = render_card(manifest)
    assert f"onnxruntime session on `{CPU}`" in card
    assert f"The target, `{CUDA}`, could not run on the build host" in card
    assert f"| {CPU} | {sum(measured.nodes[CPU].values())} | {measured.op_types(CPU)} |" in card


def test_a_manifest_with_a_malformed_placement_is_refused():
    placed = {"measured_on": CPU, "nodes": {CPU: {"MatMul": "many"}}}
    report = {"passed": True, "task": "text-generation", "device": "cpu", "placement": placed} | _NO_METRICS
    report["failures"] = []
    with pytest.raises(ArtifactError, match=r"verification\.placement\.nodes\.CPUExecutionProvider\.MatMul: "):
        parse_manifest(json.dumps(_manifest(report)), "manifest.json")


_RECIPE = {
    "schema_version": 1,
    "name": "tiny-placement",
    "source": {"model": "org/tiny", "task": "text-generation"},
    "export": {"format": "onnx", "provider": CUDA, "verify_on": CPU},
}


_NO_METRICS = {"metrics": {}, "thresholds": {}, "performance": {}}


def _manifest(report: dict, recipe: dict = _RECIPE, onnx: dict | None = None) -> dict:
    return {
        "manifest_version": 1,
        "name": "tiny-placement",
        "build_hash": "0" * 16,
        "kind": "export",
        "recipe": recipe,
        "recipe_files": ["recipe.yaml"],
        "source": {"model": "org/tiny", "revision": "0" * 40, "task": "text-generation"},
        "versions": {"builder": "0"},
        "device": "cpu",
        "built_at": "2026-12-03T00:00:00Z",
        "timings": {},
        "footprint": None,
        "bits_per_param": None,
        "library_name": "onnx",
        "verification": report,
        "onnx": onnx,
    }
