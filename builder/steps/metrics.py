"""Run one model on the verification inputs, and compare a reference run with a candidate run.

The gate (`builder.steps.verify`) runs the reference (the source model) and the candidate (the artifact as a user
loads it, with stock transformers) either on threads of the build process (`run`; without a device memory cap) or
each in a worker process of its own:

    python -m builder.steps.metrics FOLDER TASK DEVICE [MODULE ...]      then, on stdin: SPEC.pt and OUT.pt lines

The worker starts by importing what loading FOLDER's architecture for TASK needs (`import_for`: transformers'
modeling module, the MODULEs, and CUDA), so a worker started early, before the artifact exists, has that done when
the parent names SPEC.pt. A spec holds the model folder, task, dtype, device, an optional cap on device memory and
the token ids (tokenized once, by the parent, so both runs see the same inputs); OUT.pt receives the outputs of
`run`. The parent then calls `compare`. A model whose weights pass the cap runs block by block
(`builder.steps.blockwise`). A run reports its stages as events (`PROGRESS` lines of JSON on a worker's stderr)
that the parent turns into status lines and bars.

Causal LMs are probed on the evaluation text in chunks (next-token logits, for top-1 agreement, KL divergence and
perplexity) and on the prompts (greedy continuations); encoders on sentences (hidden states, mean-pooled
embeddings). Every run also reports its memory footprint, latency and throughput.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from builder.checkpoint import FLOAT_DTYPES, TORCH_DTYPE_BYTES, local_weight_files, read_header
from builder.steps import torch_defaults
from builder.steps.blockwise import load_by_blocks
from builder.tasks import auto_class

SEED = 0
LATENCY_TOKENS = 64
LATENCY_RUNS = 3
PROGRESS = "builder-progress "
"""Prefix of the worker's stage lines on stderr: `{"stage": ..., "total": n}`, `{"stage": ..., "done": k}`,
`{"stage": ..., "seconds": s}` (the stage ended)."""


Emit = Callable[[dict], None]
"""Where a run's stage events go: a worker prints them on stderr, a run in the build process hands them over."""


class _Stage:
    """Report one stage (its count where it has one) and its duration to `emit`."""

    def __init__(self, name: str, emit: Emit, total: int | None = None):
        self.name, self.emit, self.total = name, emit, total

    def __enter__(self) -> _Stage:
        self.started = time.perf_counter()
        self.emit({"stage": self.name, "total": self.total})
        return self

    def step(self, done: int) -> None:
        self.emit({"stage": self.name, "done": done})

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.emit({"stage": self.name, "seconds": round(time.perf_counter() - self.started, 3)})


def _to_stderr(event: dict) -> None:
    print(PROGRESS + json.dumps(event), file=sys.stderr, flush=True)


def model_class(task: str):
    """The transformers Auto class the gate loads a `task` model with: a causal LM, or an encoder's base model."""
    return auto_class(task) if task == "text-generation" else auto_class("feature-extraction")


def load_model(folder: str, task: str, dtype: str, device_map, **options):
    """`folder` loaded with stock transformers as `task` needs it, in `dtype`, on `device_map` (a device, or a
    transformers device map; `options` go to `from_pretrained` too), in eval mode."""
    import torch

    model = model_class(task).from_pretrained(folder, dtype=getattr(torch, dtype), device_map=device_map, **options)
    return model.eval()


def weight_bytes(folder: str, dtype: str) -> int:
    """Bytes the weights of `folder` take loaded in `dtype` (float tensors cast to it; the rest, such as packed
    4-bit weights, as stored), from the safetensors headers."""

    size = TORCH_DTYPE_BYTES.get(dtype, 4)
    return sum(
        t.numel * size if t.dtype in FLOAT_DTYPES else t.nbytes
        for file in local_weight_files(Path(folder))
        for t in read_header(file)
    )


def load_for_probe(
    folder: str, task: str, dtype: str, device: str, max_device_memory: int | None = None, scratch: str | None = None
):
    """(model, offload record or None): `load_model` on `device` when its weights fit `max_device_memory` (or no
    cap is given); otherwise run block by block on `device` (`builder.steps.blockwise.load_by_blocks`; the blocks'
    weights that transformers converts on load, such as fused experts, are written under `scratch`, a folder that
    must outlive the model)."""
    if max_device_memory is None or weight_bytes(folder, dtype) <= max_device_memory:
        return load_model(folder, task, dtype, device), None
    load = functools.partial(load_model, folder, task, dtype)
    return load_by_blocks(load, model_class(task), folder, device, scratch)


