"""The verification gate: an artifact proves, before anyone can publish it, that it still computes what its source
computes.

The reference is the source model at the recipe's dtype (float16 becomes float32 on a CPU); the candidate is the
artifact as a user loads it: the folder reloaded by stock transformers in a fresh process (`builder.steps.metrics`)
or, for an ONNX export, the onnxruntime session on the verification provider (`builder.steps.verify_onnx`). Both
see the same token ids: the recipe's prompts and the built-in evaluation text (builder/data/).

The metrics are compared with thresholds (the per-method defaults below, overridden by `verify.thresholds`); the
report goes to verify-report.json and the manifest. A miss raises `VerificationFailed` naming each metric and by how
much it missed. The thresholds, the report and the evaluation data are `builder.steps.gate`'s.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from builder.context import BuildContext
from builder.errors import BuildError, VerificationFailed
from builder.recipe import Bnb4Bit, Bnb8Bit, Recipe
from builder.steps.gate import (ENCODER_SENTENCES, default_prompts, eval_sentences, eval_text, failure_message, gate,
                                with_overrides, write_report)
from builder.steps.metrics import LATENCY_TOKENS
from builder.steps.verify_onnx import onnx_report

CHUNK_TOKENS = 512  # the evaluation text is scored in chunks of this many tokens (no overlap)
EVAL_TOKENS = 2048  # tokens of the evaluation text scored (SmolLM2: 3,126 in all); keeps a CPU verify under a minute
ENCODER_MAX_TOKENS = 128

# Defaults, from measurements on SmolLM2-135M-Instruct and all-MiniLM-L6-v2 on CPU (docs/recipes.md, "verify", has
# the table): each allows about twice an honest build's distance from the reference (a 135M model loses a lot to
# 4-bit: nf4 agrees on 63% of next tokens), and sits far from a build with shuffled 4-bit blocks (top-1 0.016,
# KL 9.95 nats, perplexity x16,000). The footprint bound comes from the model (`footprint_default`).
_LM_DEFAULTS = {
    "nf4": {"top1_agreement": 0.45, "kl_divergence": 1.5, "perplexity_ratio": 2.5},
    "fp4": {"top1_agreement": 0.40, "kl_divergence": 2.0, "perplexity_ratio": 2.2},
    "int8": {"top1_agreement": 0.75, "kl_divergence": 0.15, "perplexity_ratio": 1.10},
}
_ENCODER_DEFAULTS = {
    "nf4": {"cosine": 0.90},
    "fp4": {"cosine": 0.85},
    "int8": {"cosine": 0.99},
}


def default_thresholds(recipe: Recipe, task: str, source_dir: Path | None = None) -> dict[str, float]:
    """The thresholds a recipe gets before its `verify.thresholds` apply, by method (and quant type) and task; the
    footprint bound from what the plan expects of `source_dir`'s tensors."""
    match recipe.quantize:
        case Bnb4Bit(quant_type=quant_type):
            scheme = quant_type
        case Bnb8Bit():
            scheme = "int8"
        case _:
            raise BuildError(f"recipe {recipe.name} has no bitsandbytes `quantize` block; ONNX exports are verified "
                             "by builder.steps.verify_onnx")
    table = _LM_DEFAULTS if task == "text-generation" else _ENCODER_DEFAULTS
    return dict(table[scheme]) | {"footprint_ratio": footprint_default(recipe, source_dir)}


def footprint_default(recipe: Recipe, source_dir: Path | None) -> float:
    """`plan.footprint_threshold` of the ratio the plan expects: which tensors get quantized at which bits and
    which stay in the load dtype (a model that is mostly embeddings barely shrinks, and passes)."""
    import json

    from builder.checkpoint import local_weight_files, read_header
    from builder.plan import expected_footprint_ratio, footprint_threshold

    expected = None
    if source_dir is not None and (Path(source_dir) / "config.json").is_file():
        config = json.loads((Path(source_dir) / "config.json").read_text(encoding="utf-8"))
        tensors = tuple(t for file in local_weight_files(Path(source_dir)) for t in read_header(file))
        expected = expected_footprint_ratio(recipe, tensors, config)
    return footprint_threshold(expected)


