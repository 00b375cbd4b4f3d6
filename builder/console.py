"""Where builder's output goes: results on stdout; status lines and progress bars on stderr.

Progress bars (builder's, transformers', huggingface_hub's) show only when stderr is a terminal, so CI logs and
pipes get plain lines. `--quiet` silences the status lines and the bars; errors and results still print. Both are
passed on as environment variables because the heavy libraries read them when first imported, and worker
processes (`--jobs`) and the verification subprocess inherit them.
"""

from __future__ import annotations

import os
import sys
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
    with environment(settings):
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


def say(message: str) -> None:
    """A status line on stderr, unless quiet."""
    if os.environ.get(QUIET_ENV) != "1":
        print(message, file=sys.stderr, flush=True)
