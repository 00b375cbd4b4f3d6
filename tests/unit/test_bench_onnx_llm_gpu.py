"""bench/onnx_llm_gpu.py end to end on the llama-tiny shape with --device cpu: the code the GPU run takes (checkpoint,
builder's genai build with its gate, the stock model builder, bitsandbytes nf4, the turns), on the CPU providers.
About 3.5 minutes on the shared 2-core host, hence slow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_cpu_run_measures_every_contender(tmp_path):
    results = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "onnx_llm_gpu.py"), "--shape", "llama-tiny", "--device", "cpu"]
        + ["--runs", "1", "--dir", str(tmp_path / "work"), "--json", str(results)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    data = json.loads(results.read_text())
    assert (data["shape"], data["layers"], data["device"]) == ("llama-tiny", 2, "cpu")
    assert data["onnxruntime"]["onnxruntime_genai_loaded"]  # the onnxruntime library onnxruntime-genai runs on

    found = data["results"]
    assert set(found) == {"builder-genai", "stock", "bnb-nf4"}
    for name, result in found.items():
        assert "error" not in result, (name, result)
        assert result["decode_tok_s"] > 0 and result["prefill_ms"] > 0 and len(result["first_tokens"]) == 8
    genai, stock = found["builder-genai"], found["stock"]
    assert genai["gate_passed"] and genai["gate_provider"] == "CPUExecutionProvider"
    assert genai["device_type"] == stock["device_type"] == "CPU"
    # builder's genai exporter runs the stock model builder with the same options: the same graph and tokens.
    assert (genai["nodes"], genai["attention_nodes"]) == (stock["nodes"], stock["attention_nodes"]) == (33, 2)
    assert genai["first_tokens"] == stock["first_tokens"]
    assert set(data["ratios"]) == {
        "builder_genai_vs_stock",
        "builder_genai_vs_bnb_nf4_decode",
        "stock_vs_bnb_nf4_decode",
    }
    assert data["ratios"]["builder_genai_vs_stock"]["file"] == 1.0