def run(spec: dict, emit: Emit) -> dict:
    """Load `spec`'s model folder with stock transformers and `probe` it: its outputs, with how it ran (`forward`
    whole or by blocks, the `offload` record) and, on CUDA, the process's `device_peak_bytes`."""
    import torch

    device, cap = spec["device"], spec.get("max_device_memory")
    with tempfile.TemporaryDirectory(prefix="builder-blocks-") as scratch:
        with torch_defaults.exclusive(), _without_loading_bars(), _Stage("load", emit):
            model, offload = load_for_probe(spec["folder"], spec["task"], spec["dtype"], device, cap, scratch)
        outputs = probe(model, spec["inputs"], spec["task"], spec["max_new_tokens"], device, emit)
    outputs["forward"] = "blocks" if offload else "whole"
    if offload:
        outputs["offload"] = offload.as_json()
    if device.startswith("cuda"):
        outputs["device_peak_bytes"] = int(torch.cuda.max_memory_allocated(torch.device(device)))
    return outputs


@contextlib.contextmanager
def _without_loading_bars() -> Iterator[None]:
    """transformers' "Loading weights" bar off for a load: the run's `load` stage is its progress, and a run on a
    thread of the build process would draw the bar among the build's status lines (or despite `--quiet`, once
    transformers was imported before it). The switch is process-wide; a load runs alone (`torch_defaults`)."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def probe(model, inputs: dict, task: str, max_new_tokens: int, device: str, emit: Emit = _to_stderr) -> dict:
    """Outputs of `model` on `inputs` (see `builder.steps.verify.tokenize_inputs`) as CPU tensors (logits in the
    model's own dtype: casting them is the comparison's business), plus `footprint_bytes`, `parameters`,
    `latency_ms` (median forward of LATENCY_TOKENS tokens, batch 1) and `throughput_tokens_per_s` (over the
    evaluation pass). Stages go to `emit`."""
    import torch

    torch.manual_seed(SEED)
    with torch.inference_mode():
        _forward(model, inputs["latency_ids"][:, :8], device)  # warm-up: 4-bit CPU kernels repack on first use
        outputs = (
            _probe_lm(model, inputs, max_new_tokens, device, emit)
            if task == "text-generation"
            else _probe_encoder(model, inputs, device, emit)
        )
        outputs["latency_ms"] = _latency_ms(model, inputs["latency_ids"], device, emit)
    outputs["footprint_bytes"] = int(model.get_memory_footprint())
    outputs["parameters"] = _parameter_count(model)
    return outputs


def _forward(model, ids, device: str, **kwargs):
    with torch_defaults.shared():
        return model(input_ids=ids.to(device), **{k: v.to(device) for k, v in kwargs.items()})


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def _probe_lm(model, inputs: dict, max_new_tokens: int, device: str, emit: Emit) -> dict:
    eval_logits, tokens = [], 0
    _synchronize(device)
    started = time.perf_counter()
    with _Stage("evaluation", emit, len(inputs["eval_chunks"])) as stage:
        for done, chunk in enumerate(inputs["eval_chunks"], 1):
            eval_logits.append(_forward(model, chunk, device).logits[0].cpu())
            tokens += chunk.shape[1]
            stage.step(done)
        _synchronize(device)
    elapsed = time.perf_counter() - started
    with _Stage("generation", emit, max_new_tokens) as stage:
        prompt_logits = [_forward(model, ids, device).logits[0].cpu() for ids in inputs["prompts"]]
        continuations = _greedy(model, inputs["prompts"], max_new_tokens, device, stage)
    return {
        "eval_logits": eval_logits,
        "prompt_logits": prompt_logits,
        "continuations": continuations,
        "throughput_tokens_per_s": tokens / elapsed,
    }


def _greedy(model, prompts: list, max_new_tokens: int, device: str, stage: _Stage) -> list[list[int]]:
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
    with torch_defaults.shared():
        generated = model.generate(
            input_ids=batch.to(device),
            attention_mask=mask.to(device),
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


def _probe_encoder(model, inputs: dict, device: str, emit: Emit) -> dict:
    batch = inputs["sentences"]
    _synchronize(device)
    started = time.perf_counter()
    with _Stage("evaluation", emit):
        hidden = _forward(
            model, batch["input_ids"], device, **{k: v for k, v in batch.items() if k != "input_ids"}
        ).last_hidden_state
        _synchronize(device)
    elapsed = time.perf_counter() - started
    tokens = int(batch["attention_mask"].sum())
    return {"hidden": hidden.float().cpu(), "throughput_tokens_per_s": tokens / elapsed}


def _latency_ms(model, ids, device: str, emit: Emit) -> float:
    times = []
    with _Stage("latency", emit, LATENCY_RUNS) as stage:
        for done in range(1, LATENCY_RUNS + 1):
            _synchronize(device)
            started = time.perf_counter()
            _forward(model, ids, device)
            _synchronize(device)
            times.append((time.perf_counter() - started) * 1000)
            stage.step(done)
    return statistics.median(times)


def _parameter_count(model) -> int:
    """Parameters of the model as the source counts them: a 4-bit weight packs two values in a byte."""
    total = 0
    for parameter in model.parameters():
        shape = getattr(parameter, "quant_state", None)
        total += shape.shape.numel() if shape is not None else parameter.numel()
    return total


CPU_COMPARE_ELEMENTS = 1 << 21
"""On a CPU, logits are compared this many at a time (whole rows): 8 MiB of float32 per tensor stays in the caches
through the comparison's passes (2,048 x 49,152 logits: 0.6 s instead of 1.3-2.1 s on 2 cores)."""


