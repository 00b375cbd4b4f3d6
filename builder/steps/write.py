"""The `write` step: verify-report.json, recipe.lock.yaml, the README.md model card, the gate's results as
`.eval_results/*.yaml` and manifest.json (last).

manifest.json describes the artifact: build hash, resolved recipe, pinned source, versions, device, timings,
footprints, bits per parameter, the verification report, and the sha256 and size of every other file.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from builder import interrupts
from builder.artifact import (
    MANIFEST_VERSION,
    FileEntry,
    Manifest,
    SourceRecord,
    file_table,
    folder_files,
    replace_folder,
    write_manifest,
)
from builder.card import eval_results_files, render_card
from builder.context import BuildContext
from builder.plan import Plan
from builder.recipe import LoadedRecipe
from builder.steps.gate import write_report

_EXTRA_VERSIONS = ("huggingface_hub", "safetensors")


def write(ctx: BuildContext) -> None:
    """Write the artifact's descriptive files into `ctx.workdir`, manifest.json last."""
    manifest = manifest_for(ctx)
    assert manifest.verification is not None  # an artifact is written once its gate passed
    write_report(ctx.workdir, manifest.verification)
    (ctx.workdir / "recipe.lock.yaml").write_text(lock_text(ctx.loaded, ctx.plan), encoding="utf-8")
    (ctx.workdir / "README.md").write_text(render_card(manifest, folder=ctx.workdir), encoding="utf-8")
    for path, text in eval_results_files(manifest).items():
        (ctx.workdir / path).parent.mkdir(exist_ok=True)
        (ctx.workdir / path).write_text(text, encoding="utf-8")
    _readable_by_all(ctx.workdir)
    manifest.files = file_table(ctx.workdir, ctx.hash_ahead)
    write_manifest(ctx.workdir, manifest)


def manifest_for(ctx: BuildContext) -> Manifest:
    """The manifest without its `files` table (the card is rendered from this)."""
    recipe = ctx.loaded.recipe
    kind = ctx.plan.kind
    produced: dict[str, Any] = {"device_map": ctx.device_map} if kind.RUNNER == "transformers" else {}
    for field in ("quantize_path", "quantized_layers", "dequantized", "onnx"):
        if getattr(ctx, field) is not None:
            produced[field] = getattr(ctx, field)
    if ctx.plan.weight_share is not None:
        produced["weight_share"] = ctx.plan.weight_share
    if ctx.plan.warnings:
        produced["warnings"] = list(ctx.plan.warnings)
    return Manifest(
        manifest_version=MANIFEST_VERSION,
        name=recipe.name,
        build_hash=ctx.plan.build_hash,
        kind=kind.STAGE,
        recipe=recipe.model_dump(mode="json"),
        recipe_files=[_display(path) for path in ctx.loaded.files],
        source=SourceRecord(model=recipe.source.model, revision=ctx.plan.source.revision, task=ctx.plan.task),
        versions={**ctx.plan.versions, **_extra_versions()},
        device=device_name(ctx.device),
        device_uuid=device_uuid(ctx.device),
        built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        timings=dict(ctx.timings),
        footprint=ctx.footprint,
        bits_per_param=_bits_per_param(ctx) if ctx.quantized_layers else None,
        library_name=kind.LIBRARY,
        verification=ctx.verification,
        **produced,
    )


def _bits_per_param(ctx: BuildContext) -> float | None:
    """The bits per parameter the artifact reached: its weight files over all the source's parameters (what stays
    unquantized counts, unlike `quantized_layers.bits_per_param`)."""
    weight_bytes = sum(path.stat().st_size for path in ctx.workdir.glob("*.safetensors"))
    parameters = ctx.plan.parameter_count
    return round(8 * weight_bytes / parameters, 4) if parameters else None


def _readable_by_all(folder: Path) -> None:
    """Give every file the mode a plain `open` would (0644 under umask 022): safetensors' save_file, which the
    transformers path's save_pretrained calls, creates its files 0600, unreadable to the group serving them."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def lock_text(loaded: LoadedRecipe, plan: Plan) -> str:
    """recipe.lock.yaml: the resolved recipe (after extends and variants), a Hub source pinned to its commit."""
    import yaml

    recipe = loaded.recipe.model_dump(mode="json")
    revision = plan.source.revision
    if loaded.source_path is not None:
        recipe["source"]["model"] = str(loaded.source_path)  # absolute: the lock lives in another folder
    else:
        recipe["source"]["revision"] = revision
    header = (
        f"# Resolved recipe of {loaded.recipe.name} (build {plan.build_hash[:16]}), from "
        f"{_display(loaded.path)}{' variant ' + loaded.variant if loaded.variant else ''}.\n"
        f"# source {loaded.recipe.source.model} @ {revision}\n"
    )
    return header + yaml.safe_dump(recipe, sort_keys=False)


def refresh_publish(final: Path, loaded: LoadedRecipe, plan: Plan, manifest: Manifest) -> Manifest:
    """Give the up-to-date artifact at `final` its recipe's current `publish` block, which is not part of the build
    hash (changing where or how an artifact is published rebuilds nothing). A copy of the folder (hard links to the
    unchanged files) gets the new recipe.lock.yaml, README.md card and manifest, then replaces `final` the way a
    build does, so a crash leaves the old artifact or the new one, never a mix. Returns the new manifest."""
    manifest = manifest.model_copy(update={"recipe": loaded.recipe.model_dump(mode="json")})
    rewritten = {
        "recipe.lock.yaml": lock_text(loaded, plan).encode(),
        "README.md": render_card(manifest, folder=final).encode(),
    }
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        for relative in folder_files(final):  # regular files only: a symlink's target never becomes a file here
            if relative in rewritten:
                continue
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(final / relative, staging / relative)
        files = dict(manifest.files or {})
        for name, data in rewritten.items():
            (staging / name).write_bytes(data)
            files[name] = FileEntry(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
        manifest = manifest.model_copy(update={"files": files})
        write_manifest(staging, manifest)
        interrupts.check()
        staging.chmod(final.stat().st_mode & 0o777)
        replace_folder(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no bytes copied; the file is never written in place), or a copy where links are refused."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def device_uuid(device: str) -> str | None:
    """The CUDA device's UUID (which physical GPU built the artifact, whatever CUDA_VISIBLE_DEVICES renumbered);
    None on CPU."""
    if not device.startswith("cuda"):
        return None
    import torch

    uuid = getattr(torch.cuda.get_device_properties(torch.device(device)), "uuid", None)
    return None if uuid is None else f"GPU-{uuid}"


def device_name(device: str) -> str:
    """The GPU's name for a CUDA device, else the CPU model (from /proc/cpuinfo where there is one)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _extra_versions() -> dict[str, str]:
    versions = {}
    for name in _EXTRA_VERSIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _display(path: Path) -> str:
    try:
        return path.resolve().relative_to(Path.cwd()).as_posix()
    except ValueError:
        return str(path)
