"""What the verification gate compares for an ONNX export: the graph on onnxruntime vs the PyTorch source.

`onnx_metrics` runs both on the same inputs and returns numbers; `onnx_report` turns them into the verification
report with `builder.steps.gate` (thresholds: `default_thresholds`, overridden by the recipe's `verify.thresholds`).
The verification provider is the one the export step placed the graph on (the export record's `verified_on`); the
session on it also reports which provider ran which nodes (`builder.steps.placement`), and a GPU provider that left
compute-heavy nodes to the CPU fails the gate.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from builder.gates import check
from builder.recipe import Recipe
from builder.steps import ort, placement
from builder.steps.export import decoder_shape, load_source
from builder.steps.gate import (
    ENCODER_SENTENCES,
    default_prompts,
    eval_sentences,
    with_overrides,
)

# Defaults from measurements on all-MiniLM-L6-v2 and SmolLM2-135M-Instruct (docs/recipes.md, "export", has them):
# above the worst honest build (O3's GELU approximation: 5e-3; per-channel int8: cosine 0.987) and far from a broken
# one (per-tensor int8 MiniLM: cosine 0.93; a wrong input order: max_abs_diff ~6). Keys are builder.steps.gate.GATES
# keys: `verify.thresholds` keys, plus `generation_match`, the share of prompts whose greedy continuation equals
# PyTorch's (a minimum; float32 graphs only; not a recipe field).
_THRESHOLDS = {
    ("float32", "none"): {
        "max_abs_diff": 2e-2,
        "cosine": 0.9999,
        "top1_agreement": 0.99,
        "kl_divergence": 1e-4,
        "generation_match": 1.0,
    },
    ("float16", "none"): {"max_abs_diff": 0.5, "cosine": 0.999, "top1_agreement": 0.95, "kl_divergence": 1e-2},
    ("float32", "dynamic-int8"): {"cosine": 0.97, "top1_agreement": 0.8, "kl_divergence": 0.2},
    # 4-bit weight-only, from SmolLM2-135M with its KV cache on CPU (docs/benchmarks.md): int4 top-1 0.67 / KL 0.43,
    # nf4 0.71 / 0.37, fp4 0.57 / 0.65; the bounds allow about twice that distance, as the bitsandbytes ones do.
    # The encoder cosine bounds are not measured yet (set from dynamic-int8's, looser for fp4).
    ("float32", "int4"): {"cosine": 0.97, "top1_agreement": 0.45, "kl_divergence": 1.0},
    ("float32", "nf4"): {"cosine": 0.97, "top1_agreement": 0.45, "kl_divergence": 1.0},
    ("float32", "fp4"): {"cosine": 0.95, "top1_agreement": 0.35, "kl_divergence": 1.5},
}
_GATED = {
    "feature-extraction": ("max_abs_diff", "cosine"),
    "text-generation": ("max_abs_diff", "top1_agreement", "kl_divergence", "generation_match"),
}
_CLASSIFIER_GATED = ("max_abs_diff", "top1_agreement")


def default_thresholds(task: str, dtype: str = "float32", quantize: str = "none") -> dict[str, float]:
    """Default gate thresholds of an ONNX export of `task` with `export.dtype` and `export.quantize`."""
    table = _THRESHOLDS[(dtype, quantize)]
    return {name: table[name] for name in _GATED.get(task, _CLASSIFIER_GATED) if name in table}


def thresholds_for(recipe: Recipe, task: str) -> dict[str, float]:
    """The defaults overridden by `verify.thresholds`; refuses a threshold that has no ONNX metric for `task`."""
    assert recipe.export is not None
    applicable = [k for k in _GATED.get(task, _CLASSIFIER_GATED) if k != "generation_match"]
    return with_overrides(
        default_thresholds(task, recipe.export.dtype, recipe.export.quantize),
        recipe,
        applicable,
        f"an ONNX export of a {task} model",
    )


def onnx_report(recipe: Recipe, placed: dict, model_dir: Path, source_dir: Path, device: str) -> dict:
    """The verification report of the ONNX export in `model_dir` (the shape `builder.steps.verify` writes), whose
    export record is `placed`.

    Compares on `placed["verified_on"]` with the recipe's prompts (else the built-in ones; encoders also embed
    `ENCODER_SENTENCES` sentences of the evaluation text), and records the session's node placement; compute-heavy
    nodes on the CPU in a session for a GPU provider are a failure (`placement.failures`)."""
    task = placed["task"]
    thresholds = thresholds_for(recipe, task)
    if task == "text-generation":
        prompts = list(recipe.verify.prompts) or default_prompts()
    else:
        prompts = list(recipe.verify.prompts) + eval_sentences(ENCODER_SENTENCES)
    started = time.perf_counter()
    result = onnx_metrics(
        model_dir,
        source_dir,
        task=task,
        provider=placed["verified_on"],
        prompts=prompts,
        max_new_tokens=recipe.verify.max_new_tokens,
        device=device,
    )
    metrics = result["metrics"]
    failures = check(metrics, thresholds)
    for failure in failures:
        if failure["metric"] == "generation_match":
            failure["message"] += ": greedy generation through the graph differs from PyTorch generate"
    failures += placement.failures(result["placement"])
    performance = result["performance"] | {"verification_seconds": round(time.perf_counter() - started, 2)}
    return {
        "passed": not failures,
        "task": task,
        "device": device,
        "provider": placed["verified_on"],
        "target_provider": placed["provider"],
        "placement": result["placement"].model_dump(),
        "metrics": {k: float(f"{v:.6g}") for k, v in metrics.items()},
        "thresholds": thresholds,
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
    measured = placement.measure(session, _first_feed(session, reference, tokenizer, prompts[0], task), provider)
    with torch.no_grad():
        if task == "text-generation":
            result = _decoder_metrics(session, reference, tokenizer, prompts, max_new_tokens)
        else:
            result = _encoder_metrics(session, reference, tokenizer, prompts, task)
    result["placement"] = measured
    result["provider"] = provider
    return result


def _first_feed(session, reference, tokenizer, prompt: str, task: str) -> dict:
    """The graph's inputs for `prompt` alone (an empty KV cache for a decoder that has one)."""
    if task == "text-generation":
        return _OnnxDecoder(session, reference.config).feed(tokenizer(prompt)["input_ids"])
    return _encoder_feed(session, tokenizer([prompt], return_tensors="pt"))


