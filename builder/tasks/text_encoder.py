"""Text encoders (feature-extraction, and the heads on an encoder: classification, fill-mask, question answering,
...): the transformers gate compares last hidden states and mean-pooled embeddings of sentences; the ONNX gate
compares the graph's outputs, as pooled embeddings (feature-extraction) or as top-1 predictions (the heads)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from builder.evaluation import ENCODER_SENTENCES, eval_sentences, eval_text
from builder.tasks import snippets
from builder.tasks.base import (
    LATENCY_TOKENS,
    CardUsage,
    ProbeRun,
    Runner,
    block_interval,
    difference,
    latency,
    resampled_interval,
)

NAME: str = "text-encoder"
TASKS: tuple[str, ...] = (
    "feature-extraction",
    "fill-mask",
    "text-classification",
    "token-classification",
    "question-answering",
    "multiple-choice",
    "text2text-generation",
)
PROBE_CLASS: str = "AutoModel"  # both gate runs compare the encoder's last hidden state, whatever head the task adds
GRAPH: Literal["decoder", "encoder"] = "encoder"

MAX_TOKENS = 128
_EMBEDDING = "feature-extraction"  # the task whose graph output is pooled into embeddings; heads give predictions

# bitsandbytes, from all-MiniLM-L6-v2 on CPU (docs/recipes.md, "verify"). ONNX (docs/recipes.md, "export"): above
# the worst honest build (O3's GELU approximation: 5e-3; per-channel int8: cosine 0.987) and far from a broken one
# (per-tensor int8 MiniLM: cosine 0.93; a wrong input order: max_abs_diff ~6). The 4-bit cosine bounds are not
# measured yet (set from dynamic-int8's, looser for fp4); heads bound top-1 agreement as LMs do.
_DEFAULTS: dict[str, dict[str, float]] = {
    "bnb-nf4": {"cosine": 0.90},
    "bnb-fp4": {"cosine": 0.85},
    "bnb-int8": {"cosine": 0.99},
    "onnx-float32": {"max_abs_diff": 2e-2, "cosine": 0.9999, "top1_agreement": 0.99},
    "onnx-float16": {"max_abs_diff": 0.5, "cosine": 0.999, "top1_agreement": 0.95},
    "onnx-dynamic-int8": {"cosine": 0.97, "top1_agreement": 0.8},
    # genai exporter only (it builds decoders, so these do not apply yet): as main's table had them
    "onnx-int8": {"cosine": 0.97, "top1_agreement": 0.8},
    "onnx-bfloat16": {"max_abs_diff": 1.0, "cosine": 0.995, "top1_agreement": 0.9},
    "onnx-int4": {"cosine": 0.97, "top1_agreement": 0.45},
    "onnx-nf4": {"cosine": 0.97, "top1_agreement": 0.45},
    "onnx-fp4": {"cosine": 0.95, "top1_agreement": 0.35},
}


def gates(runner: Runner, task: str) -> tuple[str, ...]:
    if runner == "transformers":
        return ("cosine", "max_abs_diff")
    return ("max_abs_diff", "cosine") if task == _EMBEDDING else ("max_abs_diff", "top1_agreement")


def default_thresholds(scheme: str, task: str) -> dict[str, float]:
    runner: Runner = "onnxruntime" if scheme.startswith("onnx-") else "transformers"
    applicable = gates(runner, task)
    return {key: bound for key, bound in _DEFAULTS[scheme].items() if key in applicable}


# --- the transformers gate --------------------------------------------------------------------------------------


def inputs(tokenizer, prompts: Sequence[str]) -> dict:
    """The prompts and ENCODER_SENTENCES sentences of the evaluation text, padded; LATENCY_TOKENS ids."""
    sentences = list(prompts) + eval_sentences(ENCODER_SENTENCES)
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    latency_ids = tokenizer(eval_text()[:2000], truncation=True, max_length=LATENCY_TOKENS, return_tensors="pt")
    return {"sentences": dict(batch), "latency_ids": latency_ids.input_ids}


def describe_inputs(inputs: dict, prompts: Sequence[str], max_new_tokens: int) -> dict:
    return {
        "eval_text_sha256": hashlib.sha256(eval_text().encode("utf-8")).hexdigest(),
        "sentences": int(inputs["sentences"]["input_ids"].shape[0]),
        "prompts": list(prompts),
    }


def probe(model, inputs: dict, max_new_tokens: int, run: ProbeRun) -> dict:
    """The last hidden state of every sentence."""
    import time

    batch = inputs["sentences"]
    run.synchronize()
    started = time.perf_counter()
    with run.stage("evaluation"):
        hidden = run.forward(
            model, batch["input_ids"], **{k: v for k, v in batch.items() if k != "input_ids"}
        ).last_hidden_state
        run.synchronize()
    elapsed = time.perf_counter() - started
    tokens = int(batch["attention_mask"].sum())
    return {"hidden": hidden.float().cpu(), "throughput_tokens_per_s": tokens / elapsed}


def compare(inputs: dict, reference: dict, candidate: dict, device: str) -> tuple[dict, dict, dict]:
    """Cosine similarity of mean-pooled embeddings (lowest and mean over the sentences) and the largest difference
    of hidden states over the tokens that are not padding. The lowest cosine's interval resamples sentences; the
    largest difference has none (an extreme: a resample never exceeds it)."""
    import numpy as np
    import torch

    mask = inputs["sentences"]["attention_mask"].unsqueeze(-1).float().to(device)
    ref, cand = reference["hidden"].to(device).float(), candidate["hidden"].to(device).float()
    pooled_ref, pooled_cand = (ref * mask).sum(1) / mask.sum(1), (cand * mask).sum(1) / mask.sum(1)
    cosine = torch.nn.functional.cosine_similarity(pooled_ref, pooled_cand, dim=-1)
    diff = ((ref - cand).abs() * mask).amax()
    metrics = {"cosine_min": float(cosine.min()), "cosine_mean": float(cosine.mean()), "max_abs_diff": float(diff)}
    intervals = {"cosine_min": resampled_interval(cosine.cpu().numpy(), np.min)}
    return metrics, intervals, {"cosine_per_input": [round(float(c), 6) for c in cosine]}


# --- the ONNX gate ----------------------------------------------------------------------------------------------


def onnx_prompts(prompts: Sequence[str]) -> list[str]:
    return list(prompts) + eval_sentences(ENCODER_SENTENCES)


def onnx_feed(session, reference, tokenizer, prompt: str) -> dict:
    return _feed(session, tokenizer([prompt], return_tensors="pt"))


def _feed(session, batch) -> dict:
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


def onnx_metrics(
    session,
    reference,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    task: str,
    generated: list[list[int]] | None,
) -> dict:
    """Every graph output against PyTorch's (padding left out), then the lowest cosine of mean-pooled embeddings
    (feature-extraction) or the top-1 agreement of the first output (heads). Intervals resample sentences (a
    head's per-token agreement: each sentence's tokens together)."""
    import numpy as np
    import torch

    batch = tokenizer(list(prompts), padding=True, return_tensors="pt")
    feed = _feed(session, batch)
    onnx_out = session.run(None, feed)
    kwargs = {
        k: v.to(reference.device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")
    }
    torch_out = reference(**kwargs)
    mask = batch["attention_mask"].numpy().astype(bool)
    outputs, metrics, intervals = {}, {}, {}
    for meta, value in zip(session.get_outputs(), onnx_out, strict=True):
        expected = getattr(torch_out, meta.name).float().cpu().numpy()
        actual = value.astype(np.float32)
        if actual.ndim >= 2 and actual.shape[:2] == mask.shape:  # per-token outputs: padding is not compared
            actual, expected = actual[mask], expected[mask]
        outputs[meta.name] = difference(actual, expected)
    metrics["max_abs_diff"] = max(o["max_abs_diff"] for o in outputs.values())
    metrics["relative_error"] = max(o["relative_error"] for o in outputs.values())
    first = session.get_outputs()[0].name
    if task == _EMBEDDING:
        onnx_pooled = _mean_pool(torch.from_numpy(onnx_out[0].astype(np.float32)), batch["attention_mask"])
        torch_pooled = _mean_pool(getattr(torch_out, first).float().cpu(), batch["attention_mask"])
        cosine = torch.nn.functional.cosine_similarity(onnx_pooled, torch_pooled)
        metrics["cosine_min"] = float(cosine.min())
        intervals["cosine_min"] = resampled_interval(cosine.numpy(), np.min)
    else:
        onnx_top = onnx_out[0].argmax(-1)
        torch_top = getattr(torch_out, first).argmax(-1).cpu().numpy()
        per_sentence = onnx_top == torch_top
        if onnx_top.shape == mask.shape:
            onnx_top, torch_top = onnx_top[mask], torch_top[mask]
            per_sentence = [row[keep] for row, keep in zip(per_sentence, mask, strict=True)]
        metrics["top1_agreement"] = float((onnx_top == torch_top).mean())
        intervals["top1_agreement"] = block_interval(list(per_sentence), block=None)
    performance = latency(lambda: session.run(None, feed), lambda: reference(**kwargs))
    return {"metrics": metrics, "intervals": intervals, "outputs": outputs, "performance": performance}


# --- the card ---------------------------------------------------------------------------------------------------

_ORT_CLASSES = {
    "feature-extraction": "ORTModelForFeatureExtraction",
    "text-classification": "ORTModelForSequenceClassification",
    "token-classification": "ORTModelForTokenClassification",
    "question-answering": "ORTModelForQuestionAnswering",
    "fill-mask": "ORTModelForMaskedLM",
}


def transformers_usage(task: str, folder: Path | None, repo_id: str) -> CardUsage:
    """Embeddings pooled as the folder's sentence-transformers config says (feature-extraction; sentence-transformers
    itself first where the folder is its model), a forward for the heads."""
    if task != _EMBEDDING:
        return CardUsage(snippets.transformers_forward())
    pooling = snippets.pooling(folder)
    intro = (
        " The folder is a sentence-transformers model (`modules.json`), so `SentenceTransformer` pools and normalizes "
        f"as the source does:\n\n```python\n{snippets.sentence_transformers(repo_id)}```\n\n"
        "With `transformers` alone, pooling as its `modules.json` and `1_Pooling/config.json` say:"
        if pooling.sentence_transformers
        else ""
    )
    return CardUsage(snippets.transformers_embeddings(pooling), "import numpy as np\nimport torch\n", intro)


def onnx_usage(task: str, folder: Path | None) -> str:
    return snippets.ort_embeddings(snippets.pooling(folder)) if task == _EMBEDDING else snippets.ort_forward()


def ort_class(task: str) -> str:
    return _ORT_CLASSES.get(task, "ORTModel")
