"""Where builder's output goes: results on stdout; status lines and progress bars on stderr.

Progress bars (builder's, transformers', huggingface_hub's) show only when stderr is a terminal, so CI logs and
pipes get plain lines. `--quiet` silences the status lines and the bars; errors and results still print. Both are
passed on as environment variables because the heavy libraries read them when first imported, and worker
processes (`--jobs`) and the verification subprocess inherit them.

Inside `library_noise_filtered()` (a command, a build), the libraries' messages that tell a user nothing they could
act on are dropped at their source, by logger or warning category and message (`_NOISE_LOGS`, `_NOISE_WARNINGS`);
every other warning prints once per message, not once per call site and filter change; with `--quiet` none does, nor
any library log line below ERROR.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

QUIET_ENV = "BUILDER_QUIET"
"""Set to 1 for `--quiet` (also usable on its own, e.g. in CI)."""


@contextmanager
def configured(*, quiet: bool) -> Iterator[None]:
    """Apply `--quiet` and the terminal check for the block; restore the environment after it."""
    quiet = quiet or os.environ.get(QUIET_ENV) == "1"
    settings = {QUIET_ENV: "1"} if quiet else {}
    if quiet or not sys.stderr.isatty():
        # Read when the libraries are first imported: huggingface_hub the first (transformers' bars follow it), tqdm
        # (>= 4.66) the second.
        settings |= {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
    with environment(settings), library_noise_filtered():
        yield


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """`values` in os.environ for the block; each variable gets its old value (or absence) back after it."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def show_progress() -> bool:
    """Whether builder's own progress bars draw (the libraries' bars follow the environment set above)."""
    return os.environ.get(QUIET_ENV) != "1" and sys.stderr.isatty()


def say(message: str, *, stage: str | None = None) -> None:
    """A status line on stderr, unless quiet. The line of work done ahead of its build `stage` (a gate run that
    starts during the quantize step) waits for `begin_stage(stage)`, so a build's lines stay in stage order."""
    if os.environ.get(QUIET_ENV) == "1":
        return
    with _staging:
        if stage is not None and _begun is not None and stage not in _begun:
            _held.append((stage, message))
            return
    print(message, file=sys.stderr, flush=True)


_staging = threading.Lock()
_begun: set[str] | None = None  # the stages of the build under way that began; None: no build (`builder verify`)
_held: list[tuple[str, str]] = []


def begin_stage(stage: str, message: str) -> None:
    """Say that the build's `stage` begins, then the lines said ahead of it."""
    global _begun
    with _staging:
        _begun = (_begun or set()) | {stage}
        ahead = [line for name, line in _held if name == stage]
        _held[:] = [(name, line) for name, line in _held if name != stage]
    for line in (message, *ahead):
        say(line)


def end_stages() -> None:
    """The build is over: lines still waiting for a stage that never began print now; the next build starts anew."""
    global _begun
    with _staging:
        ahead = [line for _, line in _held]
        _held.clear()
        _begun = None
    for line in ahead:
        say(line)


# Log lines of the libraries, by logger: the start of each message dropped.
_NOISE_LOGS: dict[str, tuple[str, ...]] = {
    # Every LLM.int8() forward on a CPU, thousands per build: bitsandbytes computes int8 in float16 by design.
    "bitsandbytes.autograd._functions": ("MatMul8bitLt: inputs will be cast",),
    # At import, without the optional `kernels` package or the network: bitsandbytes uses its own CPU kernel.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    # Each torch.onnx.export without torchvision, 4 lines: its detection ops are not in a language model's graph.
    "torch.onnx._internal.exporter._registration": ("torchvision is not installed",),
}

# Warnings of the libraries, by the start of their message (a regex) and their category.
_NOISE_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # torch.onnx.export (torch 2.13) calling torch's own deprecated pytree API; raised as if from copyreg.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # torch.onnx.export, once per dynamic axis shared by several inputs (batch_size, ...): the one name is kept.
    (r"# The axis name: \S+ will not be used, since it shares the same shape constraints", UserWarning),
)

_filtering = threading.Lock()
_active = 0  # open `library_noise_filtered` blocks; the log filter drops only while one is open


class _NoiseFilter(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_active and isinstance(record.msg, str) and record.msg.startswith(self.prefixes))


def _once(show):
    """`show` for each warning message the first time only. Python's own "once" forgets what it showed whenever
    anyone changes the filters, which torch and transformers do on every call."""
    shown: set[tuple[str, type]] = set()

    def show_once(message, category, filename, lineno, file=None, line=None):
        if (str(message), category) not in shown:
            shown.add((str(message), category))
            show(message, category, filename, lineno, file, line)

    return show_once


@contextmanager
def library_noise_filtered() -> Iterator[None]:
    """Drop the libraries' known noise for the block (on every thread: the gate's runs log from their own), and
    print each other warning once. Blocks nest; a program that imports builder gets its logs whole outside them.

    `warnings.catch_warnings` restores the filters of the thread that entered it, so enter this on the thread that
    owns the work (the CLI's, `builder.pipeline.build`'s), not on the worker threads it starts."""
    global _active
    quiet, disabled = os.environ.get(QUIET_ENV) == "1", logging.root.manager.disable
    with _filtering:
        for name, prefixes in _NOISE_LOGS.items():
            logger = logging.getLogger(name)
            if not any(isinstance(f, _NoiseFilter) for f in logger.filters):
                logger.addFilter(_NoiseFilter(prefixes))
        _active += 1
    if quiet:  # errors and results only: the libraries' warnings and log lines below ERROR go too
        logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():  # which also puts `showwarning` back
            if quiet:
                warnings.simplefilter("ignore")
            for message, category in _NOISE_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            warnings.showwarning = _once(warnings.showwarning)
            yield
    finally:
        logging.disable(disabled)
        with _filtering:
            _active -= 1