def compare(task: str, inputs: dict, reference: dict, candidate: dict, device: str = "cpu") -> tuple[dict, dict]:
    """(metrics, details) of candidate against reference on `inputs`: the scalars the gate checks, and
    per-input values, computed on `device` (one chunk of logits at a time)."""
    if task == "text-generation":
        metrics, details = _compare_lm(inputs, reference, candidate, device)
    else:
        metrics, details = _compare_encoder(reference, candidate, inputs["sentences"]["attention_mask"], device)
    metrics["footprint_ratio"] = candidate["footprint_bytes"] / reference["footprint_bytes"]
    return metrics, details


def _compare_lm(inputs: dict, reference: dict, candidate: dict, device: str) -> tuple[dict, dict]:
    import math

    import torch

    agree, kl_sum, kl_max, positions = 0, 0.0, 0.0, 0
    ref_nll, cand_nll = 0.0, 0.0
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
        for start in range(0, length, rows):
            ref = ref_chunk[start : start + rows].to(device).float()
            cand = cand_chunk[start : start + rows].to(device).float()
            ref_log, cand_log = torch.log_softmax(ref, -1), torch.log_softmax(cand, -1)
            agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
            kl = (ref_log.exp() * (ref_log - cand_log)).sum(-1).clamp_min(0)
            kl_sum += float(kl.sum())
            kl_max = max(kl_max, float(kl.max()))
            if following is not None and start < length - 1:
                next_tokens = following[start : start + rows].unsqueeze(-1)
                ref_nll -= float(ref_log[: len(next_tokens)].gather(-1, next_tokens).double().sum())
                cand_nll -= float(cand_log[: len(next_tokens)].gather(-1, next_tokens).double().sum())
        positions += length
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
    details = {"positions": positions, "greedy_tokens_matched": matches, "greedy_tokens_generated": lengths}
    return metrics, details


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy continuations share (the tokens until the first divergence)."""
    n = 0
    for x, y in zip(a, b, strict=False):  # the shorter one ends the shared prefix
        if x != y:
            break
        n += 1
    return n


def _compare_encoder(reference: dict, candidate: dict, attention_mask, device: str) -> tuple[dict, dict]:
    import torch

    mask = attention_mask.unsqueeze(-1).float().to(device)
    ref, cand = reference["hidden"].to(device).float(), candidate["hidden"].to(device).float()
    pooled_ref, pooled_cand = (ref * mask).sum(1) / mask.sum(1), (cand * mask).sum(1) / mask.sum(1)
    cosine = torch.nn.functional.cosine_similarity(pooled_ref, pooled_cand, dim=-1)
    diff = ((ref - cand).abs() * mask).amax()
    metrics = {"cosine_min": float(cosine.min()), "cosine_mean": float(cosine.mean()), "max_abs_diff": float(diff)}
    return metrics, {"cosine_per_input": [round(float(c), 6) for c in cosine]}


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: import for FOLDER TASK DEVICE [MODULE ...], then read SPEC.pt and OUT.pt from stdin, `run`
    SPEC.pt's spec, write OUT.pt."""
    import torch

    folder, task, device, *modules = argv if argv is not None else sys.argv[1:]
    with _Stage("imports", _to_stderr):
        import_for(folder, task, device, modules)
    spec_file, out_file = sys.stdin.readline().rstrip("\n"), sys.stdin.readline().rstrip("\n")
    if not out_file:
        return 0  # the parent stopped before it had a model for this worker
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # int8 on CPU logs a cast warning per matmul
    spec = torch.load(spec_file, weights_only=True)
    device, cap = spec["device"], spec.get("max_device_memory")
    if device.startswith("cuda") and cap:  # the cap holds for this process whatever the model does
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), torch.device(device))
    outputs = run(spec, _to_stderr)
    with _Stage("save", _to_stderr):
        torch.save(outputs, out_file)
    return 0


def import_for(folder: str, task: str, device: str, modules: list[str] | tuple[str, ...]) -> None:
    """Import transformers' modeling code for `folder`'s architecture and `modules`, and start CUDA on a CUDA
    `device`: the work a fresh process does before it can load a model, done before the model exists."""
    import torch
    from transformers import AutoConfig

    for module in modules:
        importlib.import_module(module)
    try:
        model_class(task)._model_mapping[type(AutoConfig.from_pretrained(folder))]  # imports the modeling module
    except (KeyError, OSError, ValueError):
        pass  # loading the model reports what is wrong, with the message users know
    if device.startswith("cuda"):
        torch.empty(1, device=device)


if __name__ == "__main__":
    code = main()
    # The outputs are saved: skip the interpreter's teardown of torch and the model (1.5 s of a 0.3B model's CPU
    # worker, waited for by the build).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
