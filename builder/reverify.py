"""`builder verify ARTIFACT`: re-run an existing artifact's gate against the source its manifest records.

The checks are the build's (its kind's `reverify`: `builder.kinds`); what is this module's is finding that source
again and refusing one whose content changed since the build.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from builder.artifact import (
    LOCK_FILE,
    MANIFEST_FILE,
    Manifest,
    artifact_file,
    file_table,
    folder_files,
    load_manifest,
    write_manifest,
)
from builder.errors import ArtifactError, BuildError, SourceError
from builder.kinds import kind_of
from builder.recipe import Recipe
from builder.source import folder_digest
from builder.steps.gate import write_report
from builder.steps.load import download
from builder.verification import VerificationReport


def reverify(
    artifact_dir: Path,
    *,
    write: bool = False,
    device: str | None = None,
    use_cache: bool = True,
    max_gpu_memory: int | None = None,
) -> VerificationReport:
    """Re-run the checks of the artifact in `artifact_dir` against the source its manifest records; returns the
    report. Refuses (`SourceError`) when that source is gone or its content changed, and (`ArtifactError`) a
    manifest or lock file it cannot read. With `write`, rewrites verify-report.json and the manifest's
    `verification` and file hashes (refusing a folder whose files are not all regular files inside it before the
    gate runs); otherwise changes nothing. `use_cache: False` recomputes the reference outputs; `max_gpu_memory`
    caps the gate's GPU memory."""
    artifact_dir = Path(artifact_dir)
    manifest = load_manifest(artifact_dir)
    recipe = _typed(Recipe, manifest.recipe, artifact_dir / MANIFEST_FILE, "recipe.")
    if write:
        folder_files(artifact_dir)  # a symlink would be hashed into the table: refuse it before the gate's minutes
    source_dir = recorded_source(artifact_dir, manifest, recipe)
    import torch  # deferred: the checks need it, importing builder must not

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if manifest.source.task is None:
        raise BuildError(f"{artifact_dir}/manifest.json records no task; rebuild the artifact")
    options = {"use_cache": use_cache, "max_gpu_memory": max_gpu_memory}
    report = VerificationReport.model_validate(
        kind_of(recipe).reverify(manifest, recipe, artifact_dir, source_dir, device, **options)
    )
    if write:
        write_report(artifact_dir, report)
        updated = manifest.model_copy(update={"verification": report, "files": file_table(artifact_dir)})
        write_manifest(artifact_dir, updated)
    return report


def recorded_source(artifact_dir: Path, manifest: Manifest, recipe: Recipe) -> Path:
    """The local folder holding the source at the revision the manifest records. A local source must still have
    the recorded content digest; a Hub source is fetched at the recorded commit."""
    revision = manifest.source.revision
    if not revision.startswith("sha256:"):
        return download(
            recipe.source.model,
            revision,
            allow_pickle=recipe.source.allow_pickle,
            remote_code=recipe.source.trust_remote_code,
        )
    folder = _local_source_folder(artifact_dir, manifest, recipe)
    digest = f"sha256:{folder_digest(folder)}"
    if digest != revision:
        raise SourceError(
            f"the source folder {folder} changed since {artifact_dir} was built (recorded {revision}, "
            f"now {digest}); verifying against other weights would prove nothing. Restore the source, "
            "or rebuild the artifact from the current one (builder build RECIPE --force)"
        )
    return folder


def _local_source_folder(artifact_dir: Path, manifest: Manifest, recipe: Recipe) -> Path:
    """recipe.lock.yaml's absolute `source.model`, else the recipe's path taken from its recorded recipe file."""
    import yaml

    candidates = []
    lock = artifact_file(artifact_dir, LOCK_FILE)
    if lock is not None:
        try:
            locked = yaml.safe_load(lock.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise ArtifactError(
                f"{artifact_dir / LOCK_FILE} is not YAML ({error}); rebuild the artifact (builder build RECIPE --force)"
            ) from None
        candidates.append(Path(_typed(Recipe, locked, artifact_dir / LOCK_FILE).source.model))
    for recipe_file in manifest.recipe_files[:1]:
        candidates.append(Path(recipe_file).parent / Path(recipe.source.model).expanduser())
    for folder in candidates:
        if folder.is_dir():
            return folder.resolve()
    raise SourceError(
        f"the source of {artifact_dir} ({recipe.source.model}) is not at "
        f"{' nor '.join(map(str, candidates)) or 'a recorded path'}; run `builder verify` from the "
        "folder the artifact was built in, or restore the source folder"
    )


_Model = TypeVar("_Model", bound=BaseModel)


def _typed(model: type[_Model], data: Any, where: Path, prefix: str = "") -> _Model:
    """`data` read from `where` as a `model`; `ArtifactError` naming the file and the first wrong field otherwise
    (a recipe this builder no longer accepts, a lock file that is not a mapping)."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        field = prefix + ".".join(str(part) for part in first["loc"]) if first["loc"] else prefix.rstrip(".")
        raise ArtifactError(
            f"{where}: {field or '(top level)'}: {first['msg']}; this builder cannot verify the artifact from it: "
            "rebuild the artifact (builder build RECIPE --force)"
        ) from None
