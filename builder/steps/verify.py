"""The verification gate: an artifact proves, before anyone can publish it, that it still computes what its source
computes.

The reference is the source model at the recipe's dtype (float16 becomes float32 on a CPU), probed by a run
(`builder.steps.metrics`) that the pipeline starts with the quantize step, so the two overlap; its outputs are kept
in the reference cache (`builder.steps.references`), so other variants of the source and rebuilds reuse them. The
candidate is the artifact as a user loads it: the folder reloaded from disk by stock transformers, or, for an ONNX
export, the onnxruntime session on the verification provider (`builder.steps.verify_onnx`). Without a device memory
cap both runs are threads of the build process, which has torch, transformers (and CUDA) started already: a fresh
process spends 10-12 s on that on an H200, longer than the quantizer, and 4.5-5.3 s on a 2-core CPU, where it takes
the cores from the quantizer. Under a cap each is a worker process of its own, held to the cap.
Both see the same token ids: the recipe's prompts and the built-in evaluation text (builder/data/). Under a device
memory cap, a model whose weights pass it runs one decoder block at a time (`builder.steps.blockwise`).

The metrics are compared with thresholds (the per-method defaults below, overridden by `verify.thresholds`); the
report goes to verify-report.json and the manifest. A miss raises `VerificationFailed` naming each metric and by how
much it missed. The thresholds, the report and the evaluation data are `builder.steps.gate`'s.
"""

from __future__ import annotations

import collections
import functools
import gc
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from builder.console import say, show_progress
from builder.context import BuildContext
from builder.errors import BuildError, VerificationFailed
from builder.gates import check
from builder.kinds import kind_of, thresholds
from builder.recipe import Bnb4Bit, Bnb8Bit, Recipe
from builder.source import folder_digest
from builder.steps import metrics as probes
from builder.steps import references, torch_defaults
from builder.steps.gate import failure_message, write_report
from builder.tasks import family
from builder.tasks.base import LATENCY_TOKENS

# --- the build step --------------------------------------------------------------------------------------------


def verify(ctx: BuildContext) -> None:
    """Verify the artifact in `ctx.workdir` against `ctx.source_dir` into `ctx.verification` (also written to
    verify-report.json), as the recipe's build kind runs its gate. Raises `VerificationFailed` naming each metric
    that missed, and by how much."""
    report = ctx.plan.kind.verify(ctx)
    write_report(ctx.workdir, report)
    ctx.verification = report
    if not report["passed"]:
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
        self.run: _Worker | _InProcess | None = None
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
            except _WorkerFailed as error:
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


def start_candidate(ctx: BuildContext) -> _Worker | _InProcess:
    """The gate's candidate run, started now on the source's architecture (the pipeline starts it with the
    quantize step, so its imports overlap the quantizer); `verify` hands it the artifact."""
    assert ctx.source_dir is not None  # set by resolve
    return candidate_run(ctx.loaded.recipe, ctx.plan.task, ctx.source_dir, ctx.device, ctx.max_gpu_memory)


def candidate_run(
    recipe: Recipe, task: str, source_dir: Path, device: str, max_device_memory: int | None
) -> _Worker | _InProcess:
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


def runner(
    preload: Path,
    task: str,
    device: str,
    label: str,
    max_device_memory: int | None,
    *,
    foreground: bool = False,
    imports: tuple[str, ...] = (),
) -> _Worker | _InProcess:
    """Where a gate run executes: a thread of this process without a device memory cap, else a worker process
    (`torch.cuda.set_per_process_memory_fraction` holds a process, not a thread, to the cap)."""
    kind = _InProcess if max_device_memory is None else _Worker
    return kind(preload, task, device, label, foreground=foreground, imports=imports)


