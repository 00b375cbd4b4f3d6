"""The state of each recipe's artifact: missing, stale, built, verified, and where it was published."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from builder.errors import BuilderError, RecipeError
from builder.loader import find_recipe_files, load_recipes
from builder.plan import make_plan

PUBLISHED_DIR = ".published"
"""`artifacts/.published/<name>.json`: the last publish of an artifact (repo, revision, commit, build hash)."""


@dataclass(frozen=True)
class ArtifactState:
    recipe_file: str
    name: str
    state: str
    """missing | stale | built (present, verification missing or failed) | verified | invalid (recipe/source error)"""
    build_hash: str | None
    artifact_build_hash: str | None
    published: dict | None
    detail: str = ""

    def as_json(self) -> dict:
        return asdict(self)


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def published_record(artifacts: Path, name: str) -> dict | None:
    try:
        return json.loads((artifacts / PUBLISHED_DIR / f"{name}.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def artifact_states(paths: list[str | Path], artifacts: Path) -> list[ArtifactState]:
    """One state per recipe (variants expanded) under `paths`, comparing build hashes with artifacts/<name>/."""
    states = []
    for file in find_recipe_files(paths):
        try:
            loaded_recipes = load_recipes(file)
        except RecipeError as error:
            states.append(ArtifactState(str(file), "?", "invalid", None, None, None, str(error.problems[0])))
            continue
        for loaded in loaded_recipes:
            name = loaded.recipe.name
            manifest = read_manifest(artifacts / name)
            found = manifest.get("build_hash") if manifest else None
            published = published_record(artifacts, name)
            try:
                expected = make_plan(loaded).build_hash
            except BuilderError as error:
                states.append(ArtifactState(str(file), name, "invalid", None, found, published, str(error)))
                continue
            if manifest is None:
                state = "missing"
            elif found != expected:
                state = "stale"
            elif (manifest.get("verification") or {}).get("passed") is True:
                state = "verified"
            else:
                state = "built"
            if published and published.get("build_hash") != found:
                published = {**published, "outdated": True}
            states.append(ArtifactState(str(file), name, state, expected, found, published))
    return states


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
