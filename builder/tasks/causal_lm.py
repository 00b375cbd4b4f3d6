"""Causal language models (text-generation): probed on the evaluation text in chunks (next-token logits: top-1
agreement, KL divergence, perplexity) and on the prompts (greedy continuations); an ONNX graph is a decoder, with
or without its KV cache, compared teacher-forced and by greedy generation."""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from builder.evaluation import default_prompts, eval_text
from builder.tasks import snippets
from builder.tasks.base import (
    LATENCY_TOKENS,
    CardUsage,
    ProbeRun,
    Runner,
    Stage,
    block_interval,
    difference,
    latency,
    resampled_interval,
)

NAME: str = "causal-lm"
TASKS: tuple[str, ...] = ("text-generation",)
PROBE_CLASS: str = "AutoModelForCausalLM"
GRAPH: Literal["decoder", "encoder"] = "decoder"

CHUNK_TOKENS = 512  # the evaluation text is scored in chunks of this many tokens (no overlap)
EVAL_TOKENS = 2048  # tokens of the evaluation text scored (SmolLM2: 3,126 in all); keeps a CPU verify under a minute
CPU_COMPARE_ELEMENTS = 1 << 21
"""On a CPU, logits are compared this many at a time (whole rows): 8 MiB of float32 per tensor stays in the caches
through the comparison's passes (2,048 x 49,152 logits: 0.6 s instead of 1.3-2.1 s on 2 cores)."""

_GATES: dict[str, tuple[str, ...]] = {
    "transformers": ("top1_agreement", "kl_divergence", "perplexity_ratio"),
    # generation_match: the share of prompts whose greedy continuation through the graph equals PyTorch's
    "onnxruntime": ("max_abs_diff", "top1_agreement", "kl_divergence", "generation_match"),
}

# bitsandbytes, from SmolLM2-135M-Instruct on CPU (docs/recipes.md, "verify", has the table): each allows about
# twice an honest build's distance from the reference (a 135M model loses a lot to 4-bit: nf4 agrees on 63% of next
# tokens), and sits far from a build with shuffled 4-bit blocks (top-1 0.016, KL 9.95 nats, perplexity x16,000).
# ONNX (docs/recipes.md, "export"): float32 graphs match PyTorch to rounding; the 4-bit weight-only ones, with the
# KV cache on CPU (docs/benchmarks.md): int4 top-1 0.67 / KL 0.43, nf4 0.71 / 0.37, fp4 0.57 / 0.65, bounded at
# about twice that distance.
_DEFAULTS: dict[str, dict[str, float]] = {
    "bnb-nf4": {"top1_agreement": 0.45, "kl_divergence": 1.5, "perplexity_ratio": 2.5},
    "bnb-fp4": {"top1_agreement": 0.40, "kl_divergence": 2.0, "perplexity_ratio": 2.2},
    "bnb-int8": {"top1_agreement": 0.75, "kl_divergence": 0.15, "perplexity_ratio": 1.10},
    "onnx-float32": {"max_abs_diff": 2e-2, "top1_agreement": 0.99, "kl_divergence": 1e-4, "generation_match": 1.0},
    "onnx-float16": {"max_abs_diff": 0.5, "top1_agreement": 0.95, "kl_divergence": 1e-2},
    "onnx-dynamic-int8": {"top1_agreement": 0.8, "kl_divergence": 0.2},
    # genai exporter only; not measured yet: int8 weight-only from dynamic-int8's, bfloat16 looser than float16's
    "onnx-int8": {"top1_agreement": 0.8, "kl_divergence": 0.2},
    "onnx-bfloat16": {"max_abs_diff": 1.0, "top1_agreement": 0.9, "kl_divergence": 5e-2},
    "onnx-int4": {"top1_agreement": 0.45, "kl_divergence": 1.0},
    "onnx-nf4": {"top1_agreement": 0.45, "kl_divergence": 1.0},
    "onnx-fp4": {"top1_agreement": 0.35, "kl_divergence": 1.5},
}


def gates(runner: Runner, task: str) -> tuple[str, ...]:
    return _GATES[runner]


