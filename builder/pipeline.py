"""A build: plan, lock, run the steps in a temporary folder beside the destination, rename it into place.

The steps, in order: resolve -> quantize | export (by the recipe's kind) -> verify -> write. Everything is written
into `<out>/.tmp-<name>-<random>/`; only a build whose verification passed is renamed to `<out>/<name>/`, so a
failed or interrupted build leaves nothing at the final path. An artifact whose manifest has the same build hash
and a passing verification is left alone ("up to date") unless `force`. `<out>/.<name>.lock` (flock) serializes
concurrent builds of one recipe; it exists only while a build holds or waits for it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from builder import interrupts
from builder.artifact import FAILED_DIR, HashAhead, Manifest, load_manifest, replace_folder, up_to_date
from builder.console import begin_stage, end_stages, library_noise_filtered, say
from builder.context import BuildContext
from builder.errors import BuildError, VerificationFailed
from builder.plan import Plan, build_stages, make_plan
from builder.recipe import load_recipes
from builder.steps import bnb, load, write

_DEVICE = re.compile(r"^(cpu|cuda|cuda:\d+)$")


@dataclass(frozen=True)
class BuildResult:
    """One artifact's outcome: `status` is "built" or "up to date"."""

    name: str
    path: Path
    status: str
    manifest: Manifest

    def as_json(self) -> dict:
        manifest = self.manifest.to_json()
        return {
            "name": self.name,
            "path": str(self.path),
            "status": self.status,
            "build_hash": manifest["build_hash"],
            "timings": manifest["timings"],
            "footprint": manifest["footprint"],
            "bits_per_param": manifest["bits_per_param"],
            "verification_passed": self.manifest.passed,
        }


Step = Callable[[BuildContext], None]


def build_file(recipe_file: str | Path, *, names: list[str] | None = None, **options) -> list[BuildResult]:
    """Build every artifact a recipe file defines (one, or one per variant), in order; only those in `names` when
    given. `options` are `build`'s.

    All of them are planned first, so a bad recipe or source fails before anything is written."""
    plans = [make_plan(loaded) for loaded in load_recipes(recipe_file) if not names or loaded.recipe.name in names]
    return [build(plan, **options) for plan in plans]


@library_noise_filtered()  # here too, not only in the CLI: for `--jobs` workers and programs
def build(
    plan: Plan,
    *,
    out: str | Path = "artifacts",
    device: str | None = None,
    force: bool = False,
    keep_temp: bool = False,
    keep_failed: bool = False,
    use_cache: bool = True,
    max_gpu_memory: int | None = None,
) -> BuildResult:
    """Build one planned artifact into `<out>/<name>/`. Raises `BuilderError` (nothing at the final path),
    `VerificationFailed` when the gate fails, and lets KeyboardInterrupt through after cleaning up.

    `use_cache: False` recomputes the gate's reference outputs; `max_gpu_memory` (bytes) caps this process's GPU
    memory and the gate's, which then runs a model larger than the cap one decoder block at a time."""
    recipe = plan.loaded.recipe
    if device is not None and not _DEVICE.match(device):  # before the up-to-date answer: a typo is never "ok"
        raise BuildError(f"--device {device!r} is not cpu, cuda or cuda:N")
    out = Path(out)
    final = out / recipe.name
    # Checked before anything heavy is imported, so `make all` over built recipes takes seconds; checked again
    # under the lock in case a concurrent build just finished it.
    publish = recipe.publish.model_dump(mode="json") if recipe.publish else None
    if not force and (manifest := _current(final, plan)) is not None:
        if manifest.recipe.get("publish") == publish:
            return _reused(final, manifest)
        with _locked(out, recipe.name):
            if (manifest := _current(final, plan)) is not None:
                return _reused(
                    final,
                    write.refresh_publish(final, plan.loaded, plan, manifest),
                    "; its card and manifest now carry the recipe's `publish`",
                )
    steps = steps_for(plan)
    chosen, device_map = choose_device(plan, device)
    if max_gpu_memory and chosen.startswith("cuda"):
        _cap_gpu(chosen, max_gpu_memory)
    _check_destination(final)
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out, recipe.name):
        if not force and (manifest := _current(final, plan)) is not None:
            return _reused(final, manifest)
        _remove_leftovers(out, recipe.name)
        workdir = Path(tempfile.mkdtemp(prefix=f".tmp-{recipe.name}-", dir=out))
        ctx = BuildContext(
            plan.loaded,
            plan,
            workdir,
            chosen,
            device_map=device_map if plan.kind.RUNNER == "transformers" else None,
            use_cache=use_cache,
            max_gpu_memory=max_gpu_memory,
        )
        try:
            for number, (name, step) in enumerate(steps, 1):
                interrupts.check()
                begin_stage(name, f"{recipe.name}: [{number}/{len(steps)}] {name}")
                start = time.perf_counter()
                step(ctx)
                ctx.timings[name] = round(time.perf_counter() - start, 3)
            interrupts.check()  # a request whose exception was swallowed on the way stops the build here
            _install(workdir, final)
        except VerificationFailed:
            _discard(workdir, out / FAILED_DIR / recipe.name if keep_failed else None, keep_temp)
            raise
        except BaseException:
            _discard(workdir, None, keep_temp)
            raise
        finally:
            for work in (ctx.reference, ctx.candidate, ctx.hash_ahead):
                if work is not None:
                    work.cancel()  # however the build ended, no gate worker or hashing thread stays behind
            end_stages()
    return BuildResult(recipe.name, final, "built", load_manifest(final))


