"""What a task family is: the `TaskFamily` protocol every module of `builder.tasks` satisfies, and the helpers they
share (numbers over arrays; none imports torch or numpy before it runs).

A family owns everything the build and the gate must know about a kind of model: the transformers class both gate
runs load, the token ids it is probed with, its probes and the metrics they give, which gates apply and their
default bounds, how its ONNX graph is fed and compared, and the card's wording. The gate runs through a family; it
never compares task names.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal, Protocol

LATENCY_TOKENS = 64
"""Tokens of the latency probe (one forward, batch 1) every family's inputs carry as `latency_ids`."""

Runner = Literal["transformers", "onnxruntime"]
"""How a build kind's gate runs the artifact: reloaded by stock transformers, or as a graph on onnxruntime."""


class Stage(Protocol):
    def step(self, done: int) -> None: ...


class ProbeRun(Protocol):
    """What a gate run lends a family's `probe` (`builder.steps.metrics` implements it): a forward on the run's
    device under the run's locks, a device synchronisation, and stages reported as progress."""

    device: str

    def forward(self, model, ids, **kwargs) -> Any: ...

    def synchronize(self) -> None: ...

    def stage(self, name: str, total: int | None = None) -> AbstractContextManager[Stage]: ...


class TaskFamily(Protocol):
    """One family of tasks (a module of `builder.tasks`, registered in `builder.tasks.FAMILIES`)."""

    NAME: str
    """The family's name (the registry's key)."""
    TASKS: tuple[str, ...]
    """The optimum task names it verifies."""
    PROBE_CLASS: str
    """The transformers Auto class both runs of the transformers gate load (the head the metrics read)."""
    GRAPH: Literal["decoder", "encoder"]
    """How its ONNX graph is called: a decoder (input ids, an optional KV cache, logits) or an encoder (input ids,
    attention mask, one output)."""

    def gates(self, runner: Runner, task: str) -> tuple[str, ...]:
        """The `builder.gates` keys a `runner` gate computes for `task`."""
        ...

    def default_thresholds(self, scheme: str, task: str) -> dict[str, float]:
        """Default bounds under a build kind's `scheme` ("bnb-nf4", "onnx-float32", ...); KeyError when the
        family has none for it (the build is refused before anything runs)."""
        ...

    def inputs(self, tokenizer, prompts: Sequence[str]) -> dict:
        """The token ids both transformers gate runs see (tokenized once, by the build process)."""
        ...

    def describe_inputs(self, inputs: dict, prompts: Sequence[str], max_new_tokens: int) -> dict:
        """What the report records of `inputs`."""
        ...

    def probe(self, model, inputs: dict, max_new_tokens: int, run: ProbeRun) -> dict:
        """The model's outputs on `inputs` as CPU tensors, and `throughput_tokens_per_s`."""
        ...

    def compare(self, inputs: dict, reference: dict, candidate: dict, device: str) -> tuple[dict, dict]:
        """(metrics, per-input details) of a candidate's probe outputs against the reference's."""
        ...

    def onnx_prompts(self, prompts: Sequence[str]) -> list[str]:
        """What the ONNX gate compares on: the recipe's prompts and the family's own inputs."""
        ...

    def onnx_feed(self, session, reference, tokenizer, prompt: str) -> dict:
        """The graph's inputs for `prompt` alone (the profiled run that measures node placement)."""
        ...

    def onnx_metrics(
        self,
        session,
        reference,
        tokenizer,
        prompts: Sequence[str],
        max_new_tokens: int,
        task: str,
        generated: list[list[int]] | None,
    ) -> dict:
        """The ONNX graph's metrics, per-output differences and latencies against the PyTorch `reference`:
        `{"metrics": ..., "outputs": ..., "performance": ...}`. `generated`: each prompt's greedy continuation made
        by the artifact's own runtime (onnxruntime-genai's Generator), where the gate has one."""
        ...

    def usage(self) -> str:
        """The card's lines that run a loaded `model` with its `tokenizer`."""
        ...

    def ort_class(self, task: str) -> str:
        """optimum's `ORTModelFor*` class that loads an ONNX export of `task`."""
        ...


# --- shared by the families' ONNX comparisons ---------------------------------------------------------------------


def difference(actual, expected) -> dict:
    """max_abs_diff and relative_error (||actual - expected|| / ||expected||) of two arrays."""
    import numpy as np

    delta = np.abs(actual - expected)
    scale = float(np.linalg.norm(expected)) or 1.0
    return {
        "max_abs_diff": float(delta.max()) if delta.size else 0.0,
        "relative_error": float(np.linalg.norm(actual - expected)) / scale,
    }


def latency(candidate: Callable[[], Any], reference: Callable[[], Any], repeats: int = 5) -> dict:
    """Median milliseconds of one call of each, and their ratio `speedup`."""

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
