"""Which recipes a git change touches: a recipe is changed when its file or any `extends` parent changed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from builder.errors import BuilderError, RecipeError
from builder.recipe import find_recipe_files, load_recipes


def _git(args: list[str], cwd: Path) -> bytes:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, check=False)
    except FileNotFoundError:
        raise BuilderError("--changed-since needs git on PATH") from None
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip()).decode(errors="replace")
        raise BuilderError(
            f"git {' '.join(args)} failed: {said}; is the ref right and are you inside the recipes' git repository?"
        )
    return done.stdout


def _paths(output: bytes) -> list[str]:
    """The paths of a `-z` listing: NUL-separated bytes as stored, decoded as the file system names them.

    Without `-z` git quotes a path with a non-ASCII byte, a tab, a newline or a quote (`"caf\\303\\251.yaml"`),
    which then matches no file: that recipe was never selected."""
    return [os.fsdecode(name) for name in output.split(b"\0") if name]


def changed_files(ref: str, cwd: Path) -> set[Path]:
    """Files that differ from `ref` in the work tree (committed or not), plus untracked ones, as absolute paths."""
    top = Path(os.fsdecode(_git(["rev-parse", "--show-toplevel"], cwd).removesuffix(b"\n")))
    _git(["rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], cwd)
    names = _paths(_git(["diff", "--name-only", "-z", ref, "--"], top))
    names += _paths(_git(["ls-files", "-z", "--others", "--exclude-standard"], top))
    return {(top / name).resolve() for name in names}


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
