"""bench/onnx_gpu.py end to end on the small shapes, on CPUExecutionProvider: the code the GPU run takes, except the
provider. Two `builder build`s with their gates, then every contender: 38-41 s on 2 idle cores, 68 s on a cold
first run, hence slow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_small_cpu_run_measures_every_contender(tmp_path):
    results = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "onnx_gpu.py"), "--small", "--device", "cpu", "--runs", "3"]
        + ["--decode-runs", "2", "--dir", str(tmp_path), "--json", str(results)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    data = json.loads(results.read_text())
    assert "| PyTorch fp16 eager (sdpa) |" in done.stdout  # the Markdown table

    encoder, decoder = data["encoder"], data["decoder"]
    for part in (encoder, decoder):
        build = part["build"]
        assert build["exit_code"] == 0 and build["error"] is None
        assert build["gate"]["passed"] and build["gate"]["provider"] == "CPUExecutionProvider"
        assert build["gate"]["target_provider"] == "CUDAExecutionProvider"  # the GPU recipe, verified on the CPU
        assert build["graph_bytes"] > 0
    assert encoder["build"]["export"]["optimization"]["level"] == "O4"
    assert decoder["build"]["export"]["quantization"]["operator"] == "MatMulNBits"

    assert set(encoder["contenders"]) == {"torch", "ort"}
    for name, contender in encoder["contenders"].items():
        assert contender["error"] is None, name
        for batch in (1, 32):
            assert contender[f"batch_{batch}"]["median_ms"] > 0 and contender[f"batch_{batch}"]["runs"] == 3
    assert encoder["contenders"]["ort"]["provider"] == "CPUExecutionProvider"
    assert encoder["ort_vs_torch_batch_1"]["cosine"] > 0.99
    assert set(encoder["speedup"]) == {"batch_1", "batch_32"}

    contenders = decoder["contenders"]
    assert set(contenders) == {"bnb", "ort", "ort_gate_loop"}
    for name, contender in contenders.items():
        assert contender["error"] is None, name
        assert contender["generate_s"] > 0 and len(contender["tokens"]) == 64
    for name in ("bnb", "ort"):
        assert contenders[name]["prefill"]["median_ms"] > 0 and contenders[name]["decode_tokens_per_s"] > 0
    assert contenders["ort"]["provider"] == contenders["ort_gate_loop"]["provider"] == "CPUExecutionProvider"
    assert contenders["ort"]["tokens"] == contenders["ort_gate_loop"]["tokens"]
    assert contenders["bnb"]["weights_bytes"] > 0 and decoder["build"]["graph_bytes"] > 0
    assert set(decoder["speedup"]) == {"ort", "ort_gate_loop"}
    assert data["versions"]["onnxruntime"] and data["machine"]["cpus"]
