import json
import subprocess
from pathlib import Path

import pytest

from builder.changes import recipes_changed_since
from builder.cli import main
from builder.errors import BuilderError

BASE = "schema_version: 1\nsource:\n  model: ./m\n  dtype: bfloat16\n"


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True, capture_output=True
    )


def _recipe(name: str, extends: str | None = None) -> str:
    head = f"extends: {extends}\n" if extends else ""
    return f"{head}schema_version: 1\nname: {name}\nquantize:\n  method: bnb-4bit\n" + (
        "" if extends else "source:\n  model: ./m\n"
    )


@pytest.fixture
def recipe_repo(tmp_path) -> Path:
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "_base.yaml").write_text(BASE)
    (tmp_path / "recipes" / "a.yaml").write_text(_recipe("a", "_base.yaml"))
    (tmp_path / "recipes" / "b.yaml").write_text(_recipe("b", "_base.yaml"))
    (tmp_path / "recipes" / "c.yaml").write_text(_recipe("c"))
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "recipes")
    return tmp_path


def _names(paths: list[Path]) -> list[str]:
    return sorted(p.name for p in paths)


def test_nothing_changed_selects_nothing(recipe_repo):
    assert recipes_changed_since("HEAD", [recipe_repo / "recipes"]) == []


def test_changed_recipe_is_selected_alone(recipe_repo):
    (recipe_repo / "recipes" / "c.yaml").write_text(_recipe("c") + "verify:\n  max_new_tokens: 4\n")
    assert _names(recipes_changed_since("HEAD", [recipe_repo / "recipes"])) == ["c.yaml"]


def test_changed_parent_selects_every_child(recipe_repo):
    (recipe_repo / "recipes" / "_base.yaml").write_text(BASE.replace("bfloat16", "float16"))
    _git(recipe_repo, "commit", "-qam", "base to fp16")
    assert _names(recipes_changed_since("HEAD~1", [recipe_repo / "recipes"])) == ["a.yaml", "b.yaml"]


def test_new_untracked_recipe_is_selected(recipe_repo):
    (recipe_repo / "recipes" / "d.yaml").write_text(_recipe("d"))
    assert _names(recipes_changed_since("HEAD", [recipe_repo / "recipes"])) == ["d.yaml"]


def test_unknown_ref_is_a_clear_error(recipe_repo):
    with pytest.raises(BuilderError, match="is the ref right"):
        recipes_changed_since("no-such-ref", [recipe_repo / "recipes"])


# --- paths git would quote ---------------------------------------------------------------------------------------

ODD_NAMES = ["café.yaml", "tab\there.yaml", "new\nline.yaml", 'say "hi".yaml', "back\\slash.yaml", "it's.yaml"]
"""Recipe file names that git writes quoted (`"caf\\303\\251.yaml"`) unless it is asked for NUL-separated output."""


@pytest.fixture
def odd_repo(tmp_path) -> tuple[Path, list[str]]:
    """A repo whose recipes have names git quotes: each is then edited (and one more is added, untracked); a recipe
    extending a base with such a name is selected through it; `same.yaml` is not touched."""
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "_bäse\t.yaml").write_text(BASE)
    (recipes / "child.yaml").write_text(_recipe("child", "'_bäse\t.yaml'"))
    (recipes / "same.yaml").write_text(_recipe("same"))
    names = []
    for i, name in enumerate(ODD_NAMES):
        try:
            (recipes / name).write_text(_recipe(f"odd{i}"))
        except OSError:  # a file system that refuses the name (a newline, a backslash)
            continue
        names.append(name)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "recipes")
    for name in names:
        with open(recipes / name, "a") as recipe:
            recipe.write("# edited\n")
    (recipes / "_bäse\t.yaml").write_text(BASE.replace("bfloat16", "float16"))
    (recipes / "nouveau é\n.yaml").write_text(_recipe("untracked"))
    return recipes, sorted([*names, "child.yaml", "nouveau é\n.yaml"])


def test_recipes_whose_paths_git_quotes_are_selected(odd_repo):
    recipes, changed = odd_repo
    assert _names(recipes_changed_since("HEAD", [recipes])) == changed


def test_matrix_changed_since_lists_recipes_whose_paths_git_quotes(odd_repo, capsys):
    recipes, changed = odd_repo
    assert main(["matrix", str(recipes), "--changed-since", "HEAD"]) == 0
    listed = json.loads(capsys.readouterr().out)["include"]
    assert sorted(Path(unit["recipe"]).name for unit in listed) == changed


def test_build_changed_since_builds_recipes_whose_paths_git_quotes(odd_repo, capsys, tmp_path):
    recipes, changed = odd_repo
    # Their source folder does not exist, so each selected recipe fails at once, naming its file.
    assert main(["build", str(recipes), "--changed-since", "HEAD", "--json", "--out", str(tmp_path / "out")]) == 1
    rows = json.loads(capsys.readouterr().out)
    assert sorted(Path(row["recipe_file"]).name for row in rows) == changed
    assert all("source folder" in row["error"] for row in rows)
