"""A command whose reader goes away (`builder schema | head -1`) exits 141, as a shell reports for `cat`, and
leaves no crash log or "Exception ignored" behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_hub_publish import hub, make_artifact  # noqa: F401 (hub: a fixture)

REPO = Path(__file__).resolve().parents[2]


def _run_into_a_closed_pipe(args: list[str], cache: Path, **env: str) -> subprocess.CompletedProcess:
    """`python -m builder ARGS` with stdout a pipe whose reader closed before the command wrote anything (what
    `| head -1` becomes once head has its line; closing first makes it certain, not a race)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "builder", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, "XDG_CACHE_HOME": str(cache), **env},
            timeout=120,
        )
    finally:
        os.close(write_end)


def _assert_closed_pipe_exit(done: subprocess.CompletedProcess, cache: Path) -> None:
    assert done.returncode == 141, done.stderr
    assert "Error" not in done.stderr and "Exception" not in done.stderr, done.stderr
    assert not (cache / "builder" / "crash").exists()


@pytest.mark.parametrize("args", [["schema"], ["list"]], ids=["schema", "list"])
def test_a_closed_pipe_exits_141_without_a_crash_log(tmp_path, args):
    _assert_closed_pipe_exit(_run_into_a_closed_pipe(args, tmp_path / "cache"), tmp_path / "cache")


def test_publish_dry_run_into_a_closed_pipe_exits_141(hub, tmp_path):  # noqa: F811 (the fixture)
    artifact = make_artifact(tmp_path / "artifact")
    done = _run_into_a_closed_pipe(
        ["publish", str(artifact), "--dry-run"], tmp_path / "cache", HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1"
    )
    _assert_closed_pipe_exit(done, tmp_path / "cache")
