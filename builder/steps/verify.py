"""The bitsandbytes gate: an artifact proves, before anyone can publish it, that it still computes what its source
computes (`builder.steps.verify_onnx` is the ONNX kind's).

The reference is the source model at the recipe's dtype (float16 becomes float32 on a CPU), probed by a run that the
pipeline starts with the quantize step, so the two overlap; its outputs are kept in the reference cache
(`builder.steps.references`), so other variants of the source and rebuilds reuse them. The candidate is the folder
reloaded from disk by stock transformers. Where each run executes is `builder.steps.runs`'; what it probes and how
the two compare is the task family's (`builder.tasks`), run by `builder.steps.metrics`. Both see the same token ids.
Under a device memory cap, a model whose weights pass it runs one decoder block at a time
(`builder.steps.blockwise`).

The metrics are compared with the bounds of `builder.kinds.thresholds` (the task's and kind's defaults, overridden
by `verify.thresholds`); the report goes to verify-report.json and the manifest. A miss raises `VerificationFailed`
naming each metric and by how much it missed (`builder.steps.gate`).
"""

from __future__ import annotations

import functools
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from builder.console import say
from builder.context import BuildContext
from builder.errors import BuildError, VerificationFailed
from builder.gates import check
from builder.kinds import kind_of, thresholds
from builder.recipe import Bnb4Bit, Bnb8Bit, Recipe
from builder.source import folder_digest
from builder.steps import metrics as probes
from builder.steps import references
from builder.steps.gate import failure_message, write_report
from builder.steps.runs import GateRun, RunFailed, runner
from builder.tasks import family
from builder.tasks.base import LATENCY_TOKENS
from builder.verification import REPORT_VERSION, VerificationReport

# --- the build step --------------------------------------------------------------------------------------------


def verify(ctx: BuildContext) -> None:
    """Verify the artifact in `ctx.workdir` against `ctx.source_dir` into `ctx.verification` (also written to
    verify-report.json), as the recipe's build kind runs its gate. Raises `VerificationFailed` naming each metric
    that missed, and by how much."""
    report = VerificationReport.model_validate(ctx.plan.kind.verify(ctx))
    write_report(ctx.workdir, report)
    ctx.verification = report
    if not report.passed:
        raise VerificationFailed(failure_message(ctx.loaded.recipe.name, report))


def start_reference(ctx: BuildContext) -> ReferenceRun:
    """The build's reference run, started now (the pipeline starts it with the quantize step, so it overlaps it)."""
    assert ctx.source_dir is not None  # set by resolve
    return ReferenceRun(
        ctx.loaded.recipe,
        ctx.plan.task,
        ctx.source_dir,
        ctx.device,
        revision=ctx.plan.source.pin,
        use_cache=ctx.use_cache,
        max_device_memory=ctx.max_gpu_memory,
    )


