"""The loopback registry (`builder hub serve`) with the real huggingface_hub and transformers clients."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import subprocess
import sys
from urllib.error import HTTPError
from urllib.request import Request, urlopen

import pytest

from builder.hub.server import start_in_thread

TOKEN = "hf_server_test_token"


@pytest.fixture
def hub(tmp_path):
    server = start_in_thread(tmp_path / "hub", token=TOKEN, page_size=2)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def api(hub, monkeypatch):
    """An HfApi on the registry. huggingface_hub read HF_HUB_DISABLE_XET when this process imported it, so the
    in-process client gets it switched here (subprocesses get the environment variable)."""
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    return HfApi(endpoint=hub.url, token=TOKEN)


def _request(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    try:
        with urlopen(Request(url, data=body, method=method, headers=headers or {}), timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except HTTPError as error:
        return error.code, dict(error.headers), error.read()


def _head(api, repo: str) -> str:
    return api.repo_info(repo).sha


def test_transformers_loads_a_model_from_the_registry(api, hub, tiny_llama, tmp_path):
    api.create_repo("demo/tiny-llama")
    api.upload_folder(repo_id="demo/tiny-llama", folder_path=tiny_llama)
    script = (
        "import torch, sys\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "tok = AutoTokenizer.from_pretrained('demo/tiny-llama')\n"
        "model = AutoModelForCausalLM.from_pretrained('demo/tiny-llama')\n"
        "local = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "ids = tok('The capital of France is', return_tensors='pt')\n"
        "with torch.no_grad():\n"
        "    assert torch.equal(model(**ids).logits, local(**ids).logits)\n"
        "print(tok.decode(model.generate(**ids, max_new_tokens=3, do_sample=False)[0]))\n"
    )
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_TOKEN": TOKEN,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_XET": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", script, str(tiny_llama)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("The capital of France is")


def test_tree_is_recursive_paginated_and_lists_folders(api):
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.hf_api import RepoFile, RepoFolder

    api.create_repo("demo/tree")
    names = ["a.txt", "b/c.txt", "b/d/e.txt", "f.onnx", "g.json"]
    api.create_commit("demo/tree", [CommitOperationAdd(n, n.encode() * 3) for n in names], commit_message="files")
    everything = list(api.list_repo_tree("demo/tree", recursive=True))  # 7 entries, 2 per page
    assert sorted(e.path for e in everything if isinstance(e, RepoFile)) == names
    assert sorted(e.path for e in everything if isinstance(e, RepoFolder)) == ["b", "b/d"]
    top = {e.path: type(e).__name__ for e in api.list_repo_tree("demo/tree")}
    assert top == {"a.txt": "RepoFile", "b": "RepoFolder", "f.onnx": "RepoFile", "g.json": "RepoFile"}
    assert [e.path for e in api.list_repo_tree("demo/tree", path_in_repo="b/d")] == ["b/d/e.txt"]
    onnx = next(e for e in everything if e.path == "f.onnx")
    assert onnx.lfs.sha256 == hashlib.sha256(b"f.onnx" * 3).hexdigest() and onnx.size == 18


def test_errors_carry_the_hub_error_codes(api, hub, tmp_path):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    url = api.create_repo("demo/errors")
    assert url == f"{hub.url}/demo/errors"
    assert api.create_repo("demo/errors", exist_ok=True) == url  # 409 still carries the url
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo("demo/errors")
    assert conflict.value.response.status_code == 409
    kwargs = {"endpoint": hub.url, "token": TOKEN, "cache_dir": tmp_path / "cache"}
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("demo/missing", "config.json", **kwargs)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("demo/errors", "config.json", revision="nope", **kwargs)
    with pytest.raises(RemoteEntryNotFoundError) as missing:
        hf_hub_download("demo/errors", "config.json", **kwargs)
    assert missing.value.response.headers["X-Repo-Commit"] == api.repo_info("demo/errors").sha


def test_tokens_and_private_repos(api, hub):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    with pytest.raises(HfHubHTTPError) as refused:
        HfApi(endpoint=hub.url, token="hf_wrong").create_repo("demo/nope")
    assert refused.value.response.status_code == 401
    api.create_repo("demo/secret", private=True)
    assert api.model_info("demo/secret").private is True
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=False).model_info("demo/secret")
    assert api.whoami()["name"] == "builder-hub"


def test_resolve_headers_and_range_requests(api, hub):
    from huggingface_hub import CommitOperationAdd

    api.create_repo("demo/resolve")
    weights = bytes(range(256)) * 100
    commit = api.create_commit(
        "demo/resolve",
        [CommitOperationAdd("w.safetensors", weights), CommitOperationAdd("c.json", b"{}")],
        commit_message="x",
    )
    status, headers, body = _request(f"{hub.url}/demo/resolve/resolve/main/w.safetensors", "HEAD")
    assert status == 200 and headers["X-Repo-Commit"] == commit.oid
    assert headers["X-Linked-Etag"].strip('"') == hashlib.sha256(weights).hexdigest()
    assert headers["X-Linked-Size"] == str(len(weights))
    status, headers, body = _request(
        f"{hub.url}/demo/resolve/resolve/{commit.oid}/w.safetensors", headers={"Range": "bytes=10-19"}
    )
    assert status == 206 and body == weights[10:20] and headers["Content-Range"] == f"bytes 10-19/{len(weights)}"
    status, headers, _ = _request(f"{hub.url}/demo/resolve/resolve/main/c.json", "HEAD")
    assert headers["ETag"].strip('"') == hashlib.sha1(b"blob 2\0{}").hexdigest() and "X-Linked-Etag" not in headers


def test_failed_commits_leave_the_branch_unchanged(api, hub):
    api.create_repo("demo/atomic")
    head = _head(api, "demo/atomic")
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-ndjson"}
    url = f"{hub.url}/api/models/demo/atomic/commit/main"

    def ndjson(*lines: dict) -> bytes:
        return b"".join(json.dumps(line).encode() + b"\n" for line in lines)

    header = {"key": "header", "value": {"summary": "x", "parentCommit": head}}
    content = {
        "key": "file",
        "value": {"path": "ok.txt", "content": base64.b64encode(b"ok").decode(), "encoding": "base64"},
    }
    missing_lfs = {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": "0" * 64, "size": 5}}
    status, _, body = _request(url, "POST", ndjson(header, content, missing_lfs), auth)
    assert status == 422 and b"was not uploaded" in body
    status, headers, _ = _request(url, "POST", ndjson(header, {"key": "deletedFile", "value": {"path": "nope"}}), auth)
    assert status == 404 and headers["X-Error-Code"] == "EntryNotFound"
    # a body cut off mid-way (the client died): the server gives up on it and applies nothing
    connection = http.client.HTTPConnection("127.0.0.1", hub.server_address[1], timeout=30)
    payload = ndjson(header, content)
    connection.putrequest("POST", "/api/models/demo/atomic/commit/main")
    for key, value in {**auth, "Content-Length": str(len(payload) + 100)}.items():
        connection.putheader(key, value)
    connection.endheaders()
    connection.send(payload)
    connection.sock.shutdown(1)
    connection.close()
    assert _head(api, "demo/atomic") == head
    assert [e.path for e in api.list_repo_tree("demo/atomic")] == []


def test_lfs_upload_urls_are_signed_and_bytes_checked(api, hub):
    api.create_repo("demo/lfs")
    data = b"\0weights" * 1000
    oid = hashlib.sha256(data).hexdigest()
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/vnd.git-lfs+json"}
    status, _, body = _request(
        f"{hub.url}/demo/lfs.git/info/lfs/objects/batch",
        "POST",
        json.dumps(
            {"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": len(data)}]}
        ).encode(),
        auth,
    )
    href = json.loads(body)["objects"][0]["actions"]["upload"]["href"]
    assert _request(href.split("?")[0] + "?sig=forged", "PUT", data)[0] == 403
    assert _request(href, "PUT", data[:-1] + b"x")[0] == 400
    assert not hub.store.has_object(oid)
    assert _request(href, "PUT", data)[0] == 200 and hub.store.has_object(oid, len(data))
    assert not any(hub.store.root.joinpath("uploads").iterdir())


def test_xet_endpoints_tell_the_client_to_disable_xet(hub):
    status, headers, _ = _request(f"{hub.url}/api/models/demo/x/xet-write-token/main")
    assert status == 501 and "HF_HUB_DISABLE_XET=1" in headers["X-Error-Message"]


def test_registry_persists_across_restarts(api, hub, tmp_path):
    from huggingface_hub import CommitOperationAdd, HfApi

    api.create_repo("demo/keep")
    api.create_branch("demo/keep", branch="dev")
    commit = api.create_commit("demo/keep", [CommitOperationAdd("a.txt", b"a")], commit_message="a", revision="dev")
    again = start_in_thread(hub.store.root, token=TOKEN)
    try:
        other = HfApi(endpoint=again.url, token=TOKEN)
        assert other.repo_info("demo/keep", revision="dev").sha == commit.oid
        assert [c.title for c in other.list_repo_commits("demo/keep", revision="dev")] == ["a", "initial commit"]
    finally:
        again.shutdown()
        again.server_close()


def test_invalid_card_metadata_is_rejected_before_upload(api):
    from huggingface_hub import CommitOperationAdd

    api.create_repo("demo/card")
    with pytest.raises(ValueError, match="Invalid metadata"):
        api.create_commit(
            "demo/card", [CommitOperationAdd("README.md", b"---\n- a list\n---\n")], commit_message="bad card"
        )


def test_hub_serve_command(tmp_path):
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "builder",
            "hub",
            "serve",
            "--port",
            "0",
            "--root",
            str(tmp_path / "root"),
            "--token",
            TOKEN,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        first, second = process.stdout.readline(), process.stdout.readline()
        url = first.rsplit(" at ", 1)[1].split()[0]
        assert url.startswith("http://127.0.0.1:") and f"HF_ENDPOINT={url} HF_HUB_DISABLE_XET=1" in second
        status, _, body = _request(f"{url}/api/whoami-v2", headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and json.loads(body)["name"] == "builder-hub"
        assert _request(f"{url}/api/whoami-v2")[0] == 401
        port = url.rsplit(":", 1)[1]
        busy = subprocess.run(
            [sys.executable, "-m", "builder", "hub", "serve", "--port", port, "--root", str(tmp_path / "other")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert busy.returncode == 1 and f"cannot serve on 127.0.0.1:{port}" in busy.stderr
    finally:
        process.terminate()
        process.wait(30)
    assert (tmp_path / "root" / "objects").is_dir()


def test_a_connection_stays_usable_after_an_error_and_closes_only_when_it_says_so(api, hub):
    """huggingface_hub 2.x asks for routes this registry lacks (e.g. /api/agent-harnesses) on a pooled connection;
    the 404 must leave that connection usable, and a response that ends it must say `Connection: close`, or the
    client's next request on it races the close ("Server disconnected without sending a response")."""
    api.create_repo("org/keep-alive")
    connection = http.client.HTTPConnection(hub.url.removeprefix("http://"), timeout=30)
    connection.request("GET", "/api/agent-harnesses")
    missing = connection.getresponse()
    missing.read()
    assert missing.status == 404 and missing.getheader("Connection") is None
    connection.request("GET", "/api/models/org/keep-alive")  # the same socket
    found = connection.getresponse()
    assert found.status == 200 and json.loads(found.read())["id"] == "org/keep-alive"
    connection.request("POST", "/api/nowhere", body=b"{}", headers={"Content-Type": "application/json"})
    refused = connection.getresponse()
    refused.read()
    assert refused.status == 404 and refused.getheader("Connection") == "close"
    connection.close()


