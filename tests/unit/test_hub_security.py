"""The registry against hostile clients, through a real `builder hub serve` process (what users run)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import Request, urlopen

import pytest

TOKEN = "hf_security_test_token"


@pytest.fixture
def serve(tmp_path):
    """Start `builder hub serve --port 0 ARGS...` processes (stopped after the test); each call returns
    (url, root)."""
    processes = []

    def start(*args: str, env: dict | None = None) -> tuple[str, Path]:
        root = tmp_path / f"root{len(processes)}"
        process = subprocess.Popen(
            [sys.executable, "-m", "builder", "hub", "serve", "--port", "0", "--root", str(root), *args],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        processes.append(process)
        url = process.stdout.readline().rsplit(" at ", 1)[1].split()[0]
        process.stdout.readline()
        return url, root

    yield start
    for process in processes:
        process.terminate()
        process.wait(30)


@pytest.fixture
def served(serve):
    """A `builder hub serve --port 0` process with a token; yields its URL and root."""
    return serve("--token", TOKEN)


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
    status, _, _ = _request(
        f"{url}/api/repos/create", "POST", json.dumps({"organization": org, "name": name}).encode(), _auth()
    )
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
    planted = {
        "absolute": str(secret),
        "dotdot": "../" * (len(root.parts) + 2) + str(secret).lstrip("/"),
        "uppercase": "A" * 64,
        "number": 5,
        "null": None,
    }[kind]
    _create(url, "evil/leak")
    status, answer = _commit(
        url, "evil/leak", [{"key": "lfsFile", "value": {"path": "leak.bin", "algo": "sha256", "oid": planted}}]
    )
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


# --- malformed requests: a 4xx JSON answer, never a dropped connection ---------------------------------------------


def _raw(url: str, data: bytes, *, timeout: float = 30) -> tuple[int, dict, bytes]:
    """Send `data` as is on a new connection; the status, headers and body of the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        return _answer(sock)


def _answer(sock: socket.socket) -> tuple[int, dict, bytes]:
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, f"the registry closed the connection without an answer (got {received!r})"
        received += chunk
    head, body = received.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)) and (chunk := sock.recv(65536)):
        body += chunk
    return int(lines[0].split()[1]), headers, body


def _post(path: str, body: bytes, *, auth: bool = True, content_type: str = "application/json") -> bytes:
    headers = f"Authorization: Bearer {TOKEN}\r\n" if auth else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def _header_then(value: object) -> bytes:
    return b"\n".join(json.dumps(line).encode() for line in value)


MALFORMED = {
    "404 of a path that is not latin-1": lambda: (
        b"GET /evil/bad/resolve/main/%E2%82%AC.txt HTTP/1.1\r\nHost: x\r\n\r\n"
    ),
    "404 of a path with no repo": lambda: b"GET /resolve/main/%E2%82%AC.txt HTTP/1.1\r\nHost: x\r\n\r\n",
    "Content-Length: abc": lambda: (
        f"POST /api/repos/create HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}"
        "\r\nContent-Length: abc\r\n\r\n{}"
    ).encode(),
    "Content-Length: -5": lambda: b"POST /api/repos/create HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    "commit header line is a list": lambda: _post(
        "/api/models/evil/bad/commit/main", b'["header", {}]', content_type="application/x-ndjson"
    ),
    "commit header value is 5": lambda: _post(
        "/api/models/evil/bad/commit/main", _header_then([{"key": "header", "value": 5}]), content_type="x"
    ),
    "commit file value is a string": lambda: _post(
        "/api/models/evil/bad/commit/main",
        _header_then([{"key": "header", "value": {"summary": "x"}}, {"key": "file", "value": "a.txt"}]),
        content_type="x",
    ),
    "5000-deep JSON to validate-yaml": lambda: _post("/api/validate-yaml", b"[" * 5000 + b"]" * 5000),
    "[] to repos/create": lambda: _post("/api/repos/create", b"[]"),
    "a string as preupload files": lambda: _post("/api/models/evil/bad/preupload/main", b'{"files": "x"}'),
    "a bad chunk size": lambda: (
        f"POST /api/repos/create HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Transfer-Encoding: chunked\r\n\r\nzz\r\n"
    ).encode(),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_request_gets_a_4xx_json_answer(served, case):
    url, _ = served
    _create(url, "evil/bad")
    status, headers, body = _raw(url, MALFORMED[case]())
    assert 400 <= status < 500, (status, body)
    assert headers["content-type"] == "application/json" and json.loads(body)["error"]
    # the registry is still serving
    assert _request(f"{url}/api/models/evil/bad")[0] == 200


