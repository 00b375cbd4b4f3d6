"""ONNX on a CUDA host (`make test-gpu`, with the `onnx-gpu` extra): all-MiniLM-L6-v2 in float16 with O4 fusions,
verified on CUDAExecutionProvider itself (no `verify_on` fallback)."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.pipeline import build_file

pytestmark = pytest.mark.gpu


def test_minilm_float16_on_cuda(minilm, tmp_path):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.fail("this GPU host has onnxruntime without CUDA: pip install -e '.[onnx-gpu]' (instead of [onnx])")
    recipe = tmp_path / "minilm-cuda.yaml"
    recipe.write_text(
        f"schema_version: 1\nname: minilm-onnx-cuda-gpu\nsource:\n  model: {minilm}\n"
        "  task: feature-extraction\n  dtype: float32\nexport:\n  format: onnx\n"
        "  provider: CUDAExecutionProvider\n  dtype: float16\n  optimize: O4\n"
    )
    manifest = build_file(recipe, out=tmp_path / "out", device="cuda")[0].manifest
    record = manifest["onnx"]
    assert (record["verified_on"], record["target_checked"], record["fallback_reason"]) == (
        "CUDAExecutionProvider",
        True,
        None,
    )
    report = manifest["verification"]
    assert report["passed"], report["failures"]
    assert report["provider"] == "CUDAExecutionProvider"
    assert report["metrics"]["cosine_min"] >= 0.999
    assert record["model_bytes"] < 50_000_000  # float16: half of the 90 MB float32 graph
    assert Path(tmp_path / "out" / "minilm-onnx-cuda-gpu" / "model.onnx").is_file()