def test_a_card_with_a_license_the_hub_does_not_know_is_refused_like_the_hub_does(api):
    api.create_repo("demo/licensed")
    bad = b"---\nlicense: Apache 2.0\n---\n# card\n"
    # huggingface_hub asks the validate-yaml endpoint first and raises what it answers ...
    with pytest.raises(
        ValueError,
        match=r"Invalid metadata in README.md.\n- \"license\": 'Apache 2.0' is not a Hub "
        r"license identifier \(did you mean 'apache-2.0'\?\)",
    ):
        api.upload_file(repo_id="demo/licensed", path_in_repo="README.md", path_or_fileobj=bad)
    # ... and a client that commits directly is refused by the commit endpoint.
    payload = "\n".join(
        json.dumps(line)
        for line in (
            {"key": "header", "value": {"summary": "card"}},
            {
                "key": "file",
                "value": {"path": "README.md", "encoding": "base64", "content": base64.b64encode(bad).decode()},
            },
        )
    )
    status, _, body = _request(
        f"{api.endpoint}/api/models/demo/licensed/commit/main",
        "POST",
        payload.encode(),
        {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-ndjson"},
    )
    assert status == 400 and b"apache-2.0" in body
    assert "README.md" not in api.list_repo_files("demo/licensed")
    api.upload_file(
        repo_id="demo/licensed", path_in_repo="README.md", path_or_fileobj=b"---\nlicense: apache-2.0\n---\n# card\n"
    )
    assert api.model_info("demo/licensed").card_data["license"] == "apache-2.0"


def test_a_card_with_dashes_in_a_quoted_value_is_read_as_huggingface_hub_reads_it(api):
    from huggingface_hub import ModelCard

    card = '---\nlicense: mit\nmodel_name: "tiny --- nf4"\ntags:\n- builder\n---\n# card --- text\n'
    assert ModelCard(card).data.model_name == "tiny --- nf4"  # the client's own reading
    api.create_repo("demo/dashes")
    # validate-yaml, then the commit: the block ends at the `---` line, not at the first `---` in the text
    api.upload_file(repo_id="demo/dashes", path_in_repo="README.md", path_or_fileobj=card.encode())
    info = api.model_info("demo/dashes")
    assert info.card_data["model_name"] == "tiny --- nf4" and info.card_data["license"] == "mit"
    assert info.tags == ["builder"]
    bad = card.replace("license: mit", "license: MIT License").encode()
    with pytest.raises(ValueError, match=r"'MIT License' is not a Hub license identifier \(did you mean 'mit'\?\)"):
        api.upload_file(repo_id="demo/dashes", path_in_repo="README.md", path_or_fileobj=bad)


def test_a_signal_that_interrupts_a_thread_start_stops_the_server_and_frees_the_slot_once(tmp_path, monkeypatch):
    # `builder hub serve` stops on SIGTERM by raising from its signal handler; when that lands inside the
    # connection thread's start(), the thread is running and releases its slot: releasing it here too raised
    # "Semaphore released too many times", which replaced the interrupt and left the server running.
    import socket
    import threading

    from builder.hub.server import HubServer
    from builder.interrupts import Interrupted

    server = HubServer(("127.0.0.1", 0), tmp_path / "hub", quiet=True, max_connections=1)
    started = threading.Thread.start

    def start_then_signal(thread):
        started(thread)
        raise Interrupted(15)

    threads, failures = [], []
    monkeypatch.setattr(threading.Thread, "start", lambda thread: (threads.append(thread), start_then_signal(thread)))
    monkeypatch.setattr(threading, "excepthook", failures.append)
    ours, theirs = socket.socketpair()
    with pytest.raises(Interrupted):
        server.process_request(ours, ("127.0.0.1", 0))
    theirs.close()  # the connection thread reads end-of-stream, ends and gives its slot back
    threads[0].join(10)
    assert not threads[0].is_alive() and not failures  # no "Semaphore released too many times" in the thread
    assert server.slots.acquire(blocking=False)  # the one slot is free again
    server.server_close()
