"""SmolLM2-135M-Instruct as int4 through the genai exporter (onnxruntime-genai's model builder), end to end through
`builder build`: the folder onnxruntime-genai's runtime loads, its manifest, the gate, and the card's code run as
written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from builder.cli import main

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "smollm2" / "onnx-int4-genai.yaml"


@pytest.fixture(scope="module")
def artifact(smollm2, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("genai")
    assert main(["build", str(RECIPE), "--out", str(out), "--device", "cpu"]) == 0
    return out / "smollm2-135m-instruct-onnx-int4-genai"


def test_int4_build_is_the_model_builders_graph_with_its_config(artifact, capsys):
    manifest = json.loads((artifact / "manifest.json").read_text())
    capsys.readouterr()
    assert main(["plan", str(RECIPE), "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)[0]["expected_artifact_bytes"]
    assert abs(manifest["onnx"]["model_bytes"] / expected - 1) < 0.1  # the embedding table is int4 too
    on_disk = {p.relative_to(artifact).as_posix() for p in artifact.rglob("*") if p.is_file()}  # .eval_results/ too
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "chat_template.jinja"} <= on_disk
    assert set(manifest["files"]) == on_disk - {"manifest.json"}
    record = manifest["onnx"]
    assert (record["exporter"], record["attention_nodes"]) == ("genai", 30)  # one GroupQueryAttention a layer
    assert record["nodes"] < 400  # the torch exporter's int4 graph has ~2,200
    assert record["model_bytes"] < 100 * 2**20
    assert record["quantization"] == {"method": "int4", "block_size": 32, "algorithm": "rtn"}
    report = manifest["verification"]
    assert report["passed"], report["failures"]
    assert report["metrics"]["top1_agreement"] >= report["thresholds"]["top1_agreement"]


def test_the_cards_code_generates_with_onnxruntime_genai(artifact, capsys):
    card = (artifact / "README.md").read_text()
    code = re.search(r"With `onnxruntime_genai`.*?```python\n(.*?)```", card, re.S).group(1)
    code = re.sub(r'snapshot_download\("[^"]+"\)', repr(str(artifact)), code).replace("max_length=256", "max_length=24")
    exec(compile(code, "card", "exec"), {})  # noqa: S102 - the card's snippet, as a user would paste it
    assert len(capsys.readouterr().out.split()) >= 5  # int4 SmolLM2 continues with words (not "Paris", though)
