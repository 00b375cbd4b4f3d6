"""The local registry's storage: content-addressed blobs, immutable commits and refs switched under a lock.

Layout under the root folder:

    objects/<aa>/<sha256>              every file's bytes, named by their sha256 (written once, never changed)
    uploads/                           partial uploads; a file moves into objects/ only once its hash checks out
    repos/<type>s/<org>/<name>/
        repo.json                      {"private": bool, "created_at": ...}
        commits/<oid>.json             {"oid", "parents", "title", "description", "date", "files": {path: entry}}
        refs.json                      {"heads": {branch: oid}, "pulls": {"N": oid}}
        .lock                          flock(2) while a ref switches

A commit is written (blobs first, then the commit file) before `refs.json` is replaced in one `os.replace`, so
a reader sees either the old head or the complete new commit, never half of one.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# What huggingface_hub's default .gitattributes on the Hub stores in LFS, plus anything large or binary.
LFS_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".onnx",
    ".onnx_data",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".npz",
    ".npy",
    ".pkl",
    ".zip",
    ".tar",
    ".gz",
    ".model",
    ".tflite",
    ".ot",
    ".arrow",
    ".parquet",
)
LFS_MIN_SIZE = 10 * 1024 * 1024
REPO_TYPES = ("model", "dataset", "space")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_PR_REF = re.compile(r"^refs/pr/(\d+)$")


class StoreError(Exception):
    """A request the store refuses; `code` is the HTTP status and `error_code` the Hub's X-Error-Code."""

    def __init__(self, code: int, message: str, error_code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.code = code
        self.error_code = error_code
        self.headers = headers or {}


@dataclass(frozen=True)
class Entry:
    """One file of a commit: sha256 and size of its bytes, whether it is stored as LFS, and its git blob id."""

    sha256: str
    size: int
    lfs: bool
    git_oid: str

    def as_json(self) -> dict:
        return {"sha256": self.sha256, "size": self.size, "lfs": self.lfs, "git_oid": self.git_oid}


def git_blob_oid(data: bytes) -> str:
    """git's object id of a blob: sha1 of `blob <size>\\0<bytes>`."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file that stands in git for an LFS object."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def is_lfs(path: str, size: int, sample: bytes) -> bool:
    """The upload mode the registry asks for: LFS for weights-like suffixes, files >= 10 MiB and binary samples."""
    return path.lower().endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE or b"\0" in sample


def check_repo_id(repo_id: str) -> str:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(_NAME.match(part) for part in parts) or ".." in repo_id:
        raise StoreError(400, f"invalid repo id {repo_id!r}; use org/name")
    return repo_id


def check_path(path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or any(part in ("", ".", "..", ".git") for part in parts):
        raise StoreError(400, f"invalid file path {path!r}")
    return path


class Store:
    """A Hub-like registry persisted to `root`. Safe for concurrent use by threads and processes."""

    def __init__(self, root: Path):
        self.root = Path(root)
        for folder in ("objects", "uploads", "repos"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)

    # --- blobs ------------------------------------------------------------------------------------------------

    def object_path(self, sha256: str) -> Path:
        """Where the bytes with this sha256 are (or would be) stored. Anything but 64 lowercase hex digits is
        refused: an oid is a client's word, and `../x` or `/etc/passwd` would name a file outside the store."""
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise StoreError(422, f"{str(sha256)[:80]!r} is not a sha256 (64 lowercase hex digits)")
        return self._inside(self.root / "objects" / sha256[:2] / sha256)

    def _inside(self, path: Path) -> Path:
        """`path` when it resolves inside the store's root (no symlink or `..` leads out of it); else a 400."""
        root = self.root.resolve()
        if not path.resolve().is_relative_to(root):
            raise StoreError(400, "that path is outside the registry's storage")
        return path

    def has_object(self, sha256: str, size: int | None = None) -> bool:
        """True when the bytes are stored (and, given `size`, have that size)."""
        path = self.object_path(sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def put_object(
        self, chunks: Iterable[bytes], expected_sha256: str | None = None, expected_size: int | None = None
    ) -> tuple[str, int]:
        """Stream `chunks` into the object store. A stream that breaks off, or bytes whose sha256 or size differ
        from the expected ones, leave nothing behind."""
        digest, size = hashlib.sha256(), 0
        handle = tempfile.NamedTemporaryFile(dir=self.root / "uploads", delete=False)
        try:
            with handle:
                for chunk in chunks:
                    digest.update(chunk)
                    handle.write(chunk)
                    size += len(chunk)
            sha256 = digest.hexdigest()
            if expected_size is not None and size != expected_size:
                raise StoreError(400, f"uploaded {size} bytes, expected {expected_size}")
            if expected_sha256 is not None and sha256 != expected_sha256:
                raise StoreError(400, f"uploaded bytes have sha256 {sha256}, not {expected_sha256}")
            target = self.object_path(sha256)
            target.parent.mkdir(exist_ok=True)
            os.replace(handle.name, target)
            return sha256, size
        finally:
            if os.path.exists(handle.name):
                os.unlink(handle.name)

    def put_bytes(self, data: bytes) -> Entry:
        """Store a regular (non-LFS) file's bytes; returns its entry for a commit."""
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.has_object(sha256, len(data)):
            self.put_object([data], sha256, len(data))
        return Entry(sha256, len(data), False, git_blob_oid(data))

    # --- repos ------------------------------------------------------------------------------------------------

    def repo_dir(self, repo_type: str, repo_id: str) -> Path:
        """The repo's folder (which may not exist yet); refuses unknown types and malformed ids."""
        if repo_type not in REPO_TYPES:
            raise StoreError(400, f"unknown repo type {repo_type!r}")
        return self._inside(self.root / "repos" / f"{repo_type}s" / check_repo_id(repo_id))

    def repo_meta(self, repo_type: str, repo_id: str) -> dict:
        """repo.json (private, created_at); a 404 RepoNotFound when the repo does not exist."""
        path = self.repo_dir(repo_type, repo_id) / "repo.json"
        if not path.is_file():
            raise StoreError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return json.loads(path.read_text())

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> bool:
        """Create the repo with an initial empty commit on `main`; False when it already exists."""
        folder = self.repo_dir(repo_type, repo_id)
        folder.mkdir(parents=True, exist_ok=True)
        with self._locked(folder):
            if (folder / "repo.json").is_file():
                return False
            (folder / "commits").mkdir(exist_ok=True)
            initial = self._write_commit(folder, [], {}, "initial commit", "")
            _write_json(folder / "refs.json", {"heads": {"main": initial}, "pulls": {}})
            _write_json(folder / "repo.json", {"private": private, "created_at": _now()})
            return True

    def refs(self, repo_type: str, repo_id: str) -> dict:
        """{"heads": {branch: oid}, "pulls": {"N": oid}} as last switched."""
        self.repo_meta(repo_type, repo_id)
        return json.loads((self.repo_dir(repo_type, repo_id) / "refs.json").read_text())

    def resolve(self, repo_type: str, repo_id: str, revision: str) -> str:
        """A branch name, refs/heads/<branch>, refs/pr/<N> or a 40-hex commit -> the commit oid."""
        refs = self.refs(repo_type, repo_id)
        name = revision.removeprefix("refs/heads/")
        if name in refs["heads"]:
            return refs["heads"][name]
        if (pr := _PR_REF.match(revision)) and pr.group(1) in refs["pulls"]:
            return refs["pulls"][pr.group(1)]
        if _COMMIT.match(revision) and (self.repo_dir(repo_type, repo_id) / "commits" / f"{revision}.json").is_file():
            return revision
        raise StoreError(404, f"Revision {revision!r} not found in {repo_id}", "RevisionNotFound")

    def commit(self, repo_type: str, repo_id: str, oid: str) -> dict:
        """One commit: oid, parents, title, description, date and its files."""
        return json.loads((self.repo_dir(repo_type, repo_id) / "commits" / f"{oid}.json").read_text())

    def files(self, repo_type: str, repo_id: str, oid: str) -> dict[str, Entry]:
        """The commit's files by path."""
        return {path: Entry(**entry) for path, entry in self.commit(repo_type, repo_id, oid)["files"].items()}

    def create_branch(self, repo_type: str, repo_id: str, branch: str, starting_point: str | None) -> None:
        """A new branch at `starting_point` (default main); 409 when it exists."""
        folder = self.repo_dir(repo_type, repo_id)
        self.repo_meta(repo_type, repo_id)
        _check_branch(branch)
        with self._locked(folder):
            refs = json.loads((folder / "refs.json").read_text())
            if branch in refs["heads"]:
                raise StoreError(409, f"Branch {branch!r} already exists")
            refs["heads"][branch] = self.resolve(repo_type, repo_id, starting_point or "main")
            _write_json(folder / "refs.json", refs)

    def apply_commit(
        self, repo_type: str, repo_id: str, revision: str, header: dict, operations: list[dict], create_pr: bool
    ) -> tuple[str, int | None]:
        """Apply NDJSON commit operations on top of `revision`: returns (new commit oid, PR number or None).

        Blobs are stored first; the commit file next; the ref switches last, under the repo lock, and only when the
        branch still points at `header["parentCommit"]` (when given)."""
        folder = self.repo_dir(repo_type, repo_id)
        self.repo_meta(repo_type, repo_id)
        staged = [self._stage(op) for op in operations]
        with self._locked(folder):
            refs = json.loads((folder / "refs.json").read_text())
            branch = revision.removeprefix("refs/heads/")
            if branch not in refs["heads"]:
                raise StoreError(404, f"Revision {revision!r} is not a branch of {repo_id}", "RevisionNotFound")
            head = refs["heads"][branch]
            parent = header.get("parentCommit")
            if parent:
                matches = [oid for oid in self._all_commits(folder) if oid.startswith(parent)]
                if len(matches) != 1:
                    raise StoreError(404, f"parentCommit {parent} not found in {repo_id}", "RevisionNotFound")
                parent = matches[0]
                if not create_pr and parent != head:
                    raise StoreError(
                        412,
                        f"A commit has happened since {parent[:12]}: {branch} is at {head[:12]}. "
                        "Fetch the branch again and retry.",
                    )
            base = parent or head
            files = {path: Entry(**entry) for path, entry in self.commit(repo_type, repo_id, base)["files"].items()}
            for kind, path, entry in staged:
                if kind == "add":
                    assert entry is not None  # an add always carries its entry
                    files[path] = entry
                elif kind == "deleteFile":
                    if path not in files:
                        raise StoreError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del files[path]
                else:
                    prefix = path.rstrip("/") + "/"
                    doomed = [name for name in files if name.startswith(prefix)]
                    if not doomed:
                        raise StoreError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for name in doomed:
                        del files[name]
            oid = self._write_commit(
                folder, [base], files, header.get("summary") or "update", header.get("description") or ""
            )
            number = None
            if create_pr:
                number = max((int(n) for n in refs["pulls"]), default=0) + 1
                refs["pulls"][str(number)] = oid
            else:
                refs["heads"][branch] = oid
            _write_json(folder / "refs.json", refs)
            return oid, number

    def history(self, repo_type: str, repo_id: str, oid: str) -> list[dict]:
        """Commits reachable from `oid`, newest first (first parents only)."""
        commits = []
        while oid:
            commit = self.commit(repo_type, repo_id, oid)
            commits.append(commit)
            oid = commit["parents"][0] if commit["parents"] else ""
        return commits

    # --- helpers ----------------------------------------------------------------------------------------------

    def _stage(self, operation: dict) -> tuple[str, str, Entry | None]:
        key, value = operation.get("key"), operation.get("value") or {}
        path = check_path(str(value.get("path", "")).strip("/") if key == "deletedFolder" else str(value.get("path")))
        if key == "file":
            if value.get("encoding", "base64") != "base64":
                raise StoreError(400, f"unsupported encoding {value.get('encoding')!r} for {path}")
            return "add", path, self.put_bytes(base64.b64decode(value.get("content", "")))
        if key == "lfsFile":
            sha256, size = value.get("oid", ""), value.get("size")
            if value.get("algo", "sha256") != "sha256" or not self.has_object(sha256):
                raise StoreError(422, f"LFS object {sha256} for {path} was not uploaded (use the LFS batch API first)")
            actual = self.object_path(sha256).stat().st_size
            if size is not None and size != actual:
                raise StoreError(422, f"LFS object {sha256} for {path} has {actual} bytes, not {size}")
            return "add", path, Entry(sha256, actual, True, git_blob_oid(lfs_pointer(sha256, actual)))
        if key == "deletedFile":
            return "deleteFile", path, None
        if key == "deletedFolder":
            return "deleteFolder", path, None
        raise StoreError(400, f"unknown commit operation {key!r}")

    def _write_commit(
        self, folder: Path, parents: list[str], files: dict[str, Entry], title: str, description: str
    ) -> str:
        body = {
            "parents": parents,
            "title": title,
            "description": description,
            "date": _now(),
            "files": {path: files[path].as_json() for path in sorted(files)},
        }
        oid = hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()
        _write_json(folder / "commits" / f"{oid}.json", {"oid": oid, **body})
        return oid

    @staticmethod
    def _all_commits(folder: Path) -> list[str]:
        return [path.stem for path in (folder / "commits").glob("*.json")]

    @contextmanager
    def _locked(self, folder: Path) -> Iterator[None]:
        with open(folder / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _check_branch(branch: str) -> None:
    if (
        not branch
        or branch.startswith(("refs/", "/"))
        or ".." in branch
        or _COMMIT.match(branch)
        or any(c in branch for c in " ~^:?*[\\")
    ):
        raise StoreError(400, f"invalid branch name {branch!r}")


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
