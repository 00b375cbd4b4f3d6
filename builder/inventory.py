"""The state of each recipe's artifact: missing, stale, built, verified (or up-to-date when only sizes were
compared), and where it was published."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from builder.artifact import MANIFEST_FILE, Manifest, load_manifest, not_current, read_published
from builder.errors import ArtifactError, BuilderError, RecipeError
from builder.kinds import kind_of
from builder.plan import build_hash, make_plan, recorded_versions
from builder.recipe import files_defining, find_recipe_files, load_recipes

STAMPS_DIR = ".stamps"
"""`artifacts/.stamps/<name>.hash`: make's view of an artifact (see `write_stamp`)."""
CURRENT = ("verified", "up-to-date")
"""The states `builder build` skips: the second one is the first with only file sizes compared."""


@dataclass(frozen=True)
class ArtifactState:
    recipe_file: str
    name: str
    state: str
    """missing | stale (another build hash) | built (this build hash, but verification did not pass or a file is
    missing or changed; `detail` says which) | verified (up to date, every file's sha256 checked against the
    manifest) | up-to-date (the same with only file sizes compared: `hashes=False`) | invalid (a recipe or source
    error, or a manifest or publish record that cannot be read or lists something other than a regular file inside
    the artifact folder; `detail` says which)"""
    build_hash: str | None
    artifact_build_hash: str | None
    published: dict | None
    detail: str = ""

    def as_json(self) -> dict:
        return asdict(self)


def _manifest(folder: Path) -> Manifest | None:
    """The manifest of `folder`, None when it has none; `ArtifactError` when it has one this builder cannot read."""
    return load_manifest(folder) if os.path.lexists(folder / MANIFEST_FILE) else None


def artifact_states(
    paths: Sequence[str | Path], artifacts: Path, names: list[str] | None = None, *, hashes: bool = True
) -> list[ArtifactState]:
    """One state per recipe (variants expanded) under `paths`, comparing build hashes with artifacts/<name>/; only
    the artifacts in `names` when given (a name no recipe defines is an error). With `hashes` (the default) an
    artifact of this build hash is `verified` only after every file's sha256 matched its manifest (the file-hash
    cache makes a second look cheap); without, sizes are compared and it is `up-to-date`."""
    files = find_recipe_files(paths)
    if names:
        files = files_defining(names, files)
    states = []
    for file in files:
        try:
            loaded_recipes = load_recipes(file)
        except RecipeError as error:
            states.append(ArtifactState(str(file), "?", "invalid", None, None, None, str(error.problems[0])))
            continue
        for loaded in loaded_recipes:
            name = loaded.recipe.name
            if names and name not in names:
                continue
            try:
                manifest = _manifest(artifacts / name)
                record = read_published(artifacts, name)
            except ArtifactError as error:
                states.append(ArtifactState(str(file), name, "invalid", None, None, None, str(error)))
                continue
            found = manifest.build_hash if manifest else None
            published = record.model_dump(mode="json") if record else None
            try:
                plan = make_plan(loaded)
            except BuilderError as error:
                states.append(ArtifactState(str(file), name, "invalid", None, found, published, str(error)))
                continue
            expected, detail = plan.build_hash, ""
            if manifest is not None and found != expected:
                # Packages the build had and this environment lacks (a core install has no torch) change the hash
                # made here; with the versions the build recorded, an unchanged recipe and source hash the same.
                recorded = recorded_versions(kind_of(loaded.recipe), manifest.versions)
                if missing := sorted(set(recorded) - set(plan.versions)):
                    expected = build_hash(loaded.recipe, plan.source.revision, recorded)
                    detail = f"compared with the versions the build recorded ({', '.join(missing)} not installed here)"
            if manifest is None:
                state = "missing"
            elif found != expected:
                state = "stale"
            else:
                try:
                    problem = not_current(artifacts / name, manifest, expected, hashes=hashes)
                except ArtifactError as error:
                    states.append(ArtifactState(str(file), name, "invalid", expected, found, published, str(error)))
                    continue
                if problem:
                    state, detail = "built", problem
                else:
                    state = CURRENT[0] if hashes else CURRENT[1]
            if published and published.get("build_hash") != found:
                published = {**published, "outdated": True}
            states.append(ArtifactState(str(file), name, state, expected, found, published, detail))
    return states


def write_stamp(state: ArtifactState, artifacts: Path) -> Path:
    """Write `<artifacts>/.stamps/<name>.hash` (the recipe's build hash) for make's
    `<artifacts>/<name>/manifest.json: <artifacts>/.stamps/<name>.hash` rule. The stamp is dated like the manifest
    when the artifact is up to date and now otherwise, so make rebuilds exactly when `builder build` would: after a
    change to the recipe, its parents, the source or the versions, and after a failed verification or a changed
    file."""
    if state.state == "invalid":
        raise BuilderError(f"{state.recipe_file}: {state.detail}")
    path = artifacts / STAMPS_DIR / f"{state.name}.hash"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{state.build_hash}\n")
    if state.state in CURRENT:
        manifest = artifacts / state.name / MANIFEST_FILE
        os.utime(path, ns=(manifest.stat().st_atime_ns, manifest.stat().st_mtime_ns))
    return path


def format_table(states: list[ArtifactState]) -> str:
    rows = [("RECIPE", "ARTIFACT", "STATE", "PUBLISHED")]
    for s in states:
        if s.published:
            where = f"{s.published.get('repo')}@{str(s.published.get('commit', ''))[:12]}"
            where += " (older build)" if s.published.get("outdated") else ""
        else:
            where = "-"
        state = s.state if not s.detail else f"{s.state}: {s.detail}"
        rows.append((s.recipe_file, s.name, state, where))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}" for r in rows)
