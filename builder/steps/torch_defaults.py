"""One process, several threads using torch: a model load, or a gate run's imports, must not overlap anything else.

transformers' `from_pretrained` sets torch's process-wide default dtype while it builds a model (bfloat16 for a
bfloat16 load), so a tensor another thread creates meanwhile without an explicit dtype comes out in it: on an H200
the streaming quantizer wrote a 4-bit `quant_map` of 32 bytes instead of 64 while the gate's reference loaded. And two
threads importing torch's and transformers' modules at once can each find a module the other is importing half
initialized: a fresh `builder build` on a CPU failed with "cannot import name 'IndentedBuffer' from
'torch._inductor.utils'" while its quantize step and a gate run imported them. A load and a gate run's imports hold
`exclusive()`, and so does the quantize step (its transformers path loads, it imports, and its stream relies on the
defaults); each forward or `generate` of a gate run holds `shared()`. An exclusive holder waits for the current step
of the others and they wait for it; waiting exclusive holders go first (a long probe cannot starve them).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_state = threading.Condition()
_sharing = 0  # threads inside `shared()`
_loading = False  # a thread is inside `exclusive()`
_waiting = 0  # threads waiting to enter `exclusive()`


@contextmanager
def shared() -> Iterator[None]:
    """Torch work that relies on the process's defaults (no load may run meanwhile)."""
    global _sharing
    with _state:
        _state.wait_for(lambda: not _loading and not _waiting)
        _sharing += 1
    try:
        yield
    finally:
        with _state:
            _sharing -= 1
            _state.notify_all()


@contextmanager
def exclusive() -> Iterator[None]:
    """Work that changes the process's defaults (a model load): alone."""
    global _loading, _waiting
    with _state:
        _waiting += 1
        _state.wait_for(lambda: not _loading and not _sharing)
        _waiting -= 1
        _loading = True
    try:
        yield
    finally:
        with _state:
            _loading = False
            _state.notify_all()