class ReferenceRun:
    """The source model's outputs on the evaluation inputs: from the reference cache (`builder.steps.references`)
    when it holds them and `use_cache`, else computed by a run (`runner`) started here and stored when it ends.

    `revision` is the source's (None: its folder's digest, computed here); while it is a future (a folder hashed
    for the first time, `ResolvedSource.pin`) the cache is not looked up: the run starts at once and its outputs
    are stored under the digest when both are done."""

    def __init__(
        self,
        recipe: Recipe,
        task: str,
        source_dir: Path,
        device: str,
        *,
        revision: str | Future[str] | None = None,
        use_cache: bool = True,
        max_device_memory: int | None = None,
    ):
        from transformers import AutoConfig

        self.started = time.perf_counter()
        self.label = f"{recipe.name}: verify: reference"
        self.dtype = reference_dtype(recipe.source.dtype, AutoConfig.from_pretrained(source_dir), device)
        self.inputs = tokenize_inputs(source_dir, task, recipe.verify.prompts)
        if isinstance(revision, Future) and revision.done():
            revision = revision.result()
        self._revision = revision or f"sha256:{folder_digest(Path(source_dir))}"
        self._source_dir, self._task, self._device = source_dir, task, device
        self._max_new_tokens, self._max_device_memory = recipe.verify.max_new_tokens, max_device_memory
        self.outputs: dict | None = None
        self.cached = False
        self.run: GateRun | None = None
        self._store: threading.Thread | None = None
        # A cache entry is read (and its digest checked) on a thread, off the quantize step's path; a damaged one
        # is found out in `result`, which then computes the outputs after all.
        self._cache_read: threading.Thread | None = None
        if use_cache and isinstance(self._revision, str) and references.entry_path(self.key).exists():
            self._cache_read = threading.Thread(target=self._read_cache, name="builder-reference-cache", daemon=True)
            self._cache_read.start()
        else:
            if isinstance(self._revision, Future):
                say(f"{self.label}: computing it while the source's files are hashed for the first time")
            self._start_run()

    @functools.cached_property
    def key(self) -> str:
        """The reference cache's key (waits for the source's digest)."""
        revision = self._revision if isinstance(self._revision, str) else self._revision.result()
        return references.reference_key(
            revision=revision,
            dtype=self.dtype,
            device_kind=references.device_kind(self._device),
            inputs=self.inputs,
            task=self._task,
            max_new_tokens=self._max_new_tokens,
        )

    def _read_cache(self) -> None:
        self.outputs = references.load(self.key)

    def _start_run(self) -> None:
        self.run = runner(self._source_dir, self._task, self._device, self.label, self._max_device_memory)
        self.run.submit(self._source_dir, self.dtype, self.inputs, self._max_new_tokens, self._max_device_memory)

    def result(self) -> dict:
        """The outputs (waiting for the cache read or the run); raises `BuildError` when the source does not
        run. Computed outputs are stored in the cache on a thread (`cancel` waits for it)."""
        if self._cache_read is not None:
            self._cache_read.join()
            self._cache_read = None
            self.cached = self.outputs is not None
            if self.cached:
                say(f"{self.label}: reused from the cache ({references.cache_dir()})")
            else:
                self._start_run()
        if self.outputs is None:
            assert self.run is not None
            try:
                outputs = self.run.result()
            except RunFailed as error:
                raise BuildError(
                    f"the source model does not load and run to compute the reference outputs {error.detail}"
                ) from None
            self.outputs = outputs
            self._store = threading.Thread(target=self._write_cache, name="builder-store")
            self._store.start()
        self.seconds = time.perf_counter() - self.started
        return self.outputs

    def _write_cache(self) -> None:
        assert self.outputs is not None
        if isinstance(self._revision, Future) and self._revision.exception() is not None:
            return  # the source could not be hashed: the build fails on it, and there is no key to store under
        references.store(self.key, self.outputs)

    def running(self) -> bool:
        """Whether a run is computing the outputs (not a cache read)."""
        return self.run is not None and self.outputs is None

    @property
    def stages(self) -> dict[str, float]:
        """Seconds per stage of the run that computed the outputs ({} when they came from the cache)."""
        return self.run.stages if self.run is not None else {}

    def cancel(self) -> None:
        """Stop the run if it still runs; wait for the cache to be written."""
        if self.run is not None:
            self.run.cancel()
        if self._store is not None:
            self._store.join()


def start_candidate(ctx: BuildContext) -> GateRun:
    """The gate's candidate run, started now on the source's architecture (the pipeline starts it with the
    quantize step, so its imports overlap the quantizer); `verify` hands it the artifact."""
    assert ctx.source_dir is not None  # set by resolve
    return candidate_run(ctx.loaded.recipe, ctx.plan.task, ctx.source_dir, ctx.device, ctx.max_gpu_memory)


def candidate_run(recipe: Recipe, task: str, source_dir: Path, device: str, max_device_memory: int | None) -> GateRun:
    """The artifact's run (`runner`), importing what `source_dir`'s architecture (and the recipe's quantizer)
    needs to load."""
    quantized = isinstance(recipe.quantize, (Bnb4Bit, Bnb8Bit))
    return runner(
        source_dir,
        task,
        device,
        f"{recipe.name}: verify: candidate",
        max_device_memory,
        foreground=True,
        imports=("bitsandbytes",) if quantized else (),
    )


