"""`builder publish` against the loopback registry with the real huggingface_hub client, on artifact folders
assembled here in the contract's format (small files; the real-artifact tests are in tests/integration/).

Every publish runs `builder publish` in a subprocess: huggingface_hub reads HF_ENDPOINT and HF_HUB_DISABLE_XET at
import time, and a subprocess is also what a kill test needs.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.request import Request, urlopen

import pytest

from builder.hub.server import start_in_thread

TOKEN = "hf_local_test_token_123"
REPO = "demo/tiny"
BUILDER = [sys.executable, "-m", "builder"]
SOURCE, SOURCE_COMMIT = "HuggingFaceTB/SmolLM2-135M-Instruct", "0123456789abcdef0123456789abcdef01234567"


def make_artifact(
    folder: Path,
    *,
    weights: bytes = b"\x00weights" * 4096,
    passed: bool = True,
    extra_files: dict[str, bytes] | None = None,
    source_revision: str | None = SOURCE_COMMIT,
    model: str = SOURCE,
    repo: str | None = REPO,
    build_hash: str | None = None,
) -> Path:
    """An artifact folder as the pipeline writes it: weights, config, tokenizer, card, lock, report, manifest."""
    from builder.artifact import Manifest
    from builder.card import render_card

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.rglob("*"):
        if old.is_file():
            old.unlink()
    recipe = {
        "schema_version": 1,
        "name": "tiny-nf4",
        "source": {
            "model": model,
            "revision": source_revision,
            "task": "text-generation",
            "dtype": "auto",
            "trust_remote_code": False,
            "allow_pickle": False,
        },
        "quantize": {
            "method": "bnb-4bit",
            "quant_type": "nf4",
            "double_quant": True,
            "compute_dtype": "bfloat16",
            "quant_storage": "uint8",
            "skip_modules": [],
            "dequantize": False,
        },
        "publish": {
            "repo": repo,
            "revision": "main",
            "private": False,
            "create_pr": False,
            "license": "apache-2.0",
            "tags": ["tiny"],
            "card": "Made for the publish tests.",
        }
        if repo
        else None,
    }
    report = {
        "passed": passed,
        "task": "text-generation",
        "device": "cpu",
        "provider": None,
        "metrics": {"top1_agreement": 0.97 if passed else 0.4},
        "thresholds": {"top1_agreement": 0.9},
        "failures": []
        if passed
        else [
            {
                "metric": "top1_agreement",
                "value": 0.4,
                "threshold": 0.9,
                "message": "top1_agreement 0.400 < 0.900 (missed by 0.500)",
            }
        ],
        "performance": {},
    }
    manifest = {
        "manifest_version": 1,
        "name": "tiny-nf4",
        "build_hash": build_hash or hashlib.sha256(weights).hexdigest(),
        "kind": "quantize",
        "recipe": recipe,
        "recipe_files": ["recipes/tiny.yaml"],
        "source": {"model": model, "revision": source_revision or SOURCE_COMMIT, "task": "text-generation"},
        "versions": {"builder": "0.1.0", "torch": "2.13.0"},
        "device": "test cpu",
        "built_at": "2026-01-01T00:00:00+00:00",
        "timings": {"load": 0.1},
        "footprint": {"source_bytes": 4 * len(weights), "artifact_bytes": len(weights), "ratio": 0.25},
        "bits_per_param": 4.13,
        "library_name": "transformers",
        "verification": report,
    }
    files = {
        "model.safetensors": weights,
        "config.json": b'{"architectures": ["LlamaForCausalLM"]}',
        "tokenizer.json": b'{"version": "1.0"}',
        "verify-report.json": json.dumps(report).encode(),
        "recipe.lock.yaml": b"schema_version: 1\nname: tiny-nf4\n",
        **(extra_files or {}),
    }
    files["README.md"] = render_card(Manifest.model_validate(manifest)).encode()
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    manifest["files"] = {
        name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)} for name, data in sorted(files.items())
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder


def run_publish(
    artifact: Path,
    endpoint: str,
    *args: str,
    token: str | None = TOKEN,
    timeout: float = 120,
    home: Path | None = None,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_ENDPOINT": endpoint,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        **(env or {}),
    }
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    if home is not None:
        env["HF_HOME"] = str(home)
    return subprocess.run(
        [*BUILDER, "publish", str(artifact), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def hub(tmp_path):
    server = start_in_thread(tmp_path / "hub", token=TOKEN, page_size=3)
    yield server
    server.shutdown()
    server.server_close()


def hf_api(server):
    from huggingface_hub import HfApi

    return HfApi(endpoint=server.url, token=TOKEN)


def commits(server, repo: str = REPO, revision: str = "main") -> list[str]:
    return [c.commit_id for c in hf_api(server).list_repo_commits(repo, revision=revision)]


def test_publish_then_download_matches_manifest_and_second_publish_is_a_no_op(hub, tmp_path):
    artifact = make_artifact(tmp_path / "artifact")
    first = run_publish(artifact, hub.url, "--json")
    assert first.returncode == 0, first.stderr
    result = json.loads(first.stdout)
    assert result["status"] == "published" and result["repo"] == REPO
    assert TOKEN not in first.stdout + first.stderr

    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(REPO, endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "cache"))
    manifest = json.loads((artifact / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == entry["sha256"], name
    assert (folder / "manifest.json").read_bytes() == (artifact / "manifest.json").read_bytes()
    record = json.loads((artifact.parent / ".published" / "tiny-nf4.json").read_text())  # what `builder list` shows
    assert record["repo"] == REPO and record["commit"] == result["commit"]
    assert record["build_hash"] == manifest["build_hash"] and TOKEN not in json.dumps(record)
    tree = {f.path: f for f in hf_api(hub).list_repo_tree(REPO, recursive=True)}
    assert tree["model.safetensors"].lfs.sha256 == manifest["files"]["model.safetensors"]["sha256"]
    info = hf_api(hub).model_info(REPO)
    assert info.card_data["base_model"] == SOURCE and info.card_data["base_model_relation"] == "quantized"
    assert "bitsandbytes" in info.tags and "nf4" in info.tags and info.pipeline_tag == "text-generation"

    before = commits(hub)
    second = run_publish(artifact, hub.url)
    assert second.returncode == 0, second.stderr
    assert "nothing pushed" in second.stdout
    assert commits(hub) == before


def test_list_names_the_registry_a_publish_went_to(hub, tmp_path, monkeypatch, capsys):
    from dataclasses import replace

    from builder.cli import main
    from builder.inventory import HUB_ENDPOINT, artifact_states, format_table

    artifact = make_artifact(tmp_path / "artifacts" / "tiny-nf4")
    published = run_publish(artifact, hub.url)
    assert published.returncode == 0, published.stderr
    tiny = Path(__file__).resolve().parents[1] / "recipes" / "models" / "tiny"
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "tiny.yaml").write_text(
        f"schema_version: 1\nname: tiny-nf4\nsource:\n  model: {tiny}\nquantize:\n  method: bnb-4bit\n"
    )
    monkeypatch.chdir(tmp_path)
    assert main(["list", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["published"]["endpoint"] == hub.url and row["published"]["repo"] == REPO
    assert main(["list"]) == 0
    commit = row["published"]["commit"][:12]
    assert f"  {REPO}@{commit} on {hub.url}\n" in capsys.readouterr().out
    # huggingface.co, the default, goes without saying
    [state] = artifact_states(["recipes"], Path("artifacts"))
    on_the_hub = replace(state, published={**row["published"], "endpoint": HUB_ENDPOINT})
    assert format_table([on_the_hub]).endswith(f"  {REPO}@{commit}")


def test_changed_build_makes_exactly_one_commit_replacing_and_deleting_files(hub, tmp_path):
    artifact = make_artifact(tmp_path / "artifact", extra_files={"onnx/old.txt": b"stale"})
    assert run_publish(artifact, hub.url).returncode == 0
    before = commits(hub)
    make_artifact(artifact, weights=b"\x01changed" * 5000, extra_files={"new.txt": b"fresh"})
    changed = run_publish(artifact, hub.url, "--json")
    assert changed.returncode == 0, changed.stderr
    assert json.loads(changed.stdout)["deleted"] == ["onnx/old.txt"]
    after = commits(hub)
    assert len(after) == len(before) + 1 and after[1:] == before
    files = {f.path for f in hf_api(hub).list_repo_tree(REPO, recursive=True) if hasattr(f, "size")}
    assert "onnx/old.txt" not in files and "new.txt" in files


def test_dry_run_touches_nothing_and_prints_the_card(hub, tmp_path):
    artifact = make_artifact(tmp_path / "artifact")
    dry = run_publish(artifact, hub.url, "--dry-run", token=None)
    assert dry.returncode == 0, dry.stderr
    assert "model.safetensors" in dry.stdout and "manifest.json" in dry.stdout
    assert "base_model_relation: quantized" in dry.stdout
    assert "Made for the publish tests." in dry.stdout
    assert not (Path(hub.store.root) / "repos" / "models" / "demo").exists()
    assert not (artifact.parent / ".published").exists()


@pytest.mark.parametrize(
    ("kwargs", "args", "token", "message"),
    [
        ({"passed": False}, (), TOKEN, "did not pass verification"),
        ({}, (), None, "hf auth login"),
        ({"repo": None}, (), TOKEN, "--repo org/name"),
        ({}, ("--repo", "no-namespace"), TOKEN, "'no-namespace' is not a Hub repo id; write it as org/name"),
        (
            {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "source_revision": "main"},
            (),
            TOKEN,
            "is not a 40-hex commit",
        ),
    ],
    ids=["unverified", "no-token", "no-repo", "bad-repo", "unpinned-hub-source"],
)
def test_refusals_exit_1_with_the_fix(hub, tmp_path, kwargs, args, token, message):
    artifact = make_artifact(tmp_path / "artifact", **kwargs)
    result = run_publish(artifact, hub.url, *args, token=token, home=tmp_path / "hf-home")
    assert result.returncode == 1, result.stderr
    assert message in result.stderr
    assert not (Path(hub.store.root) / "repos" / "models" / "demo").exists()


def test_refuses_files_changed_after_the_build(hub, tmp_path):
    artifact = make_artifact(tmp_path / "artifact")
    (artifact / "config.json").write_text('{"architectures": ["Edited"]}')
    result = run_publish(artifact, hub.url)
    assert result.returncode == 1 and "changed after the build" in result.stderr


def test_wrong_token_is_refused_with_login_advice(hub, tmp_path):
    result = run_publish(make_artifact(tmp_path / "artifact"), hub.url, token="hf_wrong")
    assert result.returncode == 1 and "hf auth login" in result.stderr and "hf_wrong" not in result.stderr


def test_revision_branch_private_repo_and_pull_request(hub, tmp_path):
    artifact = make_artifact(tmp_path / "artifact")
    branch = run_publish(artifact, hub.url, "--revision", "release", "--private", "--repo", "demo/private")
    assert branch.returncode == 0, branch.stderr
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    refs = hf_api(hub).list_repo_refs("demo/private")
    assert {b.name for b in refs.branches} == {"main", "release"}
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=False).model_info("demo/private")
    # the card was re-rendered for the repo it went to
    card = Path(
        hf_api(hub).hf_hub_download("demo/private", "README.md", revision="release", cache_dir=tmp_path / "c")
    ).read_text()
    assert 'model_id = "demo/private"' in card  # the usage snippet's repo

    make_artifact(artifact, weights=b"\x02pr" * 3000, repo="demo/private")
    pr = run_publish(artifact, hub.url, "--revision", "release", "--create-pr", "--json")
    assert pr.returncode == 0, pr.stderr
    assert json.loads(pr.stdout)["pr_url"].endswith("/demo/private/discussions/1")
    refs = hf_api(hub).list_repo_refs("demo/private", include_pull_requests=True)
    assert [p.ref for p in refs.pull_requests] == ["refs/pr/1"]


# --- failure injection: a proxy in front of the registry ------------------------------------------------------


class FaultyProxy(ThreadingHTTPServer):
    """Forwards to the registry; `rules` decide per request: ("503", n) answers 503 to the next n commits,
    ("drop-after-commit", n) forwards the commit then cuts the connection before the answer, ("hang-lfs",)
    stalls LFS uploads forever, ("drop-commit",) cuts every commit before forwarding it, ("hang-commit", n) lets
    the next n commits hang unanswered for a minute."""

    daemon_threads = True

    def __init__(self, target: str, rule: tuple):
        self.target, self.rule, self.seen = target, list(rule), []
        self.lfs_started = threading.Event()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FaultyProxy

    def log_message(self, *args) -> None:
        pass

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while size := int(self.rfile.readline().strip() or b"0", 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = self.rfile.read(length) if length else b""
        rule, is_commit = self.server.rule, "/commit/" in self.path
        self.server.seen.append(f"{self.command} {self.path}")
        if rule[0] == "hang-lfs" and "/lfs/objects/upload/" in self.path:
            self.server.lfs_started.set()
            time.sleep(600)
        if is_commit and rule[0] == "503" and rule[1] > 0:
            rule[1] -= 1
            return self._answer(503, {"X-Error-Message": "injected"}, b'{"error": "injected 503"}')
        if is_commit and rule[0] == "hang-commit" and rule[1] > 0:
            rule[1] -= 1
            time.sleep(60)
            self.close_connection = True
            return
        if is_commit and rule[0] == "drop-commit":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        headers = {
            k: v
            for k, v in self.headers.items()
            if k.lower() not in ("transfer-encoding", "content-length", "connection")
        }
        request = Request(
            self.server.target + self.path,
            data=body if self.command in ("POST", "PUT") else None,
            headers=headers,
            method=self.command,
        )
        try:
            response = urlopen(request, timeout=60)
            status, answer_headers, data = response.status, dict(response.headers), response.read()
        except Exception as error:  # HTTPError carries the registry's answer
            status, answer_headers, data = error.code, dict(error.headers), error.read()
        if is_commit and rule[0] == "drop-after-commit" and rule[1] > 0:
            rule[1] -= 1
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self._answer(status, answer_headers, data)

    def _answer(self, status: int, headers: dict, data: bytes) -> None:
        self.send_response(status)
        for key, value in headers.items():
            if key.lower() not in ("content-length", "connection", "transfer-encoding", "server", "date"):
                self.send_header(key, value)
        length = {k.lower(): v for k, v in headers.items()}.get("content-length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length or str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_HEAD = _forward


@pytest.fixture
def proxy(hub):
    servers = []

    def start(rule: tuple) -> FaultyProxy:
        server = FaultyProxy(hub.url, rule)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_injected_5xx_on_the_commit_is_retried(hub, proxy, tmp_path):
    artifact = make_artifact(tmp_path / "artifact")
    faulty = proxy(("503", 2))
    result = run_publish(artifact, faulty.url, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["attempts"] == 3
    assert "retrying" in result.stderr
    assert len(commits(hub)) == 2  # the initial commit and exactly one publish


def test_persistent_5xx_exits_1_with_the_reason_and_leaves_the_repo_unchanged(hub, proxy, tmp_path):
    artifact = make_artifact(tmp_path / "artifact")
    hf_api(hub).create_repo(REPO)
    before = commits(hub)
    result = run_publish(artifact, proxy(("503", 99)).url, timeout=180)
    assert result.returncode == 1
    assert "failed after 5 attempts" in result.stderr and "503" in result.stderr
    assert commits(hub) == before


def test_connection_dropped_during_the_commit_leaves_the_repo_unchanged(hub, proxy, tmp_path):
    artifact = make_artifact(tmp_path / "artifact")
    hf_api(hub).create_repo(REPO)
    before = commits(hub)
    result = run_publish(artifact, proxy(("drop-commit",)).url, timeout=180)
    assert result.returncode == 1, result.stderr
    assert commits(hub) == before
    assert run_publish(artifact, hub.url).returncode == 0
    assert len(commits(hub)) == len(before) + 1


def test_lost_commit_response_is_recognised_not_repeated(hub, proxy, tmp_path):
    artifact = make_artifact(tmp_path / "artifact")
    result = run_publish(artifact, proxy(("drop-after-commit", 1)).url, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "published"
    assert len(commits(hub)) == 2


def test_killed_publish_leaves_the_repo_unchanged(hub, proxy, tmp_path):
    artifact = make_artifact(tmp_path / "artifact")
    hf_api(hub).create_repo(REPO)
    before = commits(hub)
    faulty = proxy(("hang-lfs",))
    env = {**os.environ, "HF_ENDPOINT": faulty.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": TOKEN}
    process = subprocess.Popen(
        [*BUILDER, "publish", str(artifact)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert faulty.lfs_started.wait(60), "the publish never reached the LFS upload"
    finally:
        process.kill()
        process.wait(30)
    assert commits(hub) == before
    assert list(hf_api(hub).list_repo_tree(REPO)) == []


def test_concurrent_push_is_detected_not_overwritten(hub, tmp_path):
    """A branch that moves between reading the head and committing fails the commit (parent_commit)."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    api = hf_api(hub)
    api.create_repo(REPO)
    head = api.repo_info(REPO).sha
    api.create_commit(REPO, [CommitOperationAdd("other.txt", b"someone else")], commit_message="concurrent")
    with pytest.raises(HfHubHTTPError) as error:
        api.create_commit(REPO, [CommitOperationAdd("mine.txt", b"mine")], commit_message="late", parent_commit=head)
    assert error.value.response.status_code == 412
    assert [f.path for f in api.list_repo_tree(REPO)] == ["other.txt"]


def test_a_stalled_commit_times_out_and_is_retried(hub, proxy, tmp_path):
    artifact = make_artifact(tmp_path / "artifact")
    result = run_publish(artifact, proxy(("hang-commit", 1)).url, "--json", env={"BUILDER_HTTP_TIMEOUT": "2"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["attempts"] == 2 and "timed out" in result.stderr.lower()
    assert len(commits(hub)) == 2