def thresholds_for(recipe: Recipe, task: str, source_dir: Path | None = None) -> dict[str, float]:
    """Defaults overridden by the recipe's `verify.thresholds`; refuses a threshold the task has no metric for."""
    applicable = _LM_GATES if task == "text-generation" else _ENCODER_GATES
    return with_overrides(default_thresholds(recipe, task, source_dir), recipe, applicable, f"a {task} model")


_LM_GATES = ("top1_agreement", "kl_divergence", "perplexity_ratio", "footprint_ratio")
_ENCODER_GATES = ("cosine", "max_abs_diff", "footprint_ratio")


# --- the build step --------------------------------------------------------------------------------------------


def verify(ctx: BuildContext) -> None:
    """Verify the artifact in `ctx.workdir` against `ctx.source_dir` into `ctx.verification` (also written to
    verify-report.json). Raises `VerificationFailed` naming each metric that missed, and by how much."""
    recipe = ctx.loaded.recipe
    assert ctx.source_dir is not None and ctx.task is not None  # set by resolve
    if recipe.export is not None:
        assert ctx.onnx is not None  # set by export
        report = onnx_report(recipe, ctx.onnx, ctx.workdir, ctx.source_dir, ctx.device)
    else:
        report = run_checks(recipe, ctx.task, ctx.source_dir, ctx.workdir, ctx.device)
    write_report(ctx.workdir, report)
    ctx.verification = report
    if not report["passed"]:
        raise VerificationFailed(failure_message(recipe.name, report))


def run_checks(recipe: Recipe, task: str, source_dir: Path, artifact_dir: Path, device: str) -> dict:
    """Reference (source, in this process) vs candidate (artifact, fresh process): the verification report."""
    from transformers import AutoConfig

    from builder.steps import metrics as probes

    started = time.perf_counter()
    thresholds = thresholds_for(recipe, task, source_dir)
    dtype = reference_dtype(recipe.source.dtype, AutoConfig.from_pretrained(source_dir), device)
    inputs = tokenize_inputs(source_dir, task, recipe.verify.prompts)
    model = probes.load_model(str(source_dir), task, dtype, device)
    reference = probes.probe(model, inputs, task, recipe.verify.max_new_tokens, device)
    del model
    reference_seconds = time.perf_counter() - started
    report = {"passed": False, "task": task, "device": device, "provider": None, "metrics": {},
              "thresholds": thresholds, "failures": [], "performance": {}}
    try:
        candidate = run_candidate(artifact_dir, task, dtype, device, inputs, recipe.verify.max_new_tokens)
    except VerificationFailed as error:
        report["failures"] = [{"metric": "loads", "value": None, "threshold": None, "message": str(error)}]
        return report
    measured, details = probes.compare(task, inputs, reference, candidate)
    weight_bytes = sum(p.stat().st_size for p in artifact_dir.glob("*.safetensors"))
    measured |= {"artifact_bytes": weight_bytes, "bits_per_param": 8 * weight_bytes / reference["parameters"]}
    report["metrics"] = {k: _rounded(v) for k, v in measured.items()}
    report["failures"] = gate(measured, thresholds)
    report["passed"] = not report["failures"]
    report["performance"] = _performance(reference, candidate)
    report["performance"]["verification_seconds"] = round(time.perf_counter() - started, 2)
    report["performance"]["reference_seconds"] = round(reference_seconds, 2)
    report["reference"] = {"model": "source", "dtype": dtype}
    report["inputs"] = _describe_inputs(inputs, task, recipe, details)
    return report


def reference_dtype(dtype: str, config, device: str) -> str:
    """The dtype both models run in: the recipe's (`auto`: the checkpoint's), but float32 for float16 on a CPU,
    where float16 matmuls are emulated (slow) and some ops are missing. bfloat16 runs natively on CPUs with
    AVX512-BF16/AMX and correctly (if slower) elsewhere, so it stays."""
    if dtype == "auto":
        found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
        dtype = str(found).removeprefix("torch.")
    if device == "cpu" and dtype == "float16":
        return "float32"
    return dtype


