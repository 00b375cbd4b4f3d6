"""A build whose source is a Hub repo, against the loopback registry (builder.hub.server): pinned to the resolved
commit, downloaded into the Hub cache; a missing repo or revision is one line and exit 1.

Every Hub call runs in a subprocess: huggingface_hub reads HF_ENDPOINT and HF_HUB_DISABLE_XET when imported.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from builder.hub.server import start_in_thread

BUILDER = [sys.executable, "-m", "builder"]
UPLOAD = """
import sys
from huggingface_hub import HfApi
api = HfApi()
api.create_repo(sys.argv[1])
print(api.upload_folder(repo_id=sys.argv[1], folder_path=sys.argv[2]).oid)
"""


@pytest.fixture(scope="module")
def hub(tiny_llama, tmp_path_factory):
    """The loopback registry holding tiny_llama as org/tiny; yields (server, env, commit)."""
    root = tmp_path_factory.mktemp("hub")
    server = start_in_thread(root / "registry")
    env = {
        **os.environ,
        "HF_ENDPOINT": server.url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(root / "home"),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    env.pop("HF_TOKEN", None)
    env.pop("HF_HUB_OFFLINE", None)
    uploaded = subprocess.run(
        [sys.executable, "-c", UPLOAD, "org/tiny", str(tiny_llama)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert uploaded.returncode == 0, uploaded.stderr[-2000:]
    commit = re.search(r"[0-9a-f]{40}", uploaded.stdout).group(0)
    yield server, env, commit
    server.shutdown()
    server.server_close()


def run_build(env: dict, recipe: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*BUILDER, "build", str(recipe), "--out", str(out), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def hub_recipe(folder: Path, revision: str, repo: str = "org/tiny") -> Path:
    recipe = folder / "hub.yaml"
    recipe.write_text(
        f"schema_version: 1\nname: tiny-hub\nsource:\n  model: {repo}\n  revision: {revision}\n"
        "  dtype: bfloat16\nquantize:\n  method: bnb-8bit\n"
        "verify:\n  thresholds: {footprint_ratio: 1.0}\n"
    )
    return recipe


def test_hub_source_is_pinned_to_its_commit_and_downloaded_to_the_cache(hub, tmp_path):
    server, env, commit = hub
    done = run_build(env, hub_recipe(tmp_path, "main"), tmp_path / "out")
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "tiny-hub" / "manifest.json").read_text())
    assert manifest["source"] == {"model": "org/tiny", "revision": commit, "task": "text-generation"}
    lock = (tmp_path / "out" / "tiny-hub" / "recipe.lock.yaml").read_text()
    assert f"revision: {commit}" in lock
    snapshot = Path(env["HF_HOME"]) / "hub" / "models--org--tiny" / "snapshots" / commit
    assert (snapshot / "model.safetensors").is_file() and (snapshot / "config.json").is_file()


@pytest.mark.parametrize(
    "repo, revision, message",
    [
        ("org/tiny", "no-such-branch", "revision 'no-such-branch' not found in Hub repo org/tiny"),
        ("org/missing", "main", "Hub repo org/missing not found"),
    ],
)
def test_missing_hub_repo_or_revision_is_one_line_and_writes_nothing(hub, tmp_path, repo, revision, message):
    server, env, _ = hub
    done = run_build(env, hub_recipe(tmp_path, revision, repo), tmp_path / "out")
    assert done.returncode == 1
    assert message in done.stderr
    assert len([line for line in done.stderr.splitlines() if line.startswith("error:")]) == 1
    assert not (tmp_path / "out").exists()