def _current(final: Path, plan: Plan) -> Manifest | None:
    """`up_to_date`, without waiting for a new source's digest (`ResolvedSource.pin`) when there is no artifact."""
    return up_to_date(final, plan.build_hash) if (final / "manifest.json").is_file() else None


def _reused(final: Path, manifest: Manifest, note: str = "") -> BuildResult:
    if note:  # the outcome itself is the caller's line to print (the CLI's on stdout)
        say(f"{final.name}: up to date{note}")
    return BuildResult(final.name, final, "up to date", manifest)


def steps_for(plan: Plan) -> tuple[tuple[str, Step], ...]:
    """The build's steps in order, by the recipe's kind: `plan.build_stages`, each with its function (the kind's
    own `build` for its stage)."""
    steps = _STEPS | {plan.kind.STAGE: plan.kind.build}
    return tuple((stage, steps[stage]) for stage in build_stages(plan.loaded.recipe))


def _verify(ctx: BuildContext) -> None:
    from builder.steps.verify import (
        verify,  # deferred: torch and transformers, only when a build runs
    )

    ctx.hash_ahead = HashAhead(ctx.workdir)  # the files are final: hash them while the gate runs
    verify(ctx)


_STEPS: dict[str, Step] = {
    "resolve": load.resolve,
    "verify": _verify,
    "write": write.write,
}


def choose_device(plan: Plan, requested: str | None) -> tuple[str, str | dict[str, str | int]]:
    """The build's device ("cpu", "cuda", "cuda:N") and device map: `--device`, else the recipe's
    `load.device_map`, else CUDA when present and CPU otherwise. Refuses what this host cannot run."""
    import torch

    recipe = plan.loaded.recipe
    device_map = recipe.load.device_map
    if requested is not None:
        if isinstance(device_map, dict):
            raise BuildError(
                f"recipe {recipe.name} places modules with `load.device_map`; drop --device, or remove "
                "the map from the recipe"
            )
        device = requested
    elif isinstance(device_map, dict):
        gpus = [str(d) for d in device_map.values() if d not in ("cpu", "disk")]
        device = "cpu" if not gpus else (f"cuda:{gpus[0]}" if gpus[0].isdigit() else gpus[0])
    elif device_map in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = device_map
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BuildError(
                f"{recipe.name} asks for {device} but this host has no CUDA device; build with "
                "--device cpu (bitsandbytes quantizes on CPU too) or on a GPU host"
            )
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise BuildError(f"{device} does not exist: this host has {torch.cuda.device_count()} CUDA device(s)")
    chosen_map = bnb.device_map_for(recipe, device, pinned=requested is not None)
    bnb.preflight(plan, chosen_map)
    return device, chosen_map


