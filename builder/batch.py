"""Building many recipe files: in order, or `jobs` at a time in worker processes, one GPU each.

A worker is a fresh (spawned) interpreter whose CUDA_VISIBLE_DEVICES is set before torch is imported, so job k of
N runs on GPU k mod (number of GPUs). One recipe's failure does not stop the others; the caller gets every outcome.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from builder.errors import BuilderError
from builder.pipeline import build_file


@dataclass(frozen=True)
class FileOutcome:
    """What building one recipe file (or, on a cluster, one artifact `name` of it) gave: its results (as JSON
    rows), or the one-line error that stopped it."""

    recipe_file: str
    results: list[dict]
    error: str | None = None
    name: str | None = None


def build_files(files: list[Path], *, jobs: int = 1, **options) -> list[FileOutcome]:
    """Build each recipe file (`options` go to `builder.pipeline.build_file`); `jobs` > 1 builds in parallel."""
    check_out(Path(options.get("out") or "artifacts"))
    if jobs <= 1 or len(files) <= 1:
        return [_build_one(str(file), options) for file in files]
    gpus = _gpu_count()
    context = multiprocessing.get_context("spawn")
    slots = context.Queue()
    for k in range(jobs):
        slots.put(str(k % gpus) if gpus else "")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_claim_gpu, initargs=(slots,)) as pool:
        return list(pool.map(_build_one, [str(f) for f in files], [options] * len(files)))


def check_out(out: Path) -> None:
    """Refuse an artifacts folder that is a file, or inside one, before any build starts (each would fail alike)."""
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                what = "is a file" if path == out else f"is inside {path}, which is a file"
                raise BuilderError(
                    f"the artifacts folder {out} {what}; name a folder with --out (created when missing)"
                )
            return


def _gpu_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count()


def _claim_gpu(slots) -> None:
    gpu = slots.get()
    if gpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu


def _build_one(recipe_file: str, options: dict) -> FileOutcome:

    try:
        return FileOutcome(recipe_file, [r.as_json() for r in build_file(recipe_file, **options)])
    except BuilderError as error:
        return FileOutcome(recipe_file, [], str(error))
