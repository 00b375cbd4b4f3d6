"""A Hub source that cannot be reached (no route, DNS failure): one line naming the endpoint and what to check,
exit 1, not an internal error. Subprocesses, since huggingface_hub reads HF_ENDPOINT when imported."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    "endpoint", [f"http://127.0.0.1:{_closed_port()}", "http://no-such-host.invalid"], ids=["connection-refused", "dns"]
)
def test_an_unreachable_hub_exits_1_naming_the_endpoint(endpoint, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("schema_version: 1\nname: x\nsource:\n  model: org/m\nquantize:\n  method: bnb-4bit\n")
    env = {
        **os.environ,
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(tmp_path / "home"),
        "PYTHONPATH": str(REPO),
        "BUILDER_CACHE": str(tmp_path / "cache"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "builder", "plan", str(recipe)], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 1, done.stderr
    assert f"cannot reach the Hub at {endpoint} to resolve org/m@main" in done.stderr
    assert "check the network connection, DNS and proxy" in done.stderr
    assert "internal error" not in done.stderr
