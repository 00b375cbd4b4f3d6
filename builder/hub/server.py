"""`builder hub serve`: a Hub-compatible registry on the standard library's ThreadingHTTPServer.

It speaks the subset of the Hugging Face Hub HTTP API that huggingface_hub (1.x and 2.x) and transformers use to
create repos, upload (preupload + the git-LFS batch API + the NDJSON commit endpoint), list and download:

    POST /api/repos/create                                 (409 for an existing repo, still with `url`)
    POST /api/validate-yaml
    GET  /api/whoami-v2
    GET  /api/{type}s/{id}[/revision/{rev}]                repo info (siblings; `?blobs=1` adds sizes and LFS)
    GET  /api/{type}s/{id}/tree/{rev}[/{path}]             `?recursive=1`, paginated with a `Link` header
    GET  /api/{type}s/{id}/refs, /api/{type}s/{id}/commits/{rev}
    POST /api/{type}s/{id}/branch/{branch}                 create_branch
    POST /api/{type}s/{id}/preupload/{rev}                 regular or LFS, and the current oid of each path
    POST /{id}.git/info/lfs/objects/batch                  + PUT .../upload/{oid}/{size} (signed URL) + verify
    POST /api/{type}s/{id}/commit/{rev}                    NDJSON header/file/lfsFile/deletedFile/deletedFolder;
                                                           `parentCommit` checked; `?create_pr=1` -> refs/pr/N
    HEAD/GET /{id}/resolve/{rev}/{path}                    X-Repo-Commit, ETag, X-Linked-Etag/-Size, Range

Every malformed request is answered with a 4xx JSON error (a bug in a handler with a 500), never a dropped
connection. Limits: request bodies (`max_body_bytes` for LFS uploads; JSON bodies at most `MAX_JSON_BYTES` of it),
a socket `timeout` for each read and write (a client that stalls mid-request is dropped), `max_connections` at once
(more get a 503). Credentials are checked before a body is read.

Errors carry the Hub's `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound) so the client raises the
same exceptions as against the Hub. There is no Xet storage: clients must set HF_HUB_DISABLE_XET=1 (huggingface_hub
2.x uploads through Xet whenever `hf_xet` is importable). With `token` set, writes and private repos need
`Authorization: Bearer <token>`; without it every request is accepted (bind it to 127.0.0.1).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from builder.card import front_matter
from builder.errors import BuilderError
from builder.hub import views
from builder.hub.store import REPO_TYPES, Store, StoreError, check_path, is_lfs
from builder.recipe.licenses import card_license_problems

XET_MESSAGE = (
    "this registry has no Xet storage: set HF_HUB_DISABLE_XET=1 in the client's environment so "
    "huggingface_hub uploads through the git-LFS API"
)
_TYPES = "|".join(f"{t}s" for t in REPO_TYPES)
_API = re.compile(
    rf"^/api/({_TYPES})/([^/]+/[^/]+?)(?:/(revision|tree|preupload|commit|commits|refs|branch|"
    r"xet-write-token|xet-read-token)(?:/([^/]+)(/.*)?)?)?$"
)
_RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_LFS = re.compile(
    r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+?)\.git/info/lfs/objects/"
    r"(batch|verify|upload/([0-9a-f]{64})/(\d+))$"
)
_CHUNK = 1 << 20
MAX_BODY_BYTES = 5 * 1024**3  # above transformers' default 5 GB shard size, so any default shard uploads
MAX_JSON_BYTES = 100 * 1024**2  # a commit inlines its regular files (each < 10 MiB) in base64
MAX_CONNECTIONS = 64
TIMEOUT_S = 60.0
_DRAIN_BYTES, _DRAIN_S = 1 << 20, 2.0  # what is read of an unwanted body so the client sees the answer, not a reset


def card_problems(card: str, *, refuse_unreadable: bool = True) -> list[str]:
    """What the Hub would refuse in a model card's YAML metadata: YAML that does not parse, a block that is not a
    mapping, a `license` that is not one of the Hub's identifiers. With `refuse_unreadable` False only the last: a
    commit stores an unreadable card (repo info then leaves its metadata out), as clients ask validate-yaml first."""
    if (block := front_matter(card)) is None:
        return []
    try:
        front = views.card_yaml(block) or {}
    except ValueError as error:
        return [f"invalid YAML metadata: {error}"] if refuse_unreadable else []
    if not isinstance(front, dict):
        return ["the metadata block is not a mapping"] if refuse_unreadable else []
    licenses = front.get("license")
    return [] if licenses is None else [f'"license": {problem}' for problem in card_license_problems(licenses)]


class HubServer(ThreadingHTTPServer):
    """The registry: `HubServer((host, port), root, token=None).serve_forever()`; `url` is its endpoint."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        root: Path,
        *,
        token: str | None = None,
        page_size: int = 1000,
        quiet: bool = False,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_connections: int = MAX_CONNECTIONS,
        timeout: float = TIMEOUT_S,
    ):
        self.store = Store(root)
        self.token = token
        self.page_size = page_size
        self.quiet = quiet
        self.max_body_bytes = max_body_bytes
        self.timeout_s = timeout
        self.slots = threading.BoundedSemaphore(max_connections)
        self.upload_secret = secrets.token_bytes(32)
        super().__init__(address, Handler)

    def process_request(self, request, client_address) -> None:
        # Each connection holds a thread until it closes or times out: past the cap, answer 503 at once.
        if not self.slots.acquire(blocking=False):
            request.settimeout(1.0)
            try:
                body = json.dumps({"error": "the registry is serving its maximum number of connections; retry"})
                request.sendall(
                    (
                        f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
                        f"{body}"
                    ).encode()
                )
            except OSError:
                pass
            self.shutdown_request(request)
            return
        # The thread releases the slot when it ends; only a thread that could not be started gives it back here
        # (a signal that interrupts `start()` after the thread began must not release it twice).
        thread = threading.Thread(target=self.process_request_thread, args=(request, client_address), daemon=True)
        try:
            thread.start()
        except RuntimeError:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def shutdown_request(self, request) -> None:
        # Closing a socket with unread bytes sends a reset, which can reach the client before the answer it was
        # sent: say end-of-answer, then read (a bounded amount of) what the client still sends.
        try:
            request.shutdown(socket.SHUT_WR)
            request.settimeout(0.5)
            deadline, drained = time.monotonic() + _DRAIN_S, 0
            while drained < _DRAIN_BYTES and time.monotonic() < deadline and (chunk := request.recv(65536)):
                drained += len(chunk)
        except OSError:
            pass
        self.close_request(request)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host.decode() if isinstance(host, bytes) else host}:{port}"

    def sign(self, repo: str, oid: str, size: int) -> str:
        return hmac.new(self.upload_secret, f"{repo}\0{oid}\0{size}".encode(), hashlib.sha256).hexdigest()


