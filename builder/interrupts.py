"""Ctrl-C and SIGTERM that cannot be lost.

Python raises KeyboardInterrupt wherever the main thread happens to be when SIGINT arrives; inside a weakref
callback or a `__del__` that exception is printed as "Exception ignored" and dropped, and the build went on to
install its artifact and exit 0. SIGTERM's default action killed the process without cleanup.

`handling_signals()` routes both signals to a handler that records the request and raises `Interrupted` (so long
work stops promptly); the pipeline calls `check()` at every step boundary, inside long loops and before the final
rename, so a request whose exception was swallowed is still acted on there. The CLI exits 130 (SIGINT) or 143
(SIGTERM). Once a command is over, `finished()` ignores both, so they cannot change its exit code.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_requested: list[int] = []


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM was received; `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _record(signum: int, frame: object) -> None:
    _requested.append(signum)
    raise Interrupted(signum)


def check() -> None:
    """Raise `Interrupted` when a signal was received, even if the exception its handler raised was swallowed."""
    if _requested:
        raise Interrupted(_requested[0])


def requested() -> int | None:
    """The first signal received since `handling_signals` began, or None."""
    return _requested[0] if _requested else None


@contextmanager
def handling_signals() -> Iterator[None]:
    """Route SIGINT and SIGTERM to the recording handler for the block (main thread only; elsewhere, a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _record) for signum in (signal.SIGINT, signal.SIGTERM)}
    _requested.clear()
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _requested.clear()


def finished() -> None:
    """The command is over (its result printed, its files in place): SIGINT and SIGTERM are ignored from now on, so
    one that lands in the interpreter's teardown (1.3-1.8 s once bitsandbytes, and with it torch._dynamo, is
    imported) leaves the command's exit code alone instead of killing the process (-2, -15). Only an ignored
    signal survives the teardown: it resets any handler written in Python to the default action first."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