def _cap_gpu(device: str, max_bytes: int) -> None:
    """Hold this process (the quantizer) to `max_bytes` of the GPU; the gate's processes get the same cap."""
    import torch

    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, max_bytes / total), torch.device(device))


def _check_destination(final: Path) -> None:
    if final.exists() and not (final / "manifest.json").is_file():
        raise BuildError(
            f"{final} exists and is not a builder artifact (no manifest.json); move it away or build with another --out"
        )


@contextmanager
def _locked(out: Path, name: str) -> Iterator[None]:
    """Hold `<out>/.<name>.lock` (fcntl.flock) for the block; wait, saying so, while another build holds it.

    The holder deletes the file before it lets go, so no empty lock file stays behind. A build that opened it
    meanwhile then holds a lock on a deleted file: on acquiring, it checks that the path still names the file it
    locked, and starts over on the path's new file when not; so two builds never hold two different files."""
    import fcntl

    path = out / f".{name}.lock"
    waiting = False
    while True:
        handle = open(path, "a")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not waiting:
                    say(f"{name}: waiting for another build of it to finish (lock {path})")
                    waiting = True
                fcntl.flock(handle, fcntl.LOCK_EX)
            if _names(path, handle):
                break
        except BaseException:
            handle.close()
            raise
        handle.close()  # its holder deleted it after we opened it
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while held, so a waiter finds out (above)
        handle.close()  # lets go of the lock


def _names(path: Path, handle) -> bool:
    """Whether `path` is the file open as `handle` (and not deleted, or replaced by a new one)."""
    try:
        found = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(handle.fileno())
    return (found.st_dev, found.st_ino) == (held.st_dev, held.st_ino)


def remove_leftovers(out: Path, name: str) -> None:
    """Delete what killed builds of `name` left in `out`, under its lock (a Ray submitter's cleanup after a task
    whose worker died on its last attempt: no retry of it will)."""
    with _locked(out, name):
        _remove_leftovers(out, name)


def _remove_leftovers(out: Path, name: str) -> None:
    """Delete the `.tmp-<name>-*` and `.old-<name>-*` folders of earlier builds of `name` that were killed before
    they could clean up (or kept with --keep-temp). The caller holds the lock, so no build of `name` uses them; the
    exact 8-character random suffix of `mkdtemp` keeps other recipes' folders out."""
    pattern = re.compile(rf"\.(tmp|old)-{re.escape(name)}-[a-z0-9_]{{8}}")
    for path in out.iterdir():
        if path.is_dir() and pattern.fullmatch(path.name):
            say(f"{name}: removing {path}, left by an earlier build")
            shutil.rmtree(path, ignore_errors=True)


def _install(workdir: Path, final: Path) -> None:
    """Make `workdir` the artifact at `final` (`builder.artifact.replace_folder`: old or new at every instant)."""
    umask = os.umask(0)
    os.umask(umask)
    workdir.chmod(0o777 & ~umask)  # mkdtemp made it private
    replace_folder(workdir, final)


def _discard(workdir: Path, failed: Path | None, keep_temp: bool) -> None:
    """After a failure: move the build to `failed` (--keep-failed), keep it (--keep-temp) or delete it."""
    if failed is not None:
        shutil.rmtree(failed, ignore_errors=True)
        failed.parent.mkdir(parents=True, exist_ok=True)
        os.rename(workdir, failed)
        say(f"kept the failed build in {failed}")
    elif keep_temp:
        say(f"kept the temporary build folder {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