def run_checks(
    recipe: Recipe,
    task: str,
    source_dir: Path,
    artifact_dir: Path,
    device: str,
    *,
    reference: ReferenceRun | None = None,
    candidate: GateRun | None = None,
    revision: str | None = None,
    use_cache: bool = True,
    max_device_memory: int | None = None,
    expected_footprint: float | None = None,
) -> dict:
    """Reference (the source; cached, or run by `runner`) vs candidate (the artifact reloaded, run by `runner`): the
    verification report. `reference` and `candidate` (`candidate_run`) are runs already started for this check;
    `max_device_memory` caps each run's device memory, and a model whose weights pass it runs block by block. On a
    GPU with room for both models the candidate runs while the reference still computes."""
    started = time.perf_counter()
    bounds = thresholds(kind_of(recipe), recipe, task, expected_footprint)
    if reference is None:
        reference = ReferenceRun(
            recipe,
            task,
            source_dir,
            device,
            revision=revision,
            use_cache=use_cache,
            max_device_memory=max_device_memory,
        )
    if candidate is None:
        candidate = candidate_run(recipe, task, source_dir, device, max_device_memory)
    dtype, inputs = reference.dtype, reference.inputs
    report: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "passed": False,
        "task": task,
        "device": device,
        "provider": None,
        "metrics": {},
        "thresholds": bounds,
        "failures": [],
        "performance": {},
    }
    submit = (artifact_dir, dtype, inputs, recipe.verify.max_new_tokens, max_device_memory)
    try:
        overlapped = reference.running() and _room_for_both(source_dir, artifact_dir, dtype, device, max_device_memory)
        if overlapped:
            candidate.submit(*submit)
        outputs = reference.result()
        if not overlapped:
            candidate.submit(*submit)
        try:
            candidate_outputs = candidate.result()
        except RunFailed as error:
            message = f"the artifact does not load and run with stock transformers {error.detail}"
            report["failures"] = [{"metric": "loads", "value": None, "threshold": None, "message": message}]
            reference.cancel()
            return report
    except BaseException:
        reference.cancel()
        raise
    finally:
        candidate.cancel()
    compared = time.perf_counter()
    # On a GPU the logits (tokens x vocabulary, twice) are compared there; under a cap the build keeps off it.
    on_device = device.startswith("cuda") and max_device_memory is None
    measured, details = probes.compare(task, inputs, outputs, candidate_outputs, device if on_device else "cpu")
    compare_seconds = time.perf_counter() - compared
    reference.cancel()  # the cache entry was written while the logits were compared
    weight_bytes = sum(p.stat().st_size for p in artifact_dir.glob("*.safetensors"))
    measured |= {"artifact_bytes": weight_bytes, "bits_per_param": 8 * weight_bytes / outputs["parameters"]}
    report["metrics"] = {k: _rounded(v) for k, v in measured.items()}
    report["failures"] = check(measured, bounds)
    report["passed"] = not report["failures"]
    report["performance"] = _performance(outputs, candidate_outputs)
    report["performance"]["verification_seconds"] = round(time.perf_counter() - started, 2)
    report["performance"]["reference_seconds"] = round(reference.seconds, 2)
    report["performance"]["compare_seconds"] = round(compare_seconds, 2)
    report["reference"] = {
        "model": "source",
        "dtype": dtype,
        "cached": reference.cached,
        "key": reference.key,
        "stages": reference.stages,
        **_execution(outputs),
    }
    report["candidate"] = {"overlapped": overlapped, "stages": candidate.stages, **_execution(candidate_outputs)}
    report["inputs"] = family(task).describe_inputs(inputs, recipe.verify.prompts, recipe.verify.max_new_tokens)
    report["inputs"] |= details
    return report


def _execution(outputs: dict) -> dict:
    """How a run executed: whole or block by block (with the offload record), and the device memory peak of the
    process it ran in."""
    described = {"forward": outputs.get("forward", "whole")}
    for key in ("offload", "device_peak_bytes"):
        if key in outputs:
            described[key] = outputs[key]
    return described


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


def _room_for_both(source_dir: Path, artifact_dir: Path, dtype: str, device: str, cap: int | None) -> bool:
    """Whether the candidate may run while the reference computes: on a CUDA device, with no memory cap (each run
    may use all of it), when the free memory holds both models' weights with room to spare. On a CPU the two would
    share the cores and gain nothing."""
    if not device.startswith("cuda") or cap is not None:
        return False
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    weights = probes.weight_bytes(str(source_dir), dtype) + probes.weight_bytes(str(artifact_dir), dtype)
    return free >= 1.25 * weights + 4 * 2**30


def tokenize_inputs(source_dir: Path, task: str, prompts: tuple[str, ...]) -> dict:
    """Token ids for both runs, from the source's tokenizer: what the task's family probes with (`inputs`)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source_dir)
    except (OSError, ValueError) as error:
        raise BuildError(
            f"cannot load the tokenizer of {source_dir} to verify the artifact ({error}); the source "
            "folder needs its tokenizer files"
        ) from None
    return family(task).inputs(tokenizer, prompts)


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


def _rounded(value):
    return round(value, 6) if isinstance(value, float) else value