def run_candidate(artifact_dir: Path, task: str, dtype: str, device: str, inputs: dict,
                  max_new_tokens: int) -> dict:
    """Probe the artifact with stock transformers in a fresh Python process; raises `VerificationFailed` when it
    does not load or run there."""
    import torch

    with tempfile.TemporaryDirectory(prefix="builder-verify-") as tmp:
        spec, out = Path(tmp) / "spec.pt", Path(tmp) / "candidate.pt"
        torch.save({"folder": str(artifact_dir), "task": task, "dtype": dtype, "device": device, "inputs": inputs,
                    "max_new_tokens": max_new_tokens}, spec)
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        process = subprocess.run([sys.executable, "-m", "builder.steps.metrics", str(spec), str(out)],
                                 check=False, capture_output=True, text=True, env=env)
        if process.returncode != 0:
            tail = " | ".join(process.stderr.strip().splitlines()[-3:])
            raise VerificationFailed(f"the artifact does not load and run with stock transformers in a fresh process "
                                     f"(exit {process.returncode}): {tail}")
        return torch.load(out, weights_only=True)


def tokenize_inputs(source_dir: Path, task: str, prompts: tuple[str, ...]) -> dict:
    """Token ids for both runs, from the source's tokenizer: the evaluation text in CHUNK_TOKENS chunks and the
    prompts (LMs), or the prompts and ENCODER_SENTENCES sentences of the text, padded (encoders)."""
    from transformers import AutoTokenizer

    from builder.steps import metrics as probes

    try:
        tokenizer = AutoTokenizer.from_pretrained(source_dir)
    except (OSError, ValueError) as error:
        raise BuildError(f"cannot load the tokenizer of {source_dir} to verify the artifact ({error}); the source "
                         "folder needs its tokenizer files") from None
    text = eval_text()
    if task == "text-generation":
        ids = tokenizer(text, return_tensors="pt").input_ids
        latency_ids = ids[:, :probes.LATENCY_TOKENS]
        ids = ids[:, :EVAL_TOKENS]
        chunks = [ids[:, i:i + CHUNK_TOKENS] for i in range(0, ids.shape[1], CHUNK_TOKENS)]
        chunks = [chunk for chunk in chunks if chunk.shape[1] > 1]
        prompt_ids = [tokenizer(p, return_tensors="pt").input_ids for p in prompts or default_prompts()]
        return {"eval_chunks": chunks, "prompts": prompt_ids, "latency_ids": latency_ids}
    sentences = list(prompts) + eval_sentences(ENCODER_SENTENCES)
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=ENCODER_MAX_TOKENS, return_tensors="pt")
    latency_ids = tokenizer(text[:2000], truncation=True, max_length=probes.LATENCY_TOKENS, return_tensors="pt")
    return {"sentences": dict(batch), "latency_ids": latency_ids.input_ids}


def _performance(reference: dict, candidate: dict) -> dict:
    return {
        "reference_latency_ms": round(reference["latency_ms"], 2),
        "candidate_latency_ms": round(candidate["latency_ms"], 2),
        "reference_throughput_tokens_per_s": round(reference["throughput_tokens_per_s"], 1),
        "candidate_throughput_tokens_per_s": round(candidate["throughput_tokens_per_s"], 1),
        "reference_footprint_bytes": reference["footprint_bytes"],
        "candidate_footprint_bytes": candidate["footprint_bytes"],
        "latency_tokens": LATENCY_TOKENS,
    }


def _describe_inputs(inputs: dict, task: str, recipe: Recipe, details: dict) -> dict:
    described = {"eval_text_sha256": hashlib.sha256(eval_text().encode("utf-8")).hexdigest(), **details}
    if task == "text-generation":
        described |= {"eval_tokens": sum(c.shape[1] for c in inputs["eval_chunks"]), "chunk_tokens": CHUNK_TOKENS,
                      "prompts": list(recipe.verify.prompts) or default_prompts(),
                      "max_new_tokens": recipe.verify.max_new_tokens}
    else:
        described |= {"sentences": int(inputs["sentences"]["input_ids"].shape[0]),
                      "prompts": list(recipe.verify.prompts)}
    return described


def _rounded(value):
    return round(value, 6) if isinstance(value, float) else value


