"""Recipes in git, built incrementally: --changed-since (through `extends`), up-to-date skips, make targets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder.cli import main

REPO = Path(__file__).resolve().parents[2]
# The documented shapes of `build --json` rows (docs/automation.md).
BUILD_ROW_KEYS = {
    "recipe_file",
    "name",
    "path",
    "status",
    "build_hash",
    "verification_passed",
    "bits_per_param",
    "footprint",
    "timings",
}
PUBLISH_KEYS = {"status", "repo", "revision", "endpoint", "commit", "pr_url", "uploaded", "deleted", "attempts"}


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True, capture_output=True
    )


def _build(capsys, *argv: str) -> tuple[int, list[dict]]:
    code = main(["build", *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def recipe_repo(tiny_llama, tmp_path_factory) -> Path:
    """A git repo of three tiny-Llama recipes: two extend a shared base, one stands alone; all built once."""
    repo = tmp_path_factory.mktemp("recipe-repo")
    recipes = repo / "recipes"
    recipes.mkdir()
    (recipes / "_base.yaml").write_text(
        f"schema_version: 1\nsource:\n  model: {tiny_llama}\n  dtype: bfloat16\n"
        "verify:\n  max_new_tokens: 4\n  thresholds: {footprint_ratio: 1.0}\n"
    )
    for name, quant in (("nf4", "nf4"), ("fp4", "fp4")):
        (recipes / f"{name}.yaml").write_text(
            f"schema_version: 1\nextends: _base.yaml\nname: tiny-{name}\nquantize:\n  method: bnb-4bit\n"
            f"  quant_type: {quant}\n"
        )
    (recipes / "int8.yaml").write_text(
        f"schema_version: 1\nname: tiny-int8\nsource:\n  model: {tiny_llama}\n  dtype: bfloat16\n"
        "quantize:\n  method: bnb-8bit\nverify:\n  max_new_tokens: 4\n  thresholds: {footprint_ratio: 1.0}\n"
    )
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "recipes")
    return repo


@pytest.fixture(scope="module")
def built(recipe_repo):
    import os

    cwd = os.getcwd()
    os.chdir(recipe_repo)
    try:
        assert main(["build", "recipes", "--device", "cpu"]) == 0
    finally:
        os.chdir(cwd)
    return recipe_repo


def test_second_build_of_everything_builds_nothing_in_seconds(built, capsys, monkeypatch):
    monkeypatch.chdir(built)
    start = time.perf_counter()
    code, rows = _build(capsys, "recipes", "--device", "cpu")
    elapsed = time.perf_counter() - start
    assert code == 0
    assert sorted((r["name"], r["status"]) for r in rows) == [
        ("tiny-fp4", "up to date"),
        ("tiny-int8", "up to date"),
        ("tiny-nf4", "up to date"),
    ]
    assert elapsed < 5, f"an up-to-date build of 3 recipes took {elapsed:.1f} s"
    assert set(rows[0]) == BUILD_ROW_KEYS  # docs/automation.md: the shape is stable


def test_changed_since_builds_the_changed_recipe_only(built, capsys, monkeypatch):
    monkeypatch.chdir(built)
    code, rows = _build(capsys, "recipes", "--changed-since", "HEAD")
    assert (code, rows) == (0, [])
    int8 = built / "recipes" / "int8.yaml"
    int8.write_text(int8.read_text().replace("method: bnb-8bit", "method: bnb-8bit\n  threshold: 5.0"))
    code, rows = _build(capsys, "recipes", "--changed-since", "HEAD", "--device", "cpu")
    assert code == 0
    assert [(r["name"], r["status"]) for r in rows] == [("tiny-int8", "built")]


def test_changed_parent_rebuilds_its_children(built, capsys, monkeypatch):
    monkeypatch.chdir(built)
    base = built / "recipes" / "_base.yaml"
    base.write_text(base.read_text().replace("max_new_tokens: 4", "max_new_tokens: 3"))
    _git(built, "commit", "-qam", "base: fewer verification tokens")
    code, rows = _build(capsys, "recipes", "--changed-since", "HEAD~1", "--device", "cpu")
    assert code == 0
    rebuilt = sorted(r["name"] for r in rows if r["status"] == "built")
    assert rebuilt == ["tiny-fp4", "tiny-nf4"]  # int8.yaml, changed in the same range, is already up to date


def test_list_shows_every_artifact_verified(built, capsys, monkeypatch):
    monkeypatch.chdir(built)
    assert main(["list", "recipes", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {row["name"]: row["state"] for row in rows} == {
        "tiny-nf4": "verified",
        "tiny-fp4": "verified",
        "tiny-int8": "verified",
    }
    assert all(
        set(row) == {"recipe_file", "name", "state", "build_hash", "artifact_build_hash", "detail", "published"}
        for row in rows
    )


def test_make_targets_only_call_builder():
    dry = subprocess.run(
        ["make", "-n", "all", "build", "publish", "plan", "validate", "R=recipes/x.yaml", "VENV=/v", "VENV_CORE=/v"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    commands = [line for line in dry.splitlines() if line.startswith("/v/bin/builder ")]
    assert commands == [
        "/v/bin/builder build recipes/",
        "/v/bin/builder build recipes/x.yaml",
        "/v/bin/builder build recipes/x.yaml --publish",
        "/v/bin/builder plan recipes/x.yaml",
        "/v/bin/builder validate recipes/",
    ]


def _make(repo: Path, *targets: str) -> subprocess.CompletedProcess:
    """The project's Makefile run in `repo` with this interpreter's environment (models/ is not needed there)."""
    venv = Path(sys.executable).parent.parent
    # Not a sub-make of `make test`: no inherited flags, no "Entering directory" lines.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(
        ["make", "--no-print-directory", "-f", str(REPO / "Makefile"), "-o", "models/.ready", f"VENV={venv}", *targets],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )


def _builder_lines(done: subprocess.CompletedProcess) -> list[str]:
    """What `builder build` printed, without make's echo of the commands it ran."""
    return sorted(line for line in done.stdout.splitlines() if line.startswith("tiny-"))


