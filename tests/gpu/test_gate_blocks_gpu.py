"""The gate block by block on a CUDA GPU: SmolLM2 nf4 and int8, whole vs one decoder block at a time under a cap
smaller than the model, and `builder build --max-gpu-memory` end to end.

Skipped without CUDA (`make test-gpu` on a GPU host).
"""

from __future__ import annotations

import json

import pytest

from builder.cli import main
from builder.recipe import Recipe
from builder.steps import references
from builder.steps.verify import run_checks

pytestmark = pytest.mark.gpu

CAP = 250 << 20  # SmolLM2 is 270 MB in bf16: its reference runs block by block under it, with room for the logits


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(references.CACHE_ENV, str(tmp_path / "cache"))


@pytest.mark.parametrize(
    "quantize",
    [{"method": "bnb-4bit", "quant_type": "nf4", "double_quant": True}, {"method": "bnb-8bit"}],
    ids=["nf4-dq", "int8"],
)
def test_block_by_block_on_the_gpu_gives_the_whole_models_metrics(smollm2, tmp_path, quantize):
    import yaml

    spec = {
        "schema_version": 1,
        "name": "smol",
        "source": {"model": str(smollm2), "dtype": "bfloat16"},
        "quantize": quantize,
        "verify": {"max_new_tokens": 8},
    }
    (tmp_path / "smol.yaml").write_text(yaml.safe_dump(spec))
    assert (
        main(["build", str(tmp_path / "smol.yaml"), "--out", str(tmp_path / "out"), "--device", "cuda", "--quiet"]) == 0
    )
    recipe, artifact = Recipe.model_validate(spec), tmp_path / "out" / "smol"
    whole = run_checks(recipe, "text-generation", smollm2, artifact, "cuda", use_cache=False)
    blocks = run_checks(recipe, "text-generation", smollm2, artifact, "cuda", use_cache=False, max_device_memory=CAP)
    assert blocks["reference"]["forward"] == "blocks" and whole["reference"]["forward"] == "whole"
    assert blocks["reference"]["device_peak_bytes"] < whole["reference"]["device_peak_bytes"]
    m, w = blocks["metrics"], whole["metrics"]
    assert m["top1_agreement"] == pytest.approx(w["top1_agreement"], abs=2e-3)  # GPU kernels may reorder sums
    for key in ("kl_divergence_mean", "perplexity_ratio"):
        assert m[key] == pytest.approx(w[key], rel=1e-2)


def test_build_under_max_gpu_memory_verifies_block_by_block(smollm2, tmp_path):
    recipe = tmp_path / "smol.yaml"
    recipe.write_text(
        f"schema_version: 1\nname: smol\nsource:\n  model: {smollm2}\n  dtype: bfloat16\n"
        "quantize:\n  method: bnb-4bit\n  quant_type: nf4\n"
    )
    assert (
        main(
            [
                "build",
                str(recipe),
                "--out",
                str(tmp_path / "out"),
                "--device",
                "cuda",
                "--quiet",
                "--max-gpu-memory",
                "250MiB",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "out" / "smol" / "verify-report.json").read_text())
    assert report["passed"] and report["reference"]["forward"] == "blocks"
    assert report["reference"]["device_peak_bytes"] <= CAP and report["candidate"]["forward"] == "whole"
