"""Real artifacts (SmolLM2-135M-Instruct nf4, all-MiniLM-L6-v2 ONNX) published to the loopback registry with the
real huggingface_hub client, then downloaded and loaded back with stock libraries in fresh processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from builder.hub.server import start_in_thread
from builder.pipeline import build
from builder.plan import make_plan
from builder.recipe import load_recipes

REPO = Path(__file__).resolve().parents[2]
TOKEN = "hf_integration_token"

# Runs in a fresh process with HF_ENDPOINT set: download the repo, compare every file with the manifest.
_DOWNLOAD = """
import hashlib, json, sys
from pathlib import Path
from huggingface_hub import snapshot_download
folder = Path(snapshot_download(sys.argv[1]))
manifest = json.loads((folder / "manifest.json").read_text())
bad = [n for n, e in manifest["files"].items() if hashlib.sha256((folder / n).read_bytes()).hexdigest() != e["sha256"]]
assert not bad, bad
listed = set(manifest["files"]) | {"manifest.json"}
present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
assert present == listed, present ^ listed
print(folder)
"""


def _built(recipe: str, tmp_path_factory) -> Path:
    [loaded] = load_recipes(REPO / recipe)
    return build(make_plan(loaded), out=tmp_path_factory.mktemp("publish-artifacts"), device="cpu").path


@pytest.fixture(scope="module")
def smollm2_nf4(smollm2, hub, tmp_path_factory) -> tuple[Path, str]:
    """`builder build recipes/smollm2/nf4.yaml --publish` (what `make demo` builds): the artifact folder and what
    the command printed."""
    out = tmp_path_factory.mktemp("publish-artifacts")
    result = _run(
        [
            "-m",
            "builder",
            "build",
            str(REPO / "recipes/smollm2/nf4.yaml"),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--publish",
        ],
        _env(hub, tmp_path_factory.mktemp("build-env")),
        timeout=1500,
    )
    return out / "smollm2-135m-instruct-nf4", result.stdout


@pytest.fixture(scope="module")
def minilm_onnx(minilm, tmp_path_factory) -> Path:
    return _built("recipes/minilm/onnx-cpu.yaml", tmp_path_factory)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    server = start_in_thread(tmp_path_factory.mktemp("hub"), token=TOKEN)
    yield server
    server.shutdown()
    server.server_close()


def _env(hub, tmp_path: Path) -> dict:
    return {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_TOKEN": TOKEN,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }


def _run(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _commits(hub, repo: str) -> list[str]:
    from huggingface_hub import HfApi

    return [c.commit_id for c in HfApi(endpoint=hub.url, token=TOKEN).list_repo_commits(repo)]


@pytest.mark.slow  # ~7 min on a busy 2-core machine (build + verify + two 4-bit loads); `make demo` runs the same path
def test_smollm2_nf4_publishes_downloads_and_generates_like_the_local_artifact(hub, smollm2_nf4, tmp_path):
    env = _env(hub, tmp_path)
    artifact, printed = smollm2_nf4
    repo = json.loads((artifact / "manifest.json").read_text())["recipe"]["publish"]["repo"]
    assert f"published {artifact} to {hub.url}/{repo} @ " in printed
    _run(["-c", _DOWNLOAD, repo], env)
    generate = (
        "import sys, torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "texts = []\n"
        "for where in sys.argv[1:]:\n"
        "    tok = AutoTokenizer.from_pretrained(where)\n"
        "    model = AutoModelForCausalLM.from_pretrained(where)\n"
        "    ids = tok('The capital of France is', return_tensors='pt')\n"
        "    texts.append(tok.decode(model.generate(**ids, max_new_tokens=4, do_sample=False)[0]))\n"
        "assert texts[0] == texts[1], texts\n"
        "print(texts[0])\n"
    )
    text = _run(["-c", generate, repo, str(artifact)], env).stdout
    assert text.startswith("The capital of France is")

    before = _commits(hub, repo)
    again = json.loads(_run(["-m", "builder", "publish", str(artifact), "--json"], env).stdout)
    assert again["status"] == "unchanged" and again["commit"] == before[0]
    assert _commits(hub, repo) == before


def test_minilm_onnx_publishes_downloads_and_runs_in_onnxruntime(hub, minilm_onnx, tmp_path):
    env = _env(hub, tmp_path)
    repo = "demo/all-minilm-l6-v2-onnx-cpu"
    published = json.loads(_run(["-m", "builder", "publish", str(minilm_onnx), "--repo", repo, "--json"], env).stdout)
    assert published["status"] == "published"
    folder = Path(_run(["-c", _DOWNLOAD, repo], env).stdout.strip())
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["library_name"] == "onnx"
    graph = sorted(name for name in manifest["files"] if name.endswith(".onnx"))[0]
    run = (
        "import sys, numpy as np, onnxruntime as ort\nfrom transformers import AutoTokenizer\n"
        "outputs = []\n"
        "for folder in sys.argv[2:]:\n"
        "    tok = AutoTokenizer.from_pretrained(folder)\n"
        "    session = ort.InferenceSession(f'{folder}/{sys.argv[1]}', providers=['CPUExecutionProvider'])\n"
        "    feed = tok(['A man is eating food.'], return_tensors='np')\n"
        "    outputs.append(session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})[0])\n"
        "assert np.array_equal(outputs[0], outputs[1])\n"
        "print(outputs[0].shape)\n"
    )
    _run(["-c", run, graph, str(folder), str(minilm_onnx)], env)
    card = (folder / "README.md").read_text()
    assert "library_name: onnx" in card and f'snapshot_download("{repo}")' in card