def test_second_make_all_builds_nothing_in_seconds(built):
    _make(built, "all")  # whatever earlier tests left stale
    start = time.perf_counter()
    done = _make(built, "all")
    elapsed = time.perf_counter() - start
    assert _builder_lines(done) == [f"tiny-{q}: up to date -> artifacts/tiny-{q}" for q in ("fp4", "int8", "nf4")]
    assert elapsed < 5, f"a second `make all` over 3 recipes took {elapsed:.1f} s"


def test_make_manifest_rule_rebuilds_exactly_when_the_build_hash_says_so(built):
    target = "artifacts/tiny-int8/manifest.json"
    recipe = built / "recipes" / "int8.yaml"
    build_line = "builder build recipes --name tiny-int8 --out artifacts"

    def make() -> subprocess.CompletedProcess:
        return _make(built, target)

    _make(built, "all")
    # make runs the rule once when the stamp is new (its rule for a prerequisite that did not exist); builder
    # answers "up to date". From then on only the stamp runs.
    assert "tiny-int8: up to date -> artifacts/tiny-int8" in make().stdout
    assert build_line not in make().stdout
    recipe.write_text(recipe.read_text() + "# a comment changes no resolved value\n")
    assert build_line not in make().stdout
    recipe.write_text(recipe.read_text().replace("max_new_tokens: 4", "max_new_tokens: 5"))
    done = make()
    assert build_line in done.stdout and "tiny-int8: built" in done.stdout
    assert build_line not in make().stdout
    (built / "artifacts" / "tiny-int8" / "README.md").unlink()  # a damaged artifact is rebuilt, as builder would
    assert "tiny-int8: built" in make().stdout
    assert build_line not in make().stdout
    _git(built, "commit", "-qam", "int8: one more verification token")