def test_a_card_whose_aliases_expand_is_not_expanded_into_the_answer(served):
    """A 209-byte README made repo info answer 2.6 MB (each further alias level: 9 times more)."""
    url, _ = served
    _create(url, "evil/card")
    card = (
        "---\na: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
        "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
        "f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n---\n"
    )
    assert len(card) < 300
    import base64

    status, _ = _commit(
        url,
        "evil/card",
        [
            {
                "key": "file",
                "value": {
                    "path": "README.md",
                    "content": base64.b64encode(card.encode()).decode(),
                    "encoding": "base64",
                },
            }
        ],
    )
    assert status == 200
    status, _, body = _request(f"{url}/api/models/evil/card")
    assert status == 200 and len(body) < 10_000 and "cardData" not in json.loads(body)
    status, _, body = _request(f"{url}/api/validate-yaml", "POST", json.dumps({"content": card}).encode(), _auth())
    assert status == 400 and "10,000 values" in json.loads(body)["errors"][0]["message"]


# --- credentials first, then limits ---------------------------------------------------------------------------


def test_an_unauthenticated_huge_body_is_refused_before_it_is_read(served):
    """The 401 comes while the client is still sending: the registry does not read 300 MB to refuse it."""
    url, _ = served
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /api/models/evil/x/commit/main HTTP/1.1\r\nHost: x\r\nContent-Length: 300000000\r\n\r\n")
        sent = []

        def send_some() -> None:  # a few MB; the registry may hang up before they are all taken
            try:
                for _ in range(4):
                    sock.sendall(b"\0" * (1 << 20))
                    sent.append(1 << 20)
            except OSError:
                pass

        sender = threading.Thread(target=send_some, daemon=True)
        started = time.monotonic()
        sender.start()
        status, headers, body = _answer(sock)
        assert status == 401 and time.monotonic() - started < 10
        assert headers.get("connection") == "close" and "credentials" in json.loads(body)["error"]
        sender.join(10)
    assert sum(sent) < 300_000_000


def test_validate_yaml_needs_the_token(served):
    url, _ = served
    body = json.dumps({"content": "---\nlicense: mit\n---\n"}).encode()
    assert _request(f"{url}/api/validate-yaml", "POST", body, {"Content-Type": "application/json"})[0] == 401
    assert _request(f"{url}/api/validate-yaml", "POST", body, _auth())[0] == 200


def test_a_body_over_the_limit_is_refused_with_413(serve):
    url, _ = serve("--token", TOKEN, "--max-body-bytes", "1000")
    status, _, body = _raw(url, _post("/api/repos/create", b" " * 2000))
    assert status == 413 and "1000 bytes" in json.loads(body)["error"]
    sig_free = (
        f"PUT /evil/x.git/info/lfs/objects/upload/{'a' * 64}/5000?sig=x HTTP/1.1\r\nHost: x\r\n"
        "Content-Length: 5000\r\n\r\n"
    ).encode()
    assert _raw(url, sig_free)[0] == 403  # the signature is checked before the size or the body


def test_a_client_that_stalls_mid_request_is_dropped_after_the_timeout(serve):
    url, _ = serve("--timeout", "1")
    host, port = url.removeprefix("http://").split(":")
    for partial in (
        b"GET /api/whoami-v2 HTTP/1.1\r\nHost: x\r\n",  # headers never end
        b"POST /api/repos/create HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{",
    ):  # nor the body
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(partial)
            started = time.monotonic()
            while sock.recv(65536):  # whatever it answers, the registry hangs up
                pass
            assert time.monotonic() - started < 10


def test_connections_over_the_cap_get_503_and_slots_free_up(serve):
    url, _ = serve("--max-connections", "2", "--timeout", "30")
    host, port = url.removeprefix("http://").split(":")
    holders = [socket.create_connection((host, int(port)), timeout=30) for _ in range(2)]
    for sock in holders:
        sock.sendall(b"GET /api/whoami-v2 HTTP/1.1\r\n")  # a request that never ends holds its slot
    time.sleep(0.5)
    status, _, body = _raw(url, b"GET /api/whoami-v2 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 503 and "maximum number of connections" in json.loads(body)["error"]
    for sock in holders:
        sock.close()
    deadline = time.monotonic() + 10
    while (status := _request(f"{url}/api/whoami-v2")[0]) == 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status == 401  # served again (no token configured for whoami: 401 is its answer)


# --- the token, out of the process list -------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["env", "file"])
def test_the_token_can_come_from_the_environment_or_a_file(serve, tmp_path, how):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    url, _ = serve(env={"BUILDER_HUB_TOKEN": TOKEN}) if how == "env" else serve("--token-file", str(token_file))
    body = json.dumps({"organization": "org", "name": how}).encode()
    assert _request(f"{url}/api/repos/create", "POST", body, {"Content-Type": "application/json"})[0] == 401
    assert _request(f"{url}/api/repos/create", "POST", body, _auth())[0] == 200


def test_serve_usage_errors_exit_2(capsys):
    from builder.cli import main

    for argv in (
        ["--port", "99999"],
        ["--port", "-1"],
        ["--max-connections", "0"],
        ["--token", "a", "--token-file", "f"],
    ):
        assert main(["hub", "serve", *argv]) == 2
        err = capsys.readouterr().err
        assert "usage:" in err and "Traceback" not in err
    assert main(["hub", "serve", "--help"]) == 0
    assert "process list" in " ".join(capsys.readouterr().out.split())
