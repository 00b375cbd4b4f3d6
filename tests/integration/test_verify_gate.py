"""The verification gate on real weights: honest bitsandbytes builds of SmolLM2-135M-Instruct and all-MiniLM-L6-v2
pass with the default thresholds, and an artifact broken on purpose fails with a message naming the metric.

The artifacts are built directly with transformers (BitsAndBytesConfig -> from_pretrained -> save_pretrained, the
save before any forward pass), once per method per session; the gate is the real `builder.steps.verify.verify`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from builder.context import BuildContext
from builder.errors import VerificationFailed
from builder.plan import make_plan
from builder.recipe import load_recipes
from builder.steps.verify import verify

TASKS = {"smollm2": "text-generation", "minilm": "feature-extraction"}
QUANTIZE = {
    "nf4": "  method: bnb-4bit\n  quant_type: nf4\n  double_quant: true\n  compute_dtype: bfloat16\n",
    "fp4": "  method: bnb-4bit\n  quant_type: fp4\n  compute_dtype: bfloat16\n",
    "int8": "  method: bnb-8bit\n",
}


def _bnb_config(method: str, dtype):
    from transformers import BitsAndBytesConfig

    if method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method,
        bnb_4bit_use_double_quant=method == "nf4",
        bnb_4bit_compute_dtype=dtype,
    )


@pytest.fixture(scope="session")
def bnb_artifact(smollm2, minilm, tmp_path_factory):
    """(model, method) -> (source folder, artifact folder), built the first time a test asks."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    sources = {"smollm2": smollm2, "minilm": minilm}
    built: dict[tuple[str, str], tuple[Path, Path]] = {}

    def get(model: str, method: str) -> tuple[Path, Path]:
        if (model, method) not in built:
            source = sources[model]
            folder = tmp_path_factory.mktemp(f"{model}-{method}")
            model_class, dtype = (
                (AutoModelForCausalLM, torch.bfloat16) if model == "smollm2" else (AutoModel, torch.float32)
            )
            quantized = model_class.from_pretrained(
                source, dtype=dtype, device_map="cpu", quantization_config=_bnb_config(method, dtype)
            )
            quantized.save_pretrained(folder)
            AutoTokenizer.from_pretrained(source).save_pretrained(folder)
            built[(model, method)] = (source, folder)
        return built[(model, method)]

    return get


def context(model: str, method: str, source: Path, artifact: Path, tmp_path: Path) -> BuildContext:
    """A BuildContext as the pipeline hands it to the verify step, for a recipe written into tmp_path."""
    dtype = "bfloat16" if model == "smollm2" else "float32"
    prompts = (
        '["The capital of France is", "Write a haiku about the sea."]'
        if model == "smollm2"
        else '["A man is eating food.", "The new movie is awesome."]'
    )
    recipe_file = tmp_path / f"{model}-{method}.yaml"
    recipe_file.write_text(
        f"schema_version: 1\nname: {model}-{method}\nsource:\n  model: {source}\n"
        f"  task: {TASKS[model]}\n  dtype: {dtype}\nquantize:\n{QUANTIZE[method]}"
        f"verify:\n  prompts: {prompts}\n  max_new_tokens: 16\n"
    )
    loaded = load_recipes(recipe_file)[0]
    return BuildContext(loaded, make_plan(loaded), artifact, "cpu", source_dir=source)


def run_gate(bnb_artifact, model: str, method: str, tmp_path: Path) -> dict:
    source, artifact = bnb_artifact(model, method)
    started = time.perf_counter()
    ctx = context(model, method, source, artifact, tmp_path)
    verify(ctx)
    assert ctx.verification is not None
    report = ctx.verification.to_json()  # as verify-report.json holds it
    print(f"{model} {method}: verified in {time.perf_counter() - started:.1f} s: {json.dumps(report['metrics'])}")
    return report


def test_honest_smollm2_nf4_passes(bnb_artifact, tmp_path):
    report = run_gate(bnb_artifact, "smollm2", "nf4", tmp_path)
    assert report["passed"], report["failures"]
    assert report["metrics"]["perplexity_ratio"] > 1.0  # 4-bit costs something: the comparison is not vacuous
    assert 4 < report["metrics"]["bits_per_param"] < 8  # tied 49152x576 bf16 embedding stays unquantized
    assert report["performance"]["candidate_footprint_bytes"] < report["performance"]["reference_footprint_bytes"]


def shuffle_quantized_blocks(artifact: Path, layers: range) -> list[str]:
    """Shuffle the 32-byte blocks (64 packed 4-bit weights) of the MLP weights of `layers`, in place; returns the
    tensors changed. Sizes, dtypes and quantization state stay valid: the file still loads."""
    import torch
    from safetensors.torch import load_file, save_file

    file = artifact / "model.safetensors"
    tensors = load_file(file)
    generator = torch.Generator().manual_seed(0)
    changed = []
    for layer in layers:
        for name in (f"model.layers.{layer}.mlp.up_proj.weight", f"model.layers.{layer}.mlp.down_proj.weight"):
            blocks = tensors[name].reshape(-1, 32)
            tensors[name] = blocks[torch.randperm(blocks.shape[0], generator=generator)].reshape(tensors[name].shape)
            changed.append(name)
    save_file(tensors, file, metadata={"format": "pt"})
    return changed


def test_a_broken_artifact_fails_the_gate_naming_the_metrics(bnb_artifact, tmp_path):
    source, honest = bnb_artifact("smollm2", "nf4")
    broken = tmp_path / "broken"
    shutil.copytree(honest, broken)
    assert len(shuffle_quantized_blocks(broken, range(0, 30, 5))) == 12
    with pytest.raises(VerificationFailed) as failed:
        verify(context("smollm2", "nf4", source, broken, tmp_path))
    message = str(failed.value)
    assert "smollm2-nf4: verification failed on cpu:" in message
    for metric in ("top1_agreement", "kl_divergence_mean", "perplexity_ratio"):
        assert f"  {metric} " in message and "missed by" in message
    report = json.loads((broken / "verify-report.json").read_text())  # kept for --keep-failed
    assert report["passed"] is False
    assert {f["metric"] for f in report["failures"]} >= {"top1_agreement", "kl_divergence_mean"}


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_honest_minilm_passes(bnb_artifact, tmp_path, method):
    report = run_gate(bnb_artifact, "minilm", method, tmp_path)
    assert report["passed"], report["failures"]
    assert report["metrics"]["cosine_min"] <= report["metrics"]["cosine_mean"] < 1.0
    assert report["inputs"]["sentences"] == 34


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fp4", "int8"])
def test_honest_smollm2_fp4_and_int8_pass(bnb_artifact, tmp_path, method):
    report = run_gate(bnb_artifact, "smollm2", method, tmp_path)
    assert report["passed"], report["failures"]
