"""The registry against hostile clients, through a real `builder hub serve` process (what users run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import Request, urlopen

import pytest

TOKEN = "hf_security_test_token"


@pytest.fixture
def served(tmp_path):
    """A `builder hub serve --port 0` process with a token; yields its URL and root."""
    root = tmp_path / "root"
    process = subprocess.Popen([sys.executable, "-m", "builder", "hub", "serve", "--port", "0", "--root", str(root),
                                "--token", TOKEN], stdout=subprocess.PIPE, text=True)
    try:
        url = process.stdout.readline().rsplit(" at ", 1)[1].split()[0]
        process.stdout.readline()
        yield url, root
    finally:
        process.terminate()
        process.wait(30)


def _request(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    try:
        with urlopen(Request(url, data=body, method=method, headers=headers or {}), timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except HTTPError as error:
        return error.code, dict(error.headers), error.read()


def _auth(content_type: str = "application/json") -> dict:
    return {"Authorization": f"Bearer {TOKEN}", "Content-Type": content_type}


def _create(url: str, repo: str) -> None:
    org, name = repo.split("/")
    status, _, _ = _request(f"{url}/api/repos/create", "POST",
                            json.dumps({"organization": org, "name": name}).encode(), _auth())
    assert status == 200


def _commit(url: str, repo: str, operations: list[dict]) -> tuple[int, dict]:
    lines = [{"key": "header", "value": {"summary": "x"}}, *operations]
    body = "\n".join(json.dumps(line) for line in lines).encode()
    status, _, answer = _request(f"{url}/api/models/{repo}/commit/main", "POST", body, _auth("application/x-ndjson"))
    return status, json.loads(answer)


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "uppercase", "number", "null"])
def test_an_lfs_oid_that_is_not_a_sha256_never_reads_a_file(served, tmp_path, kind):
    """The oid of an `lfsFile` commit operation is a client's word: one that names a path (absolute or through
    `..`) used to become a downloadable file of the registry's host."""
    url, root = served
    secret = tmp_path / "secret.txt"
    secret.write_text("the registry host's private file\n")
    planted = {"absolute": str(secret), "dotdot": "../" * (len(root.parts) + 2) + str(secret).lstrip("/"),
               "uppercase": "A" * 64, "number": 5, "null": None}[kind]
    _create(url, "evil/leak")
    status, answer = _commit(url, "evil/leak", [{"key": "lfsFile", "value": {"path": "leak.bin", "algo": "sha256",
                                                                               "oid": planted}}])
    assert status == 422 and "sha256" in answer["error"]
    status, _, body = _request(f"{url}/evil/leak/resolve/main/leak.bin")
    assert status == 404 and b"private file" not in body


def test_a_stored_commit_naming_a_path_is_not_served(served, tmp_path):
    """A commit file written before oids were checked (or by hand) still cannot point a download outside the
    store."""
    url, root = served
    secret = tmp_path / "secret.txt"
    secret.write_text("the registry host's private file\n")
    _create(url, "evil/old")
    commits = root / "repos" / "models" / "evil" / "old" / "commits"
    [initial] = commits.glob("*.json")
    commit = json.loads(initial.read_text())
    commit["files"] = {"leak.bin": {"sha256": str(secret), "size": 33, "lfs": True, "git_oid": "0" * 40}}
    initial.write_text(json.dumps(commit))
    status, _, body = _request(f"{url}/evil/old/resolve/main/leak.bin")
    assert 400 <= status < 500 and b"private file" not in body


def test_the_store_refuses_paths_outside_its_root(tmp_path):
    from builder.hub.store import Store, StoreError

    store = Store(tmp_path / "root")
    for oid in ("/etc/passwd", "../" * 8 + "etc/passwd", "0" * 63, "g" * 64):
        with pytest.raises(StoreError) as refused:
            store.object_path(oid)
        assert refused.value.code == 422
    assert store.object_path("ab" * 32) == tmp_path / "root" / "objects" / "ab" / ("ab" * 32)
    (tmp_path / "outside").mkdir()
    (tmp_path / "root" / "repos" / "models" / "org").mkdir(parents=True)
    (tmp_path / "root" / "repos" / "models" / "org" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(StoreError) as refused:
        store.repo_dir("model", "org/link")
    assert refused.value.code == 400
    assert not Path(tmp_path / "outside" / "repo.json").exists()