def test_build_quiet_prints_results_only(built, capsys, monkeypatch):
    monkeypatch.chdir(built)
    assert main(["build", "recipes", "--name", "tiny-nf4"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "tiny-nf4: up to date -> artifacts/tiny-nf4\n"
    assert "up to date" not in captured.err  # one line per outcome: stdout's
    assert main(["build", "recipes", "--name", "tiny-nf4", "--quiet"]) == 0
    assert capsys.readouterr() == (captured.out, "")
    assert "BUILDER_QUIET" not in os.environ  # --quiet lasts for its command only


def test_build_publish_json_is_one_document(built, tmp_path):
    """The workflow's `build --changed-since REF --publish --json`: one JSON document with each artifact's publish
    outcome; one recipe without a target repo fails its publish, the other still publishes, and the exit is 1."""
    from huggingface_hub import HfApi

    from builder.hub.server import start_in_thread

    recipes = built / "recipes"
    (recipes / "fp4.yaml").write_text((recipes / "fp4.yaml").read_text() + "publish:\n  repo: team/tiny-fp4\n")
    (recipes / "nf4.yaml").write_text((recipes / "nf4.yaml").read_text() + "  double_quant: true\n")
    hub = start_in_thread(tmp_path / "hub", token="hf_test")
    try:
        env = {
            **os.environ,
            "HF_ENDPOINT": hub.url,
            "HF_HUB_DISABLE_XET": "1",
            "HF_TOKEN": "hf_test",
            "HF_HOME": str(tmp_path / "hf-home"),
        }
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "builder",
                "build",
                "recipes",
                "--changed-since",
                "HEAD",
                "--device",
                "cpu",
                "--publish",
                "--json",
            ],
            cwd=built,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 1, done.stderr[-2000:]
        rows = {row["name"]: row for row in json.loads(done.stdout)}
        assert sorted(rows) == ["tiny-fp4", "tiny-nf4"]
        assert rows["tiny-nf4"]["status"] == "built"
        assert rows["tiny-fp4"]["status"] == "up to date"  # `publish` is not part of the build hash
        published = rows["tiny-fp4"]["publish"]
        assert set(rows["tiny-fp4"]) == BUILD_ROW_KEYS | {"publish"} and set(published) == PUBLISH_KEYS
        assert published["status"] == "published" and published["repo"] == "team/tiny-fp4", published
        assert [c.commit_id for c in HfApi(endpoint=hub.url, token="hf_test").list_repo_commits("team/tiny-fp4")][
            0
        ] == published["commit"]
        assert rows["tiny-nf4"]["publish"]["status"] == "failed"
        assert "no target repo" in rows["tiny-nf4"]["publish"]["error"]
        assert "error: publishing tiny-nf4: no target repo" in done.stderr
    finally:
        hub.shutdown()
        hub.server_close()
        _git(built, "commit", "-qam", "fp4 published, nf4 double quant")


def test_pre_commit_hook_validates_recipes(tmp_path, capsys, monkeypatch):
    """.pre-commit-hooks.yaml as pre-commit runs it: `entry` plus the user's `args`, no file names, on YAML files."""
    import re
    import shlex

    import yaml

    [hook] = yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())
    assert hook["id"] == "builder-validate" and hook["language"] == "python" and hook["pass_filenames"] is False
    assert re.search(hook["files"], "recipes/smollm2/nf4.yaml") and re.search(hook["files"], "a/b.yml")
    assert not re.search(hook["files"], "builder/cli.py")
    program, *argv = shlex.split(hook["entry"])
    assert program == "builder"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "ok.yaml").write_text(
        "schema_version: 1\nname: ok\nsource: {model: org/m}\nquantize: {method: bnb-8bit}\n"
    )
    assert main([*argv, "recipes/"]) == 0
    (tmp_path / "recipes" / "bad.yaml").write_text(
        "schema_version: 1\nname: bad\nsource: {model: org/m}\nquantize: {method: bnb-8bit, treshold: 6.0}\n"
    )
    assert main([*argv, "recipes/"]) == 1
    assert "recipes/bad.yaml:4:30: quantize.treshold: unknown key 'treshold' (did you mean 'threshold'?)" in (
        capsys.readouterr().out
    )