def run_checks(
    recipe: Recipe,
    task: str,
    source_dir: Path,
    artifact_dir: Path,
    device: str,
    *,
    reference: ReferenceRun | None = None,
    candidate: _Worker | _InProcess | None = None,
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
        except _WorkerFailed as error:
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


class _WorkerFailed(Exception):
    """A run that produced no outputs; `detail` says where it ran and what it said last."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class _Progress:
    """A run's stage events (`builder.steps.metrics.Emit`) as status lines with their duration (and, in the
    `foreground`, progress bars on a terminal), and the durations in `stages`."""

    def __init__(self, label: str, foreground: bool):
        self.label, self.foreground = label, foreground
        self.stages: dict[str, float] = {}
        self._bars: dict = {}

    def __call__(self, event: dict) -> None:
        stage = event["stage"]
        if "seconds" in event:
            if stage in self._bars:
                self._bars.pop(stage).close()
            self.stages[stage] = event["seconds"]
            say(f"{self.label}: {stage} {event['seconds']:.1f} s")
        elif "done" in event and stage in self._bars:
            self._bars[stage].update(event["done"] - self._bars[stage].n)
        elif event.get("total") and self.foreground and show_progress():
            from tqdm.auto import tqdm

            self._bars[stage] = tqdm(total=event["total"], desc=f"{self.label}: {stage}", leave=False)

    def close(self) -> None:
        """Close the bars of stages that did not end (the run failed or was stopped)."""
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()


def _spec(folder: Path, task: str, dtype: str, device: str, inputs: dict, max_new_tokens: int, cap: int | None):
    """What a run probes (`builder.steps.metrics.run`)."""
    return {
        "folder": str(folder),
        "task": task,
        "dtype": dtype,
        "device": device,
        "inputs": inputs,
        "max_new_tokens": max_new_tokens,
        "max_device_memory": cap,
    }


class _Cancelled(Exception):
    """Raised inside a run in this process at its next stage event once `cancel` was called."""


class _InProcess:
    """A gate run on a thread of this process, with `_Worker`'s interface: it starts at once, importing what
    `preload`'s architecture needs (`builder.steps.metrics.import_for`) while the build goes on, and runs the
    spec `submit` gives it. Its model is freed, and CUDA's cache emptied, when it ends."""

    def __init__(
        self,
        preload: Path,
        task: str,
        device: str,
        label: str,
        *,
        foreground: bool = False,
        imports: tuple[str, ...] = (),
    ):
        self.task, self.device = task, device
        self._progress = _Progress(label, foreground)
        self._specs: queue.Queue[dict | None] = queue.Queue()
        self._outputs: dict | None = None
        self._error: str | None = None
        self._cancelled = False
        self._thread = threading.Thread(
            target=self._run, args=(str(preload), imports), name=f"builder-{label}", daemon=True
        )
        self._thread.start()

    @property
    def stages(self) -> dict[str, float]:
        return self._progress.stages

    def _emit(self, event: dict) -> None:
        if self._cancelled:
            raise _Cancelled
        self._progress(event)

    def _run(self, preload: str, imports: tuple[str, ...]) -> None:
        import torch

        try:
            with torch_defaults.exclusive():  # imports, like loads, run alone (`torch_defaults`)
                started = time.perf_counter()
                probes.import_for(preload, self.task, self.device, imports)
                seconds = time.perf_counter() - started
            self._emit({"stage": "imports", "seconds": round(seconds, 3)})
            spec = self._specs.get()
            if spec is not None:
                self._outputs = probes.run(spec, self._emit)
        except _Cancelled:
            pass
        except Exception as error:  # noqa: BLE001 (a model that does not load or run raises anything)
            self._error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:600]
        finally:
            self._progress.close()
            gc.collect()  # the model is unreferenced now; give its device memory back
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()

    def submit(self, folder: Path, dtype: str, inputs: dict, max_new_tokens: int, max_device_memory: int | None):
        """Probe `folder` in `dtype` on `inputs` (see `builder.steps.metrics.run`)."""
        self._specs.put(_spec(folder, self.task, dtype, self.device, inputs, max_new_tokens, max_device_memory))

    def result(self) -> dict:
        self._thread.join()
        if self._outputs is None:
            raise _WorkerFailed(f"in the build process: {self._error or 'the run was stopped'}")
        return self._outputs

    def cancel(self) -> None:
        """Stop the run at its next stage event and wait for it (a model load finishes first)."""
        self._cancelled = True
        self._specs.put(None)
        self._thread.join()


class _Worker:
    """One `python -m builder.steps.metrics` process. It starts at once, importing what `preload`'s architecture
    needs for `task` (and `imports`) and starting CUDA, so a worker started early has that done when `submit`
    names the model folder. Its stage lines become status lines (`_Progress`) and `stages`; `result` waits for its
    outputs."""

    def __init__(
        self,
        preload: Path,
        task: str,
        device: str,
        label: str,
        *,
        foreground: bool = False,
        imports: tuple[str, ...] = (),
    ):
        self.task, self.device = task, device
        self._progress = _Progress(label, foreground)
        self._tmp = tempfile.TemporaryDirectory(prefix="builder-verify-")
        self._spec, self._out = Path(self._tmp.name) / "spec.pt", Path(self._tmp.name) / "outputs.pt"
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        self._process = subprocess.Popen(
            [sys.executable, "-m", "builder.steps.metrics", str(preload), task, device, *imports],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self._tail: collections.deque[str] = collections.deque(maxlen=3)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def stages(self) -> dict[str, float]:
        return self._progress.stages

    def submit(self, folder: Path, dtype: str, inputs: dict, max_new_tokens: int, max_device_memory: int | None):
        """Probe `folder` in `dtype` on `inputs` (see `builder.steps.metrics.main`)."""
        import torch

        torch.save(_spec(folder, self.task, dtype, self.device, inputs, max_new_tokens, max_device_memory), self._spec)
        assert self._process.stdin is not None
        try:
            self._process.stdin.write(f"{self._spec}\n{self._out}\n")
            self._process.stdin.close()
        except BrokenPipeError:
            pass  # the worker died starting up: `result` reports its exit and last lines

    def _read(self) -> None:
        assert self._process.stderr is not None
        for line in self._process.stderr:
            if line.startswith(probes.PROGRESS):
                self._progress(json.loads(line[len(probes.PROGRESS) :]))
            elif line.strip():
                self._tail.append(line.strip())
        self._progress.close()

    def result(self) -> dict:
        import torch

        returncode = self._process.wait()
        self._reader.join()
        if returncode != 0 or not self._out.exists():
            raise _WorkerFailed(f"in a fresh process (exit {returncode}): {' | '.join(self._tail)}")
        return torch.load(self._out, weights_only=True)

    def cancel(self) -> None:
        """Stop the process if it still runs, and delete its files."""
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        if self._process.stdin is not None and not self._process.stdin.closed:
            try:
                self._process.stdin.close()
            except BrokenPipeError:
                pass
        self._reader.join()
        self._tmp.cleanup()


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
