"""Which recipes a git change touches: a recipe is changed when its file or any `extends` parent changed."""

from __future__ import annotations

import subprocess
from pathlib import Path

from builder.errors import BuilderError, RecipeError
from builder.recipe import find_recipe_files, load_recipes


def _git(args: list[str], cwd: Path) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise BuilderError("--changed-since needs git on PATH") from None
    if done.returncode != 0:
        raise BuilderError(
            f"git {' '.join(args)} failed: {done.stderr.strip() or done.stdout.strip()}; is the ref "
            "right and are you inside the recipes' git repository?"
        )
    return done.stdout


def changed_files(ref: str, cwd: Path) -> set[Path]:
    """Files that differ from `ref` in the work tree (committed or not), plus untracked ones, as absolute paths."""
    top = Path(_git(["rev-parse", "--show-toplevel"], cwd).strip())
    _git(["rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], cwd)
    names = _git(["diff", "--name-only", ref, "--"], top).splitlines()
    names += _git(["ls-files", "--others", "--exclude-standard"], top).splitlines()
    return {(top / name).resolve() for name in names if name}


def recipes_changed_since(ref: str, paths: list[str | Path]) -> list[Path]:
    """Recipe files under `paths` whose own file or any `extends` parent changed since `ref`.

    A recipe that no longer loads counts as changed when its own file changed, so the build reports its error."""
    recipe_files = find_recipe_files(paths)
    if not recipe_files:
        return []
    changed = changed_files(ref, recipe_files[0].resolve().parent)
    selected = []
    for file in recipe_files:
        try:
            involved = {f.resolve() for f in load_recipes(file)[0].files}
        except RecipeError:
            involved = {file.resolve()}
        if involved & changed:
            selected.append(file)
    return selected
