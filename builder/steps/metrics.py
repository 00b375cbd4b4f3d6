"""Run one model on the verification inputs, and compare a reference run with a candidate run.

The gate (`builder.steps.verify`) runs the reference (the source model) and the candidate (the artifact as a user
loads it, with stock transformers) either on threads of the build process (`run`; without a device memory cap) or
each in a worker process of its own:

    python -m builder.steps.runs FOLDER TASK DEVICE [MODULE ...]      then, on stdin: SPEC.pt and OUT.pt lines

The worker starts by importing what loading FOLDER's architecture for TASK needs (`import_for`: transformers'
modeling module, the MODULEs, and CUDA), so a worker started early, before the artifact exists, has that done when
the parent names SPEC.pt. A spec holds the model folder, task, dtype, device, an optional cap on device memory and
the token ids (tokenized once, by the parent, so both runs see the same inputs); OUT.pt receives the outputs of
`run`. The parent then calls `compare`. A model whose weights pass the cap runs block by block
(`builder.steps.blockwise`). A run reports its stages as events (`PROGRESS` lines of JSON on a worker's stderr)
that the parent turns into status lines and bars.

What a model is probed with and how two runs compare is its task family's (`builder.tasks`: causal LMs on the
evaluation text and prompts, encoders on sentences); this module loads the model, lends the family a `_Run`
(forwards under the run's locks, stages as progress) and adds what every run reports: memory footprint, latency
and throughput.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from builder.checkpoint import FLOAT_DTYPES, TORCH_DTYPE_BYTES, local_weight_files, read_header
from builder.steps import torch_defaults
from builder.steps.blockwise import load_by_blocks
from builder.tasks import family

SEED = 0
LATENCY_RUNS = 3
PROGRESS = "builder-progress "
"""Prefix of the worker's stage lines on stderr: `{"stage": ..., "total": n}`, `{"stage": ..., "done": k}`,
`{"stage": ..., "seconds": s}` (the stage ended)."""


Emit = Callable[[dict], None]
"""Where a run's stage events go: a worker prints them on stderr, a run in the build process hands them over."""


class Stage:
    """Report one stage (its count where it has one) and its duration to `emit`."""

    def __init__(self, name: str, emit: Emit, total: int | None = None):
        self.name, self.emit, self.total = name, emit, total

    def __enter__(self) -> Stage:
        self.started = time.perf_counter()
        self.emit({"stage": self.name, "total": self.total})
        return self

    def step(self, done: int) -> None:
        self.emit({"stage": self.name, "done": done})

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.emit({"stage": self.name, "seconds": round(time.perf_counter() - self.started, 3)})


def to_stderr(event: dict) -> None:
    print(PROGRESS + json.dumps(event), file=sys.stderr, flush=True)


def model_class(task: str):
    """The transformers Auto class the gate loads a `task` model with: its task family's (`PROBE_CLASS`)."""
    import transformers

    return getattr(transformers, family(task).PROBE_CLASS)


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
        with torch_defaults.exclusive(), _without_loading_bars(), Stage("load", emit):
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


def probe(model, inputs: dict, task: str, max_new_tokens: int, device: str, emit: Emit = to_stderr) -> dict:
    """Outputs of `model` on `inputs` (see `builder.steps.verify.tokenize_inputs`) as CPU tensors (logits in the
    model's own dtype: casting them is the comparison's business), plus `footprint_bytes`, `parameters`,
    `latency_ms` (median forward of LATENCY_TOKENS tokens, batch 1) and `throughput_tokens_per_s` (over the
    evaluation pass). Stages go to `emit`."""
    import torch

    torch.manual_seed(SEED)
    run = _Run(device, emit)
    with torch.inference_mode():
        run.forward(model, inputs["latency_ids"][:, :8])  # warm-up: 4-bit CPU kernels repack on first use
        outputs = family(task).probe(model, inputs, max_new_tokens, run)
        outputs["latency_ms"] = _latency_ms(model, inputs["latency_ids"], run)
    outputs["footprint_bytes"] = int(model.get_memory_footprint())
    outputs["parameters"] = _parameter_count(model)
    return outputs


class _Run:
    """What a family's probe borrows from the run (`builder.tasks.base.ProbeRun`): forwards on `device` while no
    model loads (`torch_defaults.shared`), synchronisation, stages reported to `emit`."""

    def __init__(self, device: str, emit: Emit):
        self.device, self.emit = device, emit

    def forward(self, model, ids, **kwargs):
        """`model(input_ids=ids, **kwargs)` (or `model.generate`'s), tensors moved to the device."""
        import torch

        moved = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        with torch_defaults.shared():
            return model(input_ids=ids.to(self.device), **moved)

    def synchronize(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(self.device)

    def stage(self, name: str, total: int | None = None) -> Stage:
        return Stage(name, self.emit, total)


def _latency_ms(model, ids, run: _Run) -> float:
    times = []
    with run.stage("latency", LATENCY_RUNS) as stage:
        for done in range(1, LATENCY_RUNS + 1):
            run.synchronize()
            started = time.perf_counter()
            run.forward(model, ids)
            run.synchronize()
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


def compare(task: str, inputs: dict, reference: dict, candidate: dict, device: str = "cpu") -> tuple[dict, dict]:
    """(metrics, details) of candidate against reference on `inputs`: the task family's (`compare`), plus the
    loaded memory footprint ratio; computed on `device`."""
    metrics, details = family(task).compare(inputs, reference, candidate, device)
    metrics["footprint_ratio"] = candidate["footprint_bytes"] / reference["footprint_bytes"]
    return metrics, details


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
