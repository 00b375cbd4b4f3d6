"""What the verification gate compares for an ONNX export: the graph on onnxruntime vs the PyTorch source.

`onnx_metrics` runs both on the same inputs and returns numbers; `onnx_report` turns them into the verification
report with `builder.steps.gate` (thresholds: `default_thresholds`, overridden by the recipe's `verify.thresholds`).
The verification provider is the one the export step placed the graph on (the export record's `verified_on`); the
session on it also reports which provider ran which nodes (`builder.steps.placement`), and a GPU provider that left
compute-heavy nodes to the CPU fails the gate.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from builder.gates import check
from builder.kinds import kind_of, thresholds
from builder.recipe import Recipe
from builder.steps import export_genai, ort, placement
from builder.steps.export import load_source
from builder.tasks import family
from builder.verification import REPORT_VERSION, OnnxRecord


def onnx_report(recipe: Recipe, placed: OnnxRecord, model_dir: Path, source_dir: Path, device: str) -> dict:
    """The verification report of the ONNX export in `model_dir` (the shape `builder.steps.verify` writes), whose
    export record is `placed`.

    Compares on `placed.verified_on` with the recipe's prompts (else the built-in ones; encoders also embed
    `ENCODER_SENTENCES` sentences of the evaluation text), and records the session's node placement; compute-heavy
    nodes on the CPU in a session for a GPU provider are a failure (`placement.failures`)."""
    task = placed.task
    bounds = thresholds(kind_of(recipe), recipe, task, None)
    prompts = family(task).onnx_prompts(recipe.verify.prompts)
    started = time.perf_counter()
    result = onnx_metrics(
        model_dir,
        source_dir,
        task=task,
        provider=placed.verified_on,
        prompts=prompts,
        max_new_tokens=recipe.verify.max_new_tokens,
        device=device,
    )
    metrics = result["metrics"]
    failures = check(metrics, bounds)
    for failure in failures:
        if failure["metric"] == "generation_match":
            failure["message"] += ": greedy generation through the graph differs from PyTorch generate"
    failures += placement.failures(result["placement"])
    performance = result["performance"] | {"verification_seconds": round(time.perf_counter() - started, 2)}
    return {
        "report_version": REPORT_VERSION,
        "passed": not failures,
        "task": task,
        "device": device,
        "provider": placed.verified_on,
        "target_provider": placed.provider,
        "placement": result["placement"].model_dump(),
        "metrics": {k: float(f"{v:.6g}") for k, v in metrics.items()},
        "thresholds": bounds,
        "failures": failures,
        "performance": performance,
        "outputs": result["outputs"],
        "reference": {"model": "source", "dtype": "float32"},
        "inputs": {"prompts": prompts, "max_new_tokens": recipe.verify.max_new_tokens},
    }


def onnx_metrics(
    model_dir: Path,
    source_dir: Path,
    *,
    task: str,
    provider: str,
    prompts: Sequence[str] = (),
    max_new_tokens: int = 16,
    device: str = "cpu",
) -> dict:
    """Compare the ONNX graph in `model_dir` (run on `provider`) with the PyTorch source in `source_dir`.

    Returns `{"metrics": {...}, "outputs": {...}, "performance": {...}, "placement": NodePlacement, "provider":
    provider}`:
    - metrics, for every task: `max_abs_diff` and `relative_error` (largest over the graph's outputs; relative error
      is ||onnx - torch|| / ||torch||); feature-extraction adds `cosine_min` (lowest cosine similarity of
      mean-pooled embeddings over the prompts); classifiers add `top1_agreement`; text-generation adds
      `top1_agreement` and `kl_divergence_mean` (teacher-forced on PyTorch's greedy continuation, per position)
      and `generation_match` (share of prompts
      whose greedy generation through the graph, with the KV cache when it has one, equals PyTorch `generate`);
    - outputs: per graph output, `max_abs_diff` and `relative_error`;
    - performance: median latency of one forward pass, `reference_latency_ms` (PyTorch on `device`) and
      `candidate_latency_ms` (onnxruntime on `provider`), and their ratio `speedup`;
    - placement: the nodes each provider ran in the session, from one profiled run on the first prompt.
    Raises `BuildError` when the session does not run on `provider`.
    """
    import torch
    from transformers import AutoTokenizer

    model_dir, source_dir = Path(model_dir), Path(source_dir)
    if not prompts:
        raise ValueError("onnx_metrics needs at least one prompt")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    reference = load_source(source_dir, task, torch.float32, device)
    # The session comes last and its profiled run first: a session that never ends its profiling writes the file
    # when it is destroyed, after `measure` could delete it.
    session = ort.session(model_dir / ort.MODEL_FILE, provider, placement.profiling_options())
    tasks = family(task)
    measured = placement.measure(session, tasks.onnx_feed(session, reference, tokenizer, prompts[0]), provider)
    with torch.no_grad():
        # a genai artifact (it has genai_config.json) generates through onnxruntime-genai, as its users do; the
        # family compares those continuations with PyTorch's instead of generating through the graph itself
        generated = None
        if (model_dir / export_genai.GENAI_CONFIG).is_file():
            prompt_ids = [tokenizer(prompt)["input_ids"] for prompt in prompts]
            generated = export_genai.generate(model_dir, prompt_ids, max_new_tokens, provider)
        result = tasks.onnx_metrics(session, reference, tokenizer, prompts, max_new_tokens, task, generated)
    result["placement"] = measured
    result["provider"] = provider
    return result