def default_thresholds(scheme: str, task: str) -> dict[str, float]:
    return dict(_DEFAULTS[scheme])


# --- the transformers gate --------------------------------------------------------------------------------------


def inputs(tokenizer, prompts: Sequence[str]) -> dict:
    """The evaluation text in CHUNK_TOKENS chunks, the prompts (else the built-in ones), and LATENCY_TOKENS ids."""
    ids = tokenizer(eval_text(), return_tensors="pt").input_ids
    latency_ids = ids[:, :LATENCY_TOKENS]
    ids = ids[:, :EVAL_TOKENS]
    chunks = [ids[:, i : i + CHUNK_TOKENS] for i in range(0, ids.shape[1], CHUNK_TOKENS)]
    chunks = [chunk for chunk in chunks if chunk.shape[1] > 1]
    prompt_ids = [tokenizer(p, return_tensors="pt").input_ids for p in prompts or default_prompts()]
    return {"eval_chunks": chunks, "prompts": prompt_ids, "latency_ids": latency_ids}


def describe_inputs(inputs: dict, prompts: Sequence[str], max_new_tokens: int) -> dict:
    return {
        "eval_text_sha256": hashlib.sha256(eval_text().encode("utf-8")).hexdigest(),
        "eval_tokens": sum(c.shape[1] for c in inputs["eval_chunks"]),
        "chunk_tokens": CHUNK_TOKENS,
        "prompts": list(prompts) or default_prompts(),
        "max_new_tokens": max_new_tokens,
    }


def probe(model, inputs: dict, max_new_tokens: int, run: ProbeRun) -> dict:
    """Next-token logits of each evaluation chunk and prompt, and the prompts' greedy continuations."""
    import time

    eval_logits, tokens = [], 0
    run.synchronize()
    started = time.perf_counter()
    with run.stage("evaluation", len(inputs["eval_chunks"])) as stage:
        for done, chunk in enumerate(inputs["eval_chunks"], 1):
            eval_logits.append(run.forward(model, chunk).logits[0].cpu())
            tokens += chunk.shape[1]
            stage.step(done)
        run.synchronize()
    elapsed = time.perf_counter() - started
    with run.stage("generation", max_new_tokens) as stage:
        prompt_logits = [run.forward(model, ids).logits[0].cpu() for ids in inputs["prompts"]]
        continuations = _greedy(model, inputs["prompts"], max_new_tokens, run, stage)
    return {
        "eval_logits": eval_logits,
        "prompt_logits": prompt_logits,
        "continuations": continuations,
        "throughput_tokens_per_s": tokens / elapsed,
    }