# --- encoders ------------------------------------------------------------------------------------------------------


def _encoder_metrics(session, reference, tokenizer, prompts: Sequence[str], task: str) -> dict:
    import numpy as np
    import torch

    batch = tokenizer(list(prompts), padding=True, return_tensors="pt")
    feed = _encoder_feed(session, batch)
    onnx_out = session.run(None, feed)
    kwargs = {
        k: v.to(reference.device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")
    }
    torch_out = reference(**kwargs)
    mask = batch["attention_mask"].numpy().astype(bool)
    outputs, metrics = {}, {}
    for meta, value in zip(session.get_outputs(), onnx_out, strict=True):
        expected = getattr(torch_out, meta.name).float().cpu().numpy()
        actual = value.astype(np.float32)
        if actual.ndim >= 2 and actual.shape[:2] == mask.shape:  # per-token outputs: padding is not compared
            actual, expected = actual[mask], expected[mask]
        outputs[meta.name] = _difference(actual, expected)
    metrics["max_abs_diff"] = max(o["max_abs_diff"] for o in outputs.values())
    metrics["relative_error"] = max(o["relative_error"] for o in outputs.values())
    first = session.get_outputs()[0].name
    if task == "feature-extraction":
        onnx_pooled = _mean_pool(torch.from_numpy(onnx_out[0].astype(np.float32)), batch["attention_mask"])
        torch_pooled = _mean_pool(getattr(torch_out, first).float().cpu(), batch["attention_mask"])
        metrics["cosine_min"] = float(torch.nn.functional.cosine_similarity(onnx_pooled, torch_pooled).min())
    else:
        onnx_top = onnx_out[0].argmax(-1)
        torch_top = getattr(torch_out, first).argmax(-1).cpu().numpy()
        if onnx_top.shape == mask.shape:
            onnx_top, torch_top = onnx_top[mask], torch_top[mask]
        metrics["top1_agreement"] = float((onnx_top == torch_top).mean())
    performance = _latency(lambda: session.run(None, feed), lambda: reference(**kwargs))
    return {"metrics": metrics, "outputs": outputs, "performance": performance}


def _encoder_feed(session, batch) -> dict:
    import numpy as np

    feed = {}
    for meta in session.get_inputs():
        if meta.name in batch:
            feed[meta.name] = batch[meta.name].numpy().astype(np.int64)
        else:  # token_type_ids for a tokenizer that does not return them
            feed[meta.name] = np.zeros_like(batch["input_ids"].numpy(), dtype=np.int64)
    return feed


def _mean_pool(hidden, mask):
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


# --- decoders ------------------------------------------------------------------------------------------------------


class _OnnxDecoder:
    """Runs a decoder graph in optimum's signature: full sequence with an empty cache, then one token at a time."""

    def __init__(self, session, config):
        import numpy as np

        self.session = session
        self.names = [i.name for i in session.get_inputs()]
        self.past_names = [n for n in self.names if n.startswith("past_key_values.")]
        self.output_names = [o.name for o in session.get_outputs()]
        _, self.kv_heads, self.head_dim = decoder_shape(config)
        past_types = {i.type for i in session.get_inputs() if i.name in self.past_names}
        self.past_dtype = np.float16 if "tensor(float16)" in past_types else np.float32

    def feed(self, ids, past: dict | None = None) -> dict:
        import numpy as np

        ids = np.asarray(ids, dtype=np.int64)[None]
        past_length = next(iter(past.values())).shape[2] if past else 0
        total = past_length + ids.shape[1]
        feed = {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64)}
        if "position_ids" in self.names:
            feed["position_ids"] = np.arange(past_length, total, dtype=np.int64)[None]
        for name in self.past_names:
            feed[name] = past[name] if past else np.zeros((1, self.kv_heads, 0, self.head_dim), self.past_dtype)
        return feed

    def run(self, ids, past: dict | None = None) -> dict:
        return dict(zip(self.output_names, self.session.run(None, self.feed(ids, past)), strict=True))

    def generate(self, ids: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
        """Greedy tokens after `ids`: through the KV cache when the graph has one, else re-running the sequence."""
        tokens, step_input, past = list(ids), list(ids), None
        for _ in range(max_new_tokens):
            out = self.run(step_input if self.past_names else tokens, past)
            token = int(out["logits"][0, -1].argmax())
            tokens.append(token)
            if token in eos:
                break
            if self.past_names:
                past = {name: out[name.replace("past_key_values.", "present.")] for name in self.past_names}
                step_input = [token]
        return tokens[len(ids) :]


def _decoder_metrics(session, reference, tokenizer, prompts: Sequence[str], max_new_tokens: int) -> dict:
    import numpy as np
    import torch

    decoder = _OnnxDecoder(session, reference.config)
    eos = reference.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos), 0)
    outputs: dict[str, dict] = {}
    matches, agree, total, kls = 0, 0, 0, []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        generated = reference.generate(
            ids.to(reference.device),
            attention_mask=torch.ones_like(ids).to(reference.device),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
        )
        torch_tokens = generated[0, ids.shape[1] :].tolist()
        matches += decoder.generate(ids[0].tolist(), max_new_tokens, eos) == torch_tokens
        sequence = generated[0].cpu()
        torch_out = reference(sequence[None].to(reference.device), use_cache=bool(decoder.past_names))
        onnx_out = decoder.run(sequence.tolist())
        expected = {"logits": torch_out.logits}
        if decoder.past_names:
            for i, layer in enumerate(torch_out.past_key_values.layers):
                expected[f"present.{i}.key"], expected[f"present.{i}.value"] = layer.keys, layer.values
        for name, value in onnx_out.items():
            diff = _difference(value.astype(np.float32), expected[name].float().cpu().numpy())
            seen = outputs.setdefault(name, {"max_abs_diff": 0.0, "relative_error": 0.0})
            for key in seen:
                seen[key] = max(seen[key], diff[key])
        onnx_logits = torch.from_numpy(onnx_out["logits"][0].astype(np.float32))
        torch_logits = torch_out.logits[0].float().cpu()
        agree += int((onnx_logits.argmax(-1) == torch_logits.argmax(-1)).sum())
        total += onnx_logits.shape[0]
        kls.append(
            float(
                torch.nn.functional.kl_div(
                    onnx_logits.log_softmax(-1), torch_logits.log_softmax(-1), log_target=True, reduction="batchmean"
                )
            )
        )
    metrics = {
        "max_abs_diff": max(o["max_abs_diff"] for o in outputs.values()),
        "relative_error": max(o["relative_error"] for o in outputs.values()),
        "top1_agreement": agree / total,
        "kl_divergence_mean": statistics.fmean(kls),
        "generation_match": matches / len(prompts),
    }
    ids = tokenizer(prompts[0], return_tensors="pt")["input_ids"]
    feed = decoder.feed(ids[0].tolist())
    performance = _latency(lambda: session.run(None, feed), lambda: reference(ids.to(reference.device)))
    return {"metrics": metrics, "outputs": outputs, "performance": performance}


# --- shared --------------------------------------------------------------------------------------------------------


def _difference(actual, expected) -> dict:
    import numpy as np

    delta = np.abs(actual - expected)
    scale = float(np.linalg.norm(expected)) or 1.0
    return {
        "max_abs_diff": float(delta.max()) if delta.size else 0.0,
        "relative_error": float(np.linalg.norm(actual - expected)) / scale,
    }


def _latency(candidate, reference, repeats: int = 5) -> dict:
    def median_ms(run) -> float:
        run()  # warm-up
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            run()
            times.append((time.perf_counter() - started) * 1000)
        return statistics.median(times)

    # PyTorch first: onnxruntime's worker threads keep spinning for a while after a run and would slow it down.
    reference_ms = median_ms(reference)
    candidate_ms = median_ms(candidate)
    return {
        "reference_latency_ms": round(reference_ms, 3),
        "candidate_latency_ms": round(candidate_ms, 3),
        "speedup": round(reference_ms / candidate_ms, 3) if candidate_ms else None,
    }