def start_in_thread(
    root: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    page_size: int = 1000,
    quiet: bool = True,
    **limits,
) -> HubServer:
    """Start a registry on a background thread (port 0 = a free port); stop it with `server.shutdown()`.
    `limits`: max_body_bytes, max_connections, timeout (see `HubServer`)."""
    server = HubServer((host, port), root, token=token, page_size=page_size, quiet=quiet, **limits)
    threading.Thread(target=server.serve_forever, name="builder-hub", daemon=True).start()
    return server


class Handler(BaseHTTPRequestHandler):
    """One request: route by method and path, answer JSON (or file bytes), map `StoreError`s to Hub errors."""

    server: HubServer
    protocol_version = "HTTP/1.1"
    server_version = "builder-hub/1"

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.timeout_s)  # every read and write of this connection

    # --- dispatch ---------------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        self.body_read, self.answered = False, False
        try:
            split = urlsplit(self.path)
            self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
            self.body_size = self._content_length()
            self.body_read = self.body_size == 0
            self._route(method, split.path)
        except StoreError as error:
            self._fail(error.code, str(error), error.error_code, error.headers)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:
            self._fail(400, f"bad request: {type(error).__name__}: {error}"[:500])
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except OSError as error:  # the store's disk: full, read-only, ...
            self._fail(507 if error.errno == 28 else 500, f"storage error: {error}")
        except Exception as error:  # a bug: answer it, keep serving, leave the traceback in the log
            sys.stderr.write(traceback.format_exc())
            self._fail(500, f"internal error: {type(error).__name__}; the registry's log has the traceback")
        if not self.body_read:  # an unread body would be parsed as the next request on this connection
            self.close_connection = True

    def _content_length(self) -> int | None:
        """The body's declared size; None for a chunked body. A malformed size is a 400 (the body's end is then
        unknown, so the connection closes after the answer)."""
        if "Transfer-Encoding" in self.headers:
            if self.headers["Transfer-Encoding"].strip().lower() != "chunked":
                raise StoreError(501, f"Transfer-Encoding {self.headers['Transfer-Encoding']!r} is not supported")
            return None
        raw = (self.headers.get("Content-Length") or "0").strip()
        if not raw.isdigit() or not raw.isascii():
            raise StoreError(400, f"Content-Length {raw[:40]!r} is not a number of bytes")
        return int(raw)

    def _fail(self, status: int, message: str, error_code: str | None = None, extra: dict | None = None) -> None:
        if self.answered:  # the status line is out (a download broke off): all that is left is to hang up
            self.close_connection = True
            return
        self._error(status, message, error_code, extra)

    def _route(self, method: str, path: str) -> None:
        if (match := _API.match(path)) is not None:
            kind, repo, action, rev, rest = match.groups()
            repo_type, revision = kind[:-1], unquote(rev) if rev else None
            return self._api(method, repo_type, unquote(repo), action, revision, unquote(rest or "").lstrip("/"))
        if (match := _RESOLVE.match(path)) is not None and method in ("GET", "HEAD"):
            kind, repo, rev, file = match.groups()
            return self._resolve(method, (kind or "models")[:-1], unquote(repo), unquote(rev), unquote(file))
        if (match := _LFS.match(path)) is not None:
            kind, repo, action, oid, size = match.groups()
            repo_type = (kind or "models")[:-1]
            if action == "batch" and method == "POST":
                return self._lfs_batch(repo_type, unquote(repo))
            if action == "verify" and method == "POST":
                return self._lfs_verify(repo_type, unquote(repo))
            if oid and method == "PUT":
                return self._lfs_upload(unquote(repo), oid, int(size))
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo()
        if path == "/api/validate-yaml" and method == "POST":
            return self._validate_yaml()
        if path == "/api/whoami-v2" and method == "GET":
            return self._whoami()
        raise StoreError(404, f"no route for {method} {path}")

    def _api(self, method: str, repo_type: str, repo: str, action: str | None, revision: str | None, rest: str) -> None:
        match (method, action):
            case ("GET", None):
                return self._info(repo_type, repo, "main")
            case ("GET", "revision"):
                return self._info(repo_type, repo, revision or "main")
            case ("GET", "tree"):
                return self._tree(repo_type, repo, revision or "main", rest)
            case ("GET", "refs"):
                return self._refs(repo_type, repo)
            case ("GET", "commits"):
                return self._commits(repo_type, repo, revision or "main")
            case ("POST", "branch") if revision:
                return self._create_branch(repo_type, repo, revision)
            case ("POST", "preupload"):
                return self._preupload(repo_type, repo, revision or "main")
            case ("POST", "commit"):
                return self._commit(repo_type, repo, revision or "main")
            case (_, "xet-write-token" | "xet-read-token"):
                raise StoreError(501, XET_MESSAGE)
        raise StoreError(404, f"no route for {method} {self.path}")

    # --- auth -------------------------------------------------------------------------------------------------

    def _bearer(self) -> str | None:
        header = self.headers.get("Authorization", "")
        return header[7:].strip() if header.lower().startswith("bearer ") else None

    def _authorized(self) -> bool:
        given = self._bearer()
        if self.server.token is None:
            return True
        return given is not None and hmac.compare_digest(given.encode(), self.server.token.encode())

    def _require_write(self) -> None:
        if not self._authorized():
            raise StoreError(
                401,
                "Invalid credentials in Authorization header: pass the registry's token (HF_TOKEN or `hf auth login`)",
            )

    def _require_read(self, repo_type: str, repo: str) -> dict:
        meta = self.server.store.repo_meta(repo_type, repo)
        anonymous = self.server.token is None and self._bearer() is None
        if meta.get("private") and (anonymous or not self._authorized()):
            raise StoreError(401, f"Repository {repo} not found (or private: pass a token)", "RepoNotFound")
        return meta

    # --- repos ------------------------------------------------------------------------------------------------

    def _create_repo(self) -> None:
        self._require_write()
        payload = self._json_body()
        repo_type = payload.get("type") or "model"
        name, organization = payload.get("name"), payload.get("organization")
        if not organization:
            raise StoreError(400, "repos of this registry need a namespace: create org/name")
        repo = f"{organization}/{name}"
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        created = self.server.store.create_repo(repo_type, repo, private)
        url = self._repo_url(repo_type, repo)
        if not created:
            return self._json(409, {"error": "You already created this repo", "url": url})
        self._json(200, {"url": url, "name": repo, "id": repo})

    def _validate_yaml(self) -> None:
        self._require_write()
        content = self._json_body().get("content", "")
        if not isinstance(content, str):
            raise StoreError(400, "`content` is the card's text (a string)")
        errors = [{"message": problem} for problem in card_problems(content)]
        self._json(400 if errors else 200, {"errors": errors, "warnings": []})

    def _whoami(self) -> None:
        self._no_body()
        if self._bearer() is None or not self._authorized():
            raise StoreError(401, "Invalid credentials in Authorization header")
        self._json(
            200,
            {
                "type": "user",
                "name": "builder-hub",
                "fullname": "builder local registry",
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}},
            },
        )

    def _info(self, repo_type: str, repo: str, revision: str) -> None:
        self._no_body()
        meta = self._require_read(repo_type, repo)
        store = self.server.store
        oid = store.resolve(repo_type, repo, revision)
        files = store.files(repo_type, repo, oid)
        readme = files.get("README.md")
        text = store.object_path(readme.sha256).read_text(encoding="utf-8", errors="replace") if readme else None
        self._json(
            200,
            views.repo_info(
                repo,
                oid,
                meta,
                store.commit(repo_type, repo, oid),
                files,
                readme=text,
                blobs=self.query.get("blobs", "").lower() in ("1", "true"),
            ),
        )

    def _tree(self, repo_type: str, repo: str, revision: str, folder: str) -> None:
        self._no_body()
        self._require_read(repo_type, repo)
        store = self.server.store
        files = store.files(repo_type, repo, store.resolve(repo_type, repo, revision))
        listing = views.tree(files, folder, recursive=self.query.get("recursive", "").lower() in ("1", "true"))
        if folder and not listing:
            raise StoreError(404, f"{folder} does not exist at {revision} in {repo}", "EntryNotFound")
        start, size = int(self.query.get("cursor", "0") or 0), self.server.page_size
        headers = {}
        if start + size < len(listing):
            query = "&".join(f"{k}={quote(v, safe='')}" for k, v in {**self.query, "cursor": str(start + size)}.items())
            headers["Link"] = f'<{self._base_url()}{urlsplit(self.path).path}?{query}>; rel="next"'
        self._json(200, listing[start : start + size], headers)

    def _refs(self, repo_type: str, repo: str) -> None:
        self._no_body()
        self._require_read(repo_type, repo)
        self._json(200, views.refs(self.server.store.refs(repo_type, repo)))

    def _commits(self, repo_type: str, repo: str, revision: str) -> None:
        self._no_body()
        self._require_read(repo_type, repo)
        store = self.server.store
        self._json(200, views.commits(store.history(repo_type, repo, store.resolve(repo_type, repo, revision))))

    def _create_branch(self, repo_type: str, repo: str, branch: str) -> None:
        self._require_write()
        payload = self._json_body()
        self.server.store.create_branch(repo_type, repo, branch, payload.get("startingPoint"))
        self._json(200, {})

    # --- uploads ----------------------------------------------------------------------------------------------

    def _preupload(self, repo_type: str, repo: str, revision: str) -> None:
        import base64

        self._require_write()
        payload = self._json_body()
        store = self.server.store
        store.repo_meta(repo_type, repo)
        try:
            current = store.files(repo_type, repo, store.resolve(repo_type, repo, revision))
        except StoreError:
            current = {}  # a branch that create_commit is about to create: nothing to compare with
        answers = []
        for item in payload["files"]:
            path = check_path(item["path"])
            lfs = is_lfs(path, int(item["size"]), base64.b64decode(item.get("sample", "")))
            existing = current.get(path)
            oid = None
            if existing is not None and existing.lfs == lfs:
                oid = existing.sha256 if lfs else existing.git_oid
            answers.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self._json(200, {"files": answers, "commitOid": None})

    def _lfs_batch(self, repo_type: str, repo: str) -> None:
        self._require_write()
        payload = self._json_body()
        self.server.store.repo_meta(repo_type, repo)
        if payload.get("operation") != "upload":
            raise StoreError(400, "only the upload operation is supported; download files through /resolve/")
        objects = []
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        for item in payload.get("objects", []):
            oid, size = str(item["oid"]), int(item["size"])
            if not re.fullmatch(r"[0-9a-f]{64}", oid):
                objects.append({"oid": oid, "size": size, "error": {"code": 422, "message": "oid is not a sha256"}})
                continue
            answer = {"oid": oid, "size": size, "authenticated": True}
            if not self.server.store.has_object(oid, size):
                base = f"{self._base_url()}/{prefix}{repo}.git/info/lfs/objects"
                sig = self.server.sign(repo, oid, size)
                answer["actions"] = {
                    "upload": {"href": f"{base}/upload/{oid}/{size}?sig={sig}"},
                    "verify": {"href": f"{base}/verify"},
                }
            objects.append(answer)
        self._json(
            200,
            {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
            content_type="application/vnd.git-lfs+json",
        )

    def _lfs_upload(self, repo: str, oid: str, size: int) -> None:
        if not hmac.compare_digest(self.query.get("sig", ""), self.server.sign(repo, oid, size)):
            raise StoreError(403, "upload URL signature is invalid or expired; ask the batch API again")
        if size > self.server.max_body_bytes:
            raise StoreError(
                413,
                f"an object of {size} bytes is over this registry's limit of "
                f"{self.server.max_body_bytes} bytes (hub serve --max-body-bytes)",
            )
        self.server.store.put_object(self._body_chunks(self.server.max_body_bytes), oid, size)
        self._json(200, {})

    def _lfs_verify(self, repo_type: str, repo: str) -> None:
        self._require_write()
        payload = self._json_body()
        if not self.server.store.has_object(str(payload["oid"]), int(payload["size"])):
            raise StoreError(404, f"object {payload['oid']} was not uploaded")
        self._json(200, {})

    def _commit(self, repo_type: str, repo: str, revision: str) -> None:
        self._require_write()
        lines = [json.loads(line) for line in self._read_body().splitlines() if line.strip()]
        if not all(isinstance(line, dict) and isinstance(line.get("value"), dict) for line in lines):
            raise StoreError(400, 'each line of the commit payload is an object {"key": ..., "value": {...}}')
        if not lines or lines[0].get("key") != "header":
            raise StoreError(400, "the commit payload must start with a header line")
        for line in lines[1:]:  # the Hub refuses a commit whose README.md has invalid metadata
            value = line["value"]
            if line.get("key") == "file" and str(value.get("path", "")).strip("/") == "README.md":
                try:
                    card = base64.b64decode(value.get("content", "")).decode("utf-8")
                except (ValueError, UnicodeDecodeError):
                    raise StoreError(400, "README.md is not UTF-8 text") from None
                if problems := card_problems(card, refuse_unreadable=False):
                    raise StoreError(400, "Invalid metadata in README.md.\n" + "\n".join(f"- {p}" for p in problems))
        create_pr = self.query.get("create_pr", "") in ("1", "true")
        oid, number = self.server.store.apply_commit(repo_type, repo, revision, lines[0]["value"], lines[1:], create_pr)
        url = self._repo_url(repo_type, repo)
        answer = {
            "success": True,
            "commitOid": oid,
            "commitUrl": f"{url}/commit/{oid}",
            "commitMessage": lines[0]["value"].get("summary", ""),
        }
        if number is not None:
            answer["pullRequestUrl"] = f"{url}/discussions/{number}"
        self._json(200, answer)

    # --- downloads --------------------------------------------------------------------------------------------

    def _resolve(self, method: str, repo_type: str, repo: str, revision: str, path: str) -> None:
        self._no_body()
        store = self.server.store
        self._require_read(repo_type, repo)
        oid = store.resolve(repo_type, repo, revision)
        entry = store.files(repo_type, repo, oid).get(path)
        if entry is None:
            # X-Repo-Commit lets the client remember the absence for this commit instead of asking again
            raise StoreError(
                404, f"{path} does not exist at {revision} in {repo}", "EntryNotFound", {"X-Repo-Commit": oid}
            )
        blob = store.object_path(entry.sha256)  # checked before the status line goes out
        headers = {
            "X-Repo-Commit": oid,
            "ETag": f'"{entry.sha256 if entry.lfs else entry.git_oid}"',
            "Accept-Ranges": "bytes",
        }
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        start, end, status = 0, entry.size - 1, 200
        if (match := re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())) and entry.size:
            first, last = match.groups()
            start = int(first) if first else max(entry.size - int(last or 0), 0)
            end = min(int(last), entry.size - 1) if first and last else entry.size - 1
            if start > end:
                raise StoreError(416, "requested range not satisfiable")
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1 if entry.size else 0))
        self.end_headers()
        if method == "GET" and entry.size:
            with open(blob, "rb") as handle:
                handle.seek(start)
                remaining = end - start + 1
                while remaining and (chunk := handle.read(min(remaining, _CHUNK))):
                    self.wfile.write(chunk)
                    remaining -= len(chunk)

    # --- plumbing ---------------------------------------------------------------------------------------------

    def _base_url(self) -> str:
        return f"http://{self.headers.get('Host') or '{}:{}'.format(*self.server.server_address[:2])}"

    def _repo_url(self, repo_type: str, repo: str) -> str:
        return f"{self._base_url()}/{'' if repo_type == 'model' else repo_type + 's/'}{repo}"

    def _body_chunks(self, limit: int) -> Iterator[bytes]:
        """The request body as it arrives (Content-Length or chunked), at most `limit` bytes (else a 413 before
        reading on); marks it read once fully consumed."""
        too_big = StoreError(
            413,
            f"the request body is over this registry's limit of {limit} bytes for this "
            "endpoint (hub serve --max-body-bytes)",
        )
        if self.body_size is None:
            total = 0
            while True:
                line = self.rfile.readline(1024).split(b";")[0].strip()
                if not re.fullmatch(rb"[0-9a-fA-F]{1,16}", line):
                    raise StoreError(400, f"malformed chunk size {line[:40]!r} in a chunked body")
                size = int(line, 16)
                if size == 0:
                    while self.rfile.readline(65537).strip():  # trailers
                        pass
                    break
                total += size
                if total > limit:
                    raise too_big
                yield from self._exactly(size)
                self.rfile.readline(1024)
        else:
            if self.body_size > limit:
                raise too_big
            yield from self._exactly(self.body_size)
        self.body_read = True

    def _exactly(self, remaining: int) -> Iterator[bytes]:
        """The next `remaining` bytes of the request, in chunks; a connection that closes early is an error."""
        while remaining:
            chunk = self.rfile.read(min(remaining, _CHUNK))
            if not chunk:
                raise ConnectionError("client went away mid-body")
            remaining -= len(chunk)
            yield chunk

    def _read_body(self) -> bytes:
        return b"".join(self._body_chunks(min(self.server.max_body_bytes, MAX_JSON_BYTES)))

    def _json_body(self) -> dict:
        body = self._read_body()
        payload = json.loads(body) if body.strip() else {}
        if not isinstance(payload, dict):
            raise StoreError(
                400, f"the request body is a JSON {type(payload).__name__}; this endpoint takes an object {{...}}"
            )
        return payload

    def _no_body(self) -> None:
        if not self.body_read:
            self._read_body()

    def send_response(self, code: int, message: str | None = None) -> None:
        self.answered = True
        super().send_response(code, message)

    def end_headers(self) -> None:
        # A response sent before the request's body was read ends the connection (the body would be parsed as
        # the next request): say so, or a client reusing the connection races the close.
        if not getattr(self, "body_read", True):
            self.send_header("Connection", "close")
        super().end_headers()

    def _json(
        self, status: int, payload: object, headers: dict | None = None, content_type: str = "application/json"
    ) -> None:
        data = json.dumps(payload, default=str).encode()  # default: a card's `date: 2024-01-01` is a date
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, message: str, error_code: str | None = None, extra: dict | None = None) -> None:
        # Header values go out as latin-1: a path like `€.txt` is shown escaped there (the JSON body has it as is).
        shown = " ".join(message.split()).encode("ascii", "backslashreplace").decode("ascii")
        headers = {"X-Error-Message": shown, **(extra or {})}
        if error_code:
            headers["X-Error-Code"] = error_code
        self._json(status, {"error": message}, headers)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's signature
        if not self.server.quiet:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")


def serve(root: Path, *, host: str = "127.0.0.1", port: int = 8808, token: str | None = None, **limits) -> None:
    """Run the registry in the foreground until interrupted. `limits`: max_body_bytes, max_connections, timeout."""

    try:
        server = HubServer((host, port), root, token=token, **limits)
    except OSError as error:
        raise BuilderError(
            f"cannot serve on {host}:{port} ({error.strerror or error}); choose another --port (0 picks a free one)"
        ) from None
    print(
        f"builder hub: serving {Path(root).resolve()} at {server.url}"
        f"{' (token required for writes and private repos)' if token else ' (no token: every request accepted)'}"
    )
    print(f"clients: export HF_ENDPOINT={server.url} HF_HUB_DISABLE_XET=1", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