def _greedy(model, prompts: list, max_new_tokens: int, run: ProbeRun, stage: Stage) -> list[list[int]]:
    """Each prompt's greedy continuation (up to its first end-of-sequence token, as if it were generated alone),
    all prompts in one left-padded batch: a decoding step costs about the same for one sequence as for a few, so
    this takes one prompt's time instead of the sum (3.5 s of an 8B gate's 8 on an H200)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Steps(StoppingCriteria):  # never stops: counts the tokens generated for the progress bar
        def __call__(self, input_ids, scores, **kwargs):
            stage.step(input_ids.shape[1] - width)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    pad = _pad_id(model)
    width = max(ids.shape[1] for ids in prompts)
    batch = torch.full((len(prompts), width), 0 if pad is None else pad, dtype=prompts[0].dtype)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        batch[row, width - ids.shape[1] :] = ids[0]
        mask[row, width - ids.shape[1] :] = 1
    generated = run.forward(
        model.generate,
        batch,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad,
        stopping_criteria=StoppingCriteriaList([_Steps()]),
    )
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    continuations = []
    for row in generated[:, width:].cpu().tolist():
        end = next((i for i, token in enumerate(row) if token in eos), None)
        continuations.append(row if end is None else row[: end + 1])  # a finished row is padded after its end
    return continuations


def _pad_id(model) -> int | None:
    config = model.generation_config
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    return pad[0] if isinstance(pad, list) else pad


def compare(inputs: dict, reference: dict, candidate: dict, device: str) -> tuple[dict, dict, dict]:
    """Top-1 agreement and KL divergence over every position, perplexities of the evaluation text, and how many
    leading tokens of each greedy continuation match; computed on `device` one chunk of logits at a time. The
    gated metrics' intervals resample blocks of positions of each chunk and prompt (`block_interval`)."""
    import numpy as np
    import torch

    agree, kl_sum, kl_max, positions = 0, 0.0, 0.0, 0
    ref_nll, cand_nll = 0.0, 0.0
    # per sequence (chunk or prompt), per position: for the intervals
    agreements: list = []
    kls: list = []
    nll_gaps: list = []  # candidate's negative log-likelihood of the next token minus the reference's
    targets = [chunk[0] for chunk in inputs["eval_chunks"]]
    for index, (ref_chunk, cand_chunk) in enumerate(
        zip(
            reference["eval_logits"] + reference["prompt_logits"],
            candidate["eval_logits"] + candidate["prompt_logits"],
            strict=True,
        )
    ):
        length, vocabulary = ref_chunk.shape
        rows = max(1, CPU_COMPARE_ELEMENTS // vocabulary) if device == "cpu" else length
        # An evaluation chunk's position p predicts token p + 1 (its last position predicts nothing).
        following = targets[index][1:].to(device) if index < len(targets) else None
        sequence_agree, sequence_kl, sequence_gap = [], [], []
        for start in range(0, length, rows):
            ref = ref_chunk[start : start + rows].to(device).float()
            cand = cand_chunk[start : start + rows].to(device).float()
            ref_log, cand_log = torch.log_softmax(ref, -1), torch.log_softmax(cand, -1)
            matches = ref.argmax(-1) == cand.argmax(-1)
            agree += int(matches.sum())
            kl = (ref_log.exp() * (ref_log - cand_log)).sum(-1).clamp_min(0)
            kl_sum += float(kl.sum())
            kl_max = max(kl_max, float(kl.max()))
            sequence_agree.append(matches.cpu())
            sequence_kl.append(kl.cpu())
            if following is not None and start < length - 1:
                next_tokens = following[start : start + rows].unsqueeze(-1)
                ref_likelihood = ref_log[: len(next_tokens)].gather(-1, next_tokens).double()
                cand_likelihood = cand_log[: len(next_tokens)].gather(-1, next_tokens).double()
                ref_nll -= float(ref_likelihood.sum())
                cand_nll -= float(cand_likelihood.sum())
                sequence_gap.append((ref_likelihood - cand_likelihood).squeeze(-1).cpu())
        positions += length
        agreements.append(torch.cat(sequence_agree).numpy())
        kls.append(torch.cat(sequence_kl).numpy())
        if sequence_gap:
            nll_gaps.append(torch.cat(sequence_gap).numpy())
    # Perplexity: exp(mean negative log-likelihood) of each chunk's next tokens (its last position predicts nothing).
    predicted = sum(chunk.shape[0] - 1 for chunk in targets)
    ref_ppl, cand_ppl = math.exp(ref_nll / predicted), math.exp(cand_nll / predicted)
    matches = [
        _common_prefix(r, c) for r, c in zip(reference["continuations"], candidate["continuations"], strict=True)
    ]
    lengths = [len(r) for r in reference["continuations"]]
    metrics = {
        "top1_agreement": agree / positions,
        "kl_divergence_mean": kl_sum / positions,
        "kl_divergence_max": kl_max,
        "perplexity_reference": ref_ppl,
        "perplexity_candidate": cand_ppl,
        "perplexity_ratio": cand_ppl / ref_ppl,
        "greedy_match": sum(matches) / max(sum(lengths), 1),
    }
    intervals = {
        "top1_agreement": block_interval(agreements),
        "kl_divergence_mean": block_interval(kls),
        # the ratio is exp(mean gap): candidate/reference perplexity over the same positions
        "perplexity_ratio": block_interval(nll_gaps, transform=np.exp),
    }
    details = {"positions": positions, "greedy_tokens_matched": matches, "greedy_tokens_generated": lengths}
    return metrics, intervals, details


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy continuations share (the tokens until the first divergence)."""
    n = 0
    for x, y in zip(a, b, strict=False):  # the shorter one ends the shared prefix
        if x != y:
            break
        n += 1
    return n


# --- the ONNX gate ----------------------------------------------------------------------------------------------


def onnx_prompts(prompts: Sequence[str]) -> list[str]:
    return list(prompts) or default_prompts()


def decoder_shape(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a decoder's KV cache."""
    layers = config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return layers, kv_heads, head_dim


class OnnxDecoder:
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


def onnx_feed(session, reference, tokenizer, prompt: str) -> dict:
    return OnnxDecoder(session, reference.config).feed(tokenizer(prompt)["input_ids"])


def onnx_metrics(
    session,
    reference,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    task: str,
    generated: list[list[int]] | None,
) -> dict:
    """Per prompt: PyTorch's greedy continuation, then both models teacher-forced on it (top-1 agreement, KL
    divergence, the largest difference of each output, from one full-sequence run of the graph with an empty KV
    cache) and the graph's greedy generation through its KV cache, or `generated` (`generation_match`: the share of
    prompts where it equals PyTorch's). Intervals: top-1 agreement resamples blocks of positions of each prompt; the
    KL divergence (a mean of the prompts' means) and generation_match resample prompts."""
    import numpy as np
    import torch

    decoder = OnnxDecoder(session, reference.config)
    eos = reference.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos), 0)
    outputs: dict[str, dict] = {}
    matches, agree, total, kls = 0, 0, 0, []
    agreements, generation_matches = [], []  # per prompt: per position, and whether the greedy tokens match
    for index, prompt in enumerate(prompts):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        continued = reference.generate(
            ids.to(reference.device),
            attention_mask=torch.ones_like(ids).to(reference.device),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
        )
        torch_tokens = continued[0, ids.shape[1] :].tolist()
        if generated is not None:
            generation_matches.append(generated[index] == torch_tokens)
        else:
            generation_matches.append(decoder.generate(ids[0].tolist(), max_new_tokens, eos) == torch_tokens)
        matches += generation_matches[-1]
        sequence = continued[0].cpu()
        torch_out = reference(sequence[None].to(reference.device), use_cache=bool(decoder.past_names))
        onnx_out = decoder.run(sequence.tolist())
        expected = {"logits": torch_out.logits}
        if decoder.past_names:
            for i, layer in enumerate(torch_out.past_key_values.layers):
                expected[f"present.{i}.key"], expected[f"present.{i}.value"] = layer.keys, layer.values
        for name, value in onnx_out.items():
            diff = difference(value.astype(np.float32), expected[name].float().cpu().numpy())
            seen = outputs.setdefault(name, {"max_abs_diff": 0.0, "relative_error": 0.0})
            for key in seen:
                seen[key] = max(seen[key], diff[key])
        onnx_logits = torch.from_numpy(onnx_out["logits"][0].astype(np.float32))
        torch_logits = torch_out.logits[0].float().cpu()
        agreements.append((onnx_logits.argmax(-1) == torch_logits.argmax(-1)).numpy())
        agree += int(agreements[-1].sum())
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
    intervals = {
        "top1_agreement": block_interval(agreements),
        "kl_divergence_mean": resampled_interval(kls, np.mean),
        "generation_match": resampled_interval(generation_matches, np.mean),
    }
    ids = tokenizer(prompts[0], return_tensors="pt")["input_ids"]
    feed = decoder.feed(ids[0].tolist())
    performance = latency(lambda: session.run(None, feed), lambda: reference(ids.to(reference.device)))
    return {"metrics": metrics, "intervals": intervals, "outputs": outputs, "performance": performance}


# --- the card ---------------------------------------------------------------------------------------------------


def transformers_usage(task: str, folder: Path | None, repo_id: str) -> CardUsage:
    return CardUsage(snippets.transformers_generate(snippets.has_chat_template(folder)))


def onnx_usage(task: str, folder: Path | None) -> str:
    return snippets.ort_decoder_loop(snippets.has_chat_template(folder))


def ort_class(task: str) -> str:
    return "ORTModelForCausalLM"
