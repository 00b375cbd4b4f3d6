"""Where a gate run executes, behind one interface (`GateRun`): a thread of the build process (`InProcessRun`), or
a worker process of its own (`WorkerRun`, this module's `main`), chosen by `runner`.

Without a device memory cap both gate runs are threads of the build process, which has torch, transformers (and
CUDA) started already: a fresh process spends 10-12 s on that on an H200, longer than the quantizer, and 4.5-5.3 s
on a 2-core CPU, where it takes the cores from the quantizer. Under a cap each is a worker process, held to the cap
(`torch.cuda.set_per_process_memory_fraction` holds a process, not a thread). Either starts at once, importing what
the model's architecture needs, and probes the model folder `submit` names (`builder.steps.metrics.run`).

    python -m builder.steps.runs FOLDER TASK DEVICE [MODULE ...]      then, on stdin: SPEC.pt and OUT.pt lines
"""

from __future__ import annotations

import collections
import gc
import json
import logging
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Protocol

from builder.console import say, show_progress
from builder.steps import metrics as probes
from builder.steps import torch_defaults


class GateRun(Protocol):
    """One run of the gate (the reference or the candidate): started early, handed a model folder by `submit`,
    its outputs by `result` (`RunFailed` when it produced none), stopped by `cancel`."""

    @property
    def stages(self) -> dict[str, float]: ...

    def submit(
        self, folder: Path, dtype: str, inputs: dict, max_new_tokens: int, max_device_memory: int | None
    ) -> None: ...

    def result(self) -> dict: ...

    def cancel(self) -> None: ...


def runner(
    preload: Path,
    task: str,
    device: str,
    label: str,
    max_device_memory: int | None,
    *,
    foreground: bool = False,
    imports: tuple[str, ...] = (),
) -> GateRun:
    """Where a gate run executes: a thread of this process without a device memory cap, else a worker process
    (`torch.cuda.set_per_process_memory_fraction` holds a process, not a thread, to the cap)."""
    kind = InProcessRun if max_device_memory is None else WorkerRun
    return kind(preload, task, device, label, foreground=foreground, imports=imports)


class RunFailed(Exception):
    """A run that produced no outputs; `detail` says where it ran and what it said last."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class Progress:
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
            say(f"{self.label}: {stage} {event['seconds']:.1f} s", stage="verify")  # it may run ahead of the step
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


class InProcessRun:
    """A gate run on a thread of this process, with `WorkerRun`'s interface: it starts at once, importing what
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
        self._progress = Progress(label, foreground)
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
            raise RunFailed(f"in the build process: {self._error or 'the run was stopped'}")
        return self._outputs

    def cancel(self) -> None:
        """Stop the run at its next stage event and wait for it (a model load finishes first)."""
        self._cancelled = True
        self._specs.put(None)
        self._thread.join()


class WorkerRun:
    """One `python -m builder.steps.metrics` process. It starts at once, importing what `preload`'s architecture
    needs for `task` (and `imports`) and starting CUDA, so a worker started early has that done when `submit`
    names the model folder. Its stage lines become status lines (`Progress`) and `stages`; `result` waits for its
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
        self._progress = Progress(label, foreground)
        self._tmp = tempfile.TemporaryDirectory(prefix="builder-verify-")
        self._spec, self._out = Path(self._tmp.name) / "spec.pt", Path(self._tmp.name) / "outputs.pt"
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        self._process = subprocess.Popen(
            [sys.executable, "-m", "builder.steps.runs", str(preload), task, device, *imports],
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
        """Probe `folder` in `dtype` on `inputs` (see `main` below)."""
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
            raise RunFailed(f"in a fresh process (exit {returncode}): {' | '.join(self._tail)}")
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


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: import for FOLDER TASK DEVICE [MODULE ...], then read SPEC.pt and OUT.pt from stdin, probe
    SPEC.pt's spec (`builder.steps.metrics.run`), write OUT.pt."""
    import torch

    folder, task, device, *modules = argv if argv is not None else sys.argv[1:]
    with probes.Stage("imports", probes.to_stderr):
        probes.import_for(folder, task, device, modules)
    spec_file, out_file = sys.stdin.readline().rstrip("\n"), sys.stdin.readline().rstrip("\n")
    if not out_file:
        return 0  # the parent stopped before it had a model for this worker
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # int8 on CPU logs a cast warning per matmul
    spec = torch.load(spec_file, weights_only=True)
    device, cap = spec["device"], spec.get("max_device_memory")
    if device.startswith("cuda") and cap:  # the cap holds for this process whatever the model does
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), torch.device(device))
    outputs = probes.run(spec, probes.to_stderr)
    with probes.Stage("save", probes.to_stderr):
        torch.save(outputs, out_file)
    return 0


if __name__ == "__main__":
    code = main()
    # The outputs are saved: skip the interpreter's teardown of torch and the model (1.5 s of a 0.3B model's CPU
    # worker, waited for by the build).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
