"""A sentence-transformers source keeps its modules (modules.json, 1_Pooling/, the settings files) in the artifact,
whichever way it was built, so `SentenceTransformer(artifact)` pools and normalizes like the source does."""

from __future__ import annotations

import json

import pytest

from builder.cli import main

pytest.importorskip("sentence_transformers")

SENTENCES = ["A man is eating food.", "The new movie is awesome.", "A cheetah chases its prey across a field."]
ST_FILES = {"modules.json", "config_sentence_transformers.json", "sentence_bert_config.json", "1_Pooling/config.json"}


def build(tmp_path, minilm, name: str, block: str) -> tuple[dict, object]:
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(
        f"schema_version: 1\nname: {name}\nsource:\n  model: {minilm}\n  task: feature-extraction\n"
        f"  dtype: float32\n{block}"
    )
    assert main(["build", str(recipe), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    artifact = tmp_path / "out" / name
    return json.loads((artifact / "manifest.json").read_text()), artifact


def embeddings(folder):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu").encode(SENTENCES, convert_to_tensor=True)


@pytest.mark.parametrize(
    "name, block, path",
    [
        ("st-nf4", "quantize:\n  method: bnb-4bit\n", "stream"),
        ("st-int8", "quantize:\n  method: bnb-8bit\n  dequantize: true\n", "transformers"),
    ],
    ids=["nf4-stream", "int8-transformers"],
)
def test_the_quantized_artifact_loads_with_sentence_transformers_and_embeds_like_the_source(
    name, block, path, minilm, tmp_path
):
    import torch

    manifest, artifact = build(tmp_path, minilm, name, block)
    assert manifest["quantize_path"].startswith(path)
    assert ST_FILES <= set(manifest["files"])
    ours, theirs = embeddings(artifact), embeddings(minilm)
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(SENTENCES)), atol=1e-3)  # 2_Normalize ran
    assert torch.nn.functional.cosine_similarity(ours, theirs).min() > 0.95


def test_the_onnx_export_keeps_the_sentence_transformers_modules(minilm, tmp_path):
    manifest, artifact = build(tmp_path, minilm, "st-onnx", "export:\n  format: onnx\n  exporter: torch\n")
    assert ST_FILES <= set(manifest["files"])
    assert json.loads((artifact / "modules.json").read_text()) == json.loads((minilm / "modules.json").read_text())
