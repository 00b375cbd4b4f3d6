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
from dataclasses import dataclass
from pathlib import Path
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


@dataclass(frozen=True)
class CardUsage:
    """A family's part of the card's transformers snippet, which loads `model` and `tokenizer` before `run`."""

    run: str
    """The lines that run the loaded model (each ending in a newline)."""
    imports: str = ""
    """Imports `run` needs besides transformers' (each ending in a newline)."""
    intro: str = ""
    """Words after the card's opening sentence, before the snippet (a leading space; another snippet first)."""


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

    def compare(self, inputs: dict, reference: dict, candidate: dict, device: str) -> tuple[dict, dict, dict]:
        """(metrics, intervals, per-input details) of a candidate's probe outputs against the reference's;
        `intervals`: a 95% interval `[low, high]` per metric a gate may bound (`block_interval`,
        `resampled_interval`), none for an extreme such as `max_abs_diff`."""
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
        """The ONNX graph's metrics, their 95% intervals, per-output differences and latencies against the PyTorch
        `reference`: `{"metrics": ..., "intervals": ..., "outputs": ..., "performance": ...}`. `generated`: each
        prompt's greedy continuation made by the artifact's own runtime (onnxruntime-genai's Generator), where the
        gate has one."""
        ...

    def transformers_usage(self, task: str, folder: Path | None, repo_id: str) -> CardUsage:
        """The card's snippet for `task` with stock transformers, given the artifact's `folder` (None: the card
        assumes no chat template and no pooling config) and the `repo_id` its snippets load from."""
        ...

    def onnx_usage(self, task: str, folder: Path | None) -> str:
        """The card's lines that run an ONNX export of `task` as onnxruntime's `session` (with `graph_inputs`, its
        inputs by name, and `tokenizer`), given the artifact's `folder` as `transformers_usage` does."""
        ...

    def ort_class(self, task: str) -> str:
        """optimum's `ORTModelFor*` class that loads an ONNX export of `task`."""
        ...


# --- intervals: how far a metric could move on other text of the same kind -----------------------------------------
# A metric is measured once, on fixed inputs; its 95% interval is a percentile bootstrap (docs/recipes.md, "Intervals"):
# the inputs are resampled with replacement BOOTSTRAP_RESAMPLES times from a fixed seed (the report is reproducible)
# and the metric recomputed on each resample. Positions of one sequence are correlated (a model that goes wrong on a
# passage goes wrong for many tokens), so per-position metrics resample blocks of BOOTSTRAP_BLOCK consecutive
# positions, never across two sequences; per-sentence metrics resample sentences.

BOOTSTRAP_BLOCK = 64
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


def block_interval(sequences: Sequence, *, block: int | None = BOOTSTRAP_BLOCK, transform=None) -> list[float]:
    """The 95% interval of the mean over every position of `sequences` (per-position values, one 1-D array each),
    resampling blocks of `block` consecutive positions of a sequence (None: whole sequences), then `transform`
    (numpy's `exp` for a ratio of perplexities from a mean log-likelihood gap)."""
    import numpy as np

    sums, counts = [], []
    for values in sequences:
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        size = block or max(len(values), 1)
        for start in range(0, len(values), size):
            sums.append(values[start : start + size].sum())
            counts.append(len(values[start : start + size]))
    picks = _resamples(len(sums))
    # each resample's mean is its blocks' sum over their positions: a block that ends a sequence weighs what it holds
    estimates = np.asarray(sums)[picks].sum(1) / np.asarray(counts)[picks].sum(1)
    return _percentiles(transform(estimates) if transform is not None else estimates)


def resampled_interval(values, statistic) -> list[float]:
    """The 95% interval of `statistic` (a numpy reduction taking `axis`: `np.mean`, `np.min`) of per-sentence
    `values`, resampling sentences."""
    import numpy as np

    values = np.asarray(values, dtype=np.float64).reshape(-1)
    return _percentiles(statistic(values[_resamples(len(values))], axis=1))


def _resamples(count: int):
    """BOOTSTRAP_RESAMPLES rows of `count` indices drawn with replacement, the same for the same `count`."""
    import numpy as np

    return np.random.default_rng(BOOTSTRAP_SEED).integers(0, count, size=(BOOTSTRAP_RESAMPLES, count))


def _percentiles(estimates) -> list[float]:
    import numpy as np

    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(estimates, [tail, 1 - tail])
    return [float(low), float(high)]


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
