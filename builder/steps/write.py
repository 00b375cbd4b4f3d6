"""The `write` step: verify-report.json, recipe.lock.yaml, the README.md model card and manifest.json (last).

manifest.json describes the artifact: build hash, resolved recipe, pinned source, versions, device, timings,
footprints, bits per parameter, the verification report, and the sha256 and size of every other file.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from builder.plan import build_kind

if TYPE_CHECKING:
    from builder.recipe import LoadedRecipe
    from builder.pipeline import BuildContext
    from builder.plan import Plan

MANIFEST_VERSION = 1
# Record keys the manifest places itself; any other key a step records is copied into the manifest as is.
_PLACED = ("task", "footprint", "bits_per_param", "verification")
_EXTRA_VERSIONS = ("huggingface_hub", "safetensors")


def write(ctx: BuildContext) -> None:
    """Write the artifact's descriptive files into `ctx.workdir`, manifest.json last."""
    from builder.card import render_card

    manifest = manifest_for(ctx)
    _write_json(ctx.workdir / "verify-report.json", manifest["verification"])
    (ctx.workdir / "recipe.lock.yaml").write_text(lock_text(ctx.loaded, ctx.plan), encoding="utf-8")
    (ctx.workdir / "README.md").write_text(render_card(manifest), encoding="utf-8")
    manifest["files"] = file_table(ctx.workdir)
    _write_json(ctx.workdir / "manifest.json", manifest)


def manifest_for(ctx: BuildContext) -> dict:
    """The manifest without its `files` table (the card is rendered from this)."""
    recipe = ctx.loaded.recipe
    record = ctx.record
    kind = build_kind(recipe)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "name": recipe.name,
        "build_hash": ctx.plan.build_hash,
        "kind": kind,
        "recipe": recipe.model_dump(mode="json"),
        "recipe_files": [_display(path) for path in ctx.loaded.files],
        "source": {"model": recipe.source.model, "revision": ctx.plan.source.revision, "task": record.get("task")},
        "versions": {**ctx.plan.versions, **_extra_versions()},
        "device": device_name(ctx.device),
        "device_uuid": device_uuid(ctx.device),
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "timings": dict(ctx.timings),
        "footprint": record.get("footprint"),
        "bits_per_param": record.get("bits_per_param"),
        "library_name": "onnx" if kind == "export" else "transformers",
        "verification": record.get("verification"),
    }
    manifest.update({key: value for key, value in record.items() if key not in _PLACED})
    return manifest


def lock_text(loaded: LoadedRecipe, plan: Plan) -> str:
    """recipe.lock.yaml: the resolved recipe (after extends and variants), a Hub source pinned to its commit."""
    import yaml

    recipe = loaded.recipe.model_dump(mode="json")
    revision = plan.source.revision
    if loaded.source_path is not None:
        recipe["source"]["model"] = str(loaded.source_path)  # absolute: the lock lives in another folder
    else:
        recipe["source"]["revision"] = revision
    header = (f"# Resolved recipe of {loaded.recipe.name} (build {plan.build_hash[:16]}), from "
              f"{_display(loaded.path)}{' variant ' + loaded.variant if loaded.variant else ''}.\n"
              f"# source {loaded.recipe.source.model} @ {revision}\n")
    return header + yaml.safe_dump(recipe, sort_keys=False)


def refresh_publish(final: Path, loaded: LoadedRecipe, plan: Plan, manifest: dict) -> dict:
    """Give the up-to-date artifact at `final` its recipe's current `publish` block, which is not part of the build
    hash (changing where or how an artifact is published rebuilds nothing): recipe.lock.yaml and the README.md card
    are rewritten in place, then the manifest, each by an atomic rename. Returns the new manifest."""
    from builder.card import render_card

    manifest = {**manifest, "recipe": loaded.recipe.model_dump(mode="json")}
    files = dict(manifest["files"])
    for name, text in (("recipe.lock.yaml", lock_text(loaded, plan)), ("README.md", render_card(manifest))):
        data = text.encode()
        _replace(final / name, data)
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest["files"] = files
    _replace(final / "manifest.json", _json_bytes(manifest))
    return manifest


def _replace(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.new")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def file_table(folder: Path) -> dict[str, dict]:
    """sha256 and size of every file under `folder` except manifest.json, by relative POSIX path."""
    from tqdm.auto import tqdm

    from builder.console import show_progress

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != "manifest.json")
    table = {}
    with tqdm(total=sum(p.stat().st_size for p in files), unit="B", unit_scale=True, desc="Hashing files",
              leave=False, disable=not show_progress()) as bar:
        for path in files:
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                while chunk := handle.read(1 << 22):
                    digest.update(chunk)
                    bar.update(len(chunk))
            table[path.relative_to(folder).as_posix()] = {"sha256": digest.hexdigest(), "size": path.stat().st_size}
    return table


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


def _write_json(path: Path, payload: object) -> None:
    path.write_bytes(_json_bytes(payload))


def _json_bytes(payload: object) -> bytes:
    return (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode()
