"""The gate's reference outputs, computed once per key and kept in a content-addressed cache.

A reference run (the source model probed on the evaluation inputs) depends only on: the source's exact content
(Hub commit or local digest), the dtype it runs in, the kind of device, the token ids, the probing code, the task,
`max_new_tokens` and the torch/transformers versions. `reference_key` hashes exactly these; variants of one source
and rebuilds share the entry, and anything that could change the outputs changes the key.

Entries live in `$BUILDER_CACHE_DIR/references/` (default `$XDG_CACHE_HOME/builder/references`, else
`~/.cache/builder/references`), one file per key: a magic line, the sha256 of the payload, the payload
(`torch.save` of the probe's outputs). Writers write a temporary file beside it and `os.replace` it, so a reader sees
a whole entry or none, whatever concurrent builds do; an entry whose digest does not match (a torn or damaged file)
is deleted and recomputed.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import tempfile
from pathlib import Path

from builder.steps import metrics
from builder.tasks import family

CACHE_ENV = "BUILDER_CACHE_DIR"
_MAGIC = b"builder-reference 1\n"
_DIGEST_BYTES = 64  # hex sha256


def cache_dir() -> Path:
    """Where reference entries go: $BUILDER_CACHE_DIR/references, else the XDG cache folder's builder/references."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "builder"
    )
    return Path(root) / "references"


def reference_key(*, revision: str, dtype: str, device_kind: str, inputs: dict, task: str, max_new_tokens: int) -> str:
    """sha256 of everything a reference run's outputs depend on."""
    from importlib import metadata

    fields = {
        "source": revision,
        "dtype": dtype,
        "device": device_kind,
        "inputs": inputs_sha256(inputs),
        "code": _probing_code_sha256(task),
        "task": task,
        "max_new_tokens": max_new_tokens,
        "versions": {name: metadata.version(name) for name in ("torch", "transformers")},
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _probing_code_sha256(task: str) -> str:
    """sha256 of the code a reference run's outputs come from: the run (`builder.steps.metrics`) and the task
    family's probe (its module, `builder.tasks`)."""
    digest = hashlib.sha256(Path(metrics.__file__).read_bytes())
    digest.update(Path(inspect.getfile(family(task).probe)).read_bytes())
    return digest.hexdigest()


def inputs_sha256(inputs) -> str:
    """sha256 over the token ids (nested dicts and lists of tensors), shapes and dtypes included."""
    digest = hashlib.sha256()

    def feed(value) -> None:
        if isinstance(value, dict):
            for key in sorted(value):
                digest.update(f"<{key}>".encode())
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"[{len(value)}]".encode())
            for item in value:
                feed(item)
        else:
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(value.contiguous().numpy().tobytes())

    feed(inputs)
    return digest.hexdigest()


def device_kind(device: str) -> str:
    """ "cpu", or the GPU's model name: outputs differ between kinds of device, not between two GPUs of a kind."""
    if not device.startswith("cuda"):
        return "cpu"
    import torch

    return f"cuda:{torch.cuda.get_device_name(torch.device(device))}"


def entry_path(key: str) -> Path:
    """The cache file of `key` (it may not exist)."""
    return cache_dir() / f"{key}.ref"


def load(key: str) -> dict | None:
    """The cached outputs for `key`, or None when there are none or the entry is damaged (then it is deleted)."""
    import torch

    path = entry_path(key)
    try:
        data = path.read_bytes()
    except OSError:
        return None
    head = len(_MAGIC) + _DIGEST_BYTES + 1
    payload = memoryview(data)[head:]
    if (
        data[: len(_MAGIC)] != _MAGIC
        or data[len(_MAGIC) : head - 1].decode("ascii", "replace") != hashlib.sha256(payload).hexdigest()
    ):
        _discard(path)
        return None
    try:
        return torch.load(io.BytesIO(payload), weights_only=True)
    except Exception:  # a payload that hashes right but does not load: written by an incompatible torch
        _discard(path)
        return None


def store(key: str, outputs: dict) -> None:
    """Write the entry for `key` atomically; a cache that cannot be written only costs speed next time."""
    import torch

    buffer = io.BytesIO()
    torch.save(outputs, buffer)
    payload = buffer.getbuffer()
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{key[:16]}-", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n")
                out.write(payload)
            os.replace(temporary, entry_path(key))
        except BaseException:
            _discard(Path(temporary))
            raise
        _sweep(folder)
    except OSError:
        pass


def _sweep(folder: Path, age_s: float = 86400) -> None:
    """Delete temporary files a killed writer left (a day old: no live writer takes that long)."""
    import time

    for path in folder.glob(".*.tmp"):
        try:
            if time.time() - path.stat().st_mtime > age_s:
                path.unlink()
        except OSError:
            pass


def _discard(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
