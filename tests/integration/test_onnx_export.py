"""ONNX builds of real weights on CPU, end to end through `builder build`: all-MiniLM-L6-v2 (feature-extraction;
float32 + O2, dynamic int8, and the CUDA recipe verified on the CPU) and SmolLM2-135M-Instruct (text-generation
with the KV cache).

The shipped recipes build into the shared folder that `make test-interop` loads with optimum (BUILDER_INTEROP_DIR,
default artifacts/.interop/), once per session; there they are then "up to date".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
import pytest

from builder.cli import main
from builder.pipeline import build_file

REPO = Path(__file__).resolve().parents[2]
MINILM_LAYOUT = {
    "model.onnx",
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
    "manifest.json",
    "verify-report.json",
    "recipe.lock.yaml",
    "README.md",
}


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return Path(os.environ.get("BUILDER_INTEROP_DIR", REPO / "artifacts" / ".interop"))


@pytest.fixture(scope="session")
def built(shared_dir, minilm, smollm2):
    """recipe file -> manifest of its artifact, built (forced) once per session."""
    manifests: dict[str, dict] = {}

    def get(recipe: str) -> dict:
        if recipe not in manifests:
            manifests[recipe] = build_file(REPO / recipe, out=shared_dir, device="cpu", force=True)[
                0
            ].manifest.to_json()
        return manifests[recipe]

    return get


def _recipe(tmp_path: Path, source: Path, export: str, name: str = "minilm-onnx-test") -> Path:
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(
        f"schema_version: 1\nname: {name}\nsource:\n  model: {source}\n  task: feature-extraction\n"
        f"  dtype: float32\nexport:\n  format: onnx\n{export}"
    )
    return recipe


def test_minilm_cpu_build(built, shared_dir):
    manifest = built("recipes/minilm/onnx-cpu.yaml")
    folder = shared_dir / manifest["name"]
    assert MINILM_LAYOUT <= {p.name for p in folder.iterdir()}
    onnx.checker.check_model(str(folder / "model.onnx"))
    record = manifest["onnx"]
    assert record["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert record["outputs"] == ["last_hidden_state"]
    assert record["optimization"]["level"] == "O2" and record["optimization"]["fused_operators"]
    assert (record["verified_on"], record["target_checked"]) == ("CPUExecutionProvider", True)
    report = manifest["verification"]
    assert report["passed"] and report["provider"] == "CPUExecutionProvider"
    assert report["metrics"]["cosine_min"] >= report["thresholds"]["cosine"] == 0.9999
    assert report["metrics"]["max_abs_diff"] < 1e-3
    assert report["performance"]["candidate_latency_ms"] > 0
    assert manifest["library_name"] == "onnx"
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json"}  # 1_Pooling/config.json included


def test_minilm_dynamic_int8_is_smaller_and_keeps_its_embeddings(built, minilm, tmp_path):
    fp32 = built("recipes/minilm/onnx-cpu.yaml")
    int8 = build_file(_recipe(tmp_path, minilm, "  quantize: dynamic-int8\n"), out=tmp_path / "out", device="cpu")[0]
    record, report = int8.manifest.onnx, int8.manifest.verification
    assert record is not None and report is not None
    assert record.quantization is not None and record.quantization["method"] == "dynamic-int8"
    assert record.model_bytes < fp32["onnx"]["model_bytes"] / 3
    assert report.passed and report.metrics["cosine_min"] >= report.thresholds["cosine"] == 0.97
    ops = {node.op_type for node in onnx.load(str(int8.path / "model.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} & ops


def test_cuda_recipe_on_a_cpu_host_is_verified_on_cpu_and_says_so(built, shared_dir):
    manifest = built("recipes/minilm/onnx-cuda.yaml")
    record = manifest["onnx"]
    assert (record["provider"], record["verified_on"], record["target_checked"]) == (
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
        False,
    )
    assert "CUDAExecutionProvider" in record["fallback_reason"]
    assert record["optimization"]["float16"] is True
    graph = onnx.load(str(shared_dir / manifest["name"] / "model.onnx")).graph
    assert {t.data_type for t in graph.initializer} & {onnx.TensorProto.FLOAT16}
    assert manifest["verification"]["passed"]
    assert manifest["verification"]["metrics"]["cosine_min"] >= 0.999


def test_missing_provider_fails_before_export_with_the_reason(minilm, tmp_path, capsys):
    recipe = _recipe(tmp_path, minilm, "  provider: CUDAExecutionProvider\n  dtype: float16\n", "minilm-cuda-here")
    assert main(["build", str(recipe), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 1
    error = capsys.readouterr().err
    assert "cannot verify on CUDAExecutionProvider: this onnxruntime build (onnxruntime) lacks" in error
    assert "export.verify_on: CPUExecutionProvider" in error
    assert not (tmp_path / "out" / "minilm-cuda-here").exists()


@pytest.mark.slow  # 2 min on 2 cores; CI's `make test-interop` builds the same recipe and generates from it
def test_smollm2_with_past_build(built, shared_dir):
    manifest = built("recipes/smollm2/onnx-cpu.yaml")
    folder = shared_dir / manifest["name"]
    onnx.checker.check_model(str(folder / "model.onnx"))
    record = manifest["onnx"]
    assert record["inputs"][:4] == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key"]
    assert len(record["inputs"]) == 3 + 2 * 30 and len(record["outputs"]) == 1 + 2 * 30
    assert record["outputs"][-1] == "present.29.value"
    assert {"generation_config.json", "tokenizer.json", "config.json"} <= {p.name for p in folder.iterdir()}
    report = manifest["verification"]
    assert report["passed"], report["failures"]
    assert report["metrics"]["generation_match"] == 1.0
    assert report["metrics"]["top1_agreement"] >= 0.99
    assert json.loads((folder / "verify-report.json").read_text())["metrics"] == report["metrics"]


def test_the_minilm_cards_snippets_run_as_written(built, shared_dir):
    from card_snippets import run_card_snippets

    [embeddings, optimum] = run_card_snippets(shared_dir / built("recipes/minilm/onnx-cpu.yaml")["name"])
    assert embeddings and embeddings.startswith("(2, 384)"), embeddings
    assert optimum is None or optimum == ""  # optimum-onnx is not in this environment: make test-interop runs it


@pytest.mark.slow  # the with-past build above
def test_the_smollm2_cards_greedy_loop_answers(built, shared_dir):
    from card_snippets import run_card_snippets

    [answer, _optimum] = run_card_snippets(shared_dir / built("recipes/smollm2/onnx-cpu.yaml")["name"])
    assert answer and "Paris" in answer, answer


def test_manifest_is_the_recorded_one(built):
    from golden import differences

    assert differences(built("recipes/minilm/onnx-cpu.yaml"), "all-minilm-l6-v2-onnx-cpu") == []
