import subprocess
from pathlib import Path

import pytest

from builder.changes import recipes_changed_since
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
