"""The state of each recipe's artifact: missing, stale, built, verified, and where it was published."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from builder.artifact import MANIFEST_FILE, not_current, read_manifest
from builder.errors import BuilderError, RecipeError
from builder.plan import build_hash, build_kind, make_plan, recorded_versions
from builder.recipe import files_defining, find_recipe_files, load_recipes

PUBLISHED_DIR = ".published"
"""`artifacts/.published/<name>.json`: the last publish of an artifact (repo, revision, commit, build hash)."""
STAMPS_DIR = ".stamps"
"""`artifacts/.stamps/<name>.hash`: make's view of an artifact (see `write_stamp`)."""


@dataclass(frozen=True)
class ArtifactState:
    recipe_file: str
    name: str
    state: str
    """missing | stale (another build hash) | built (this build hash, but verification did not pass or a file is
    missing or changed; `detail` says which) | verified (up to date: `builder build` skips it) | invalid (recipe or
    source error)"""
    build_hash: str | None
    artifact_build_hash: str | None
    published: dict | None
    detail: str = ""

    def as_json(self) -> dict:
        return asdict(self)


def published_record(artifacts: Path, name: str) -> dict | None:
    try:
        return json.loads((artifacts / PUBLISHED_DIR / f"{name}.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def artifact_states(
    paths: Sequence[str | Path], artifacts: Path, names: list[str] | None = None
) -> list[ArtifactState]:
    """One state per recipe (variants expanded) under `paths`, comparing build hashes with artifacts/<name>/; only
    the artifacts in `names` when given (a name no recipe defines is an error)."""
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
            manifest = read_manifest(artifacts / name)
            found = manifest.build_hash if manifest else None
            published = published_record(artifacts, name)
            try:
                plan = make_plan(loaded)
            except BuilderError as error:
                states.append(ArtifactState(str(file), name, "invalid", None, found, published, str(error)))
                continue
            expected, detail = plan.build_hash, ""
            if manifest is not None and found != expected:
                # Packages the build had and this environment lacks (a core install has no torch) change the hash
                # made here; with the versions the build recorded, an unchanged recipe and source hash the same.
                recorded = recorded_versions(build_kind(loaded.recipe), manifest.versions)
                if missing := sorted(set(recorded) - set(plan.versions)):
                    expected = build_hash(loaded.recipe, plan.source.revision, recorded)
                    detail = f"compared with the versions the build recorded ({', '.join(missing)} not installed here)"
            if manifest is None:
                state = "missing"
            elif found != expected:
                state = "stale"
            elif problem := not_current(artifacts / name, manifest, expected):
                state, detail = "built", problem
            else:
                state = "verified"
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
    if state.state == "verified":
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
