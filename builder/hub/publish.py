"""`builder publish`: push a verified artifact folder to the Hugging Face Hub (or any Hub-compatible endpoint) in
one commit, then check what landed.

The same code talks to huggingface.co and to `builder hub serve`; only HF_ENDPOINT differs. Order of work:

1. refuse what must not be published: no manifest, verification not passed, files that differ from the manifest's
   hashes, a Hub source not pinned to a commit, no target repo, no token;
2. create the repo (exist_ok) and the branch (when missing);
3. read the branch head; when the remote manifest has the same build hash and file hashes (and the files are
   there), stop: nothing to push;
4. one `create_commit` with every file (uploads first; the commit references them), deleting the files a
   previous publish put there that this build no longer has, with `parent_commit` = the head read in 3, so a
   concurrent push fails the commit instead of being overwritten;
5. list the new commit's files and compare sizes and sha256 with the manifest.

A crash or network failure before the commit leaves the branch as it was; the commit switches it in one step.
Transient failures (5xx, 429, timeouts, resets) are retried with backoff; a retry first re-reads the branch, so a
commit whose response was lost is recognised instead of repeated.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from builder.artifact import (
    MANIFEST_FILE,
    PUBLISHED_DIR,
    FileEntry,
    Manifest,
    PublishedRecord,
    artifact_file,
    folder_files,
    load_manifest,
    parse_manifest,
    write_published,
)
from builder.card import render_card
from builder.errors import ArtifactError, PublishError
from builder.hub.store import git_blob_oid
from builder.recipe import COMMIT_PATTERN, REPO_ID_PATTERN, is_local_path
from builder.source import file_sha256

RETRIES = 4
_BACKOFF_SECONDS = (1.0, 2.0, 4.0, 8.0)


@dataclass
class Upload:
    """What one publish pushes: repo-relative path -> local file or bytes, and the manifest that describes it."""

    files: dict[str, Path | bytes]
    manifest: Manifest

    def size(self, path: str) -> int:
        content = self.files[path]
        return len(content) if isinstance(content, bytes) else content.stat().st_size


@dataclass
class PublishResult:
    """The outcome: `status` is published, unchanged or dry-run."""

    status: str
    repo: str
    revision: str
    endpoint: str
    commit: str | None = None
    pr_url: str | None = None
    uploaded: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    attempts: int = 0
    card: str | None = None

    def as_json(self) -> dict:
        return {
            "status": self.status,
            "repo": self.repo,
            "revision": self.revision,
            "endpoint": self.endpoint,
            "commit": self.commit,
            "pr_url": self.pr_url,
            "uploaded": self.uploaded,
            "deleted": self.deleted,
            "attempts": self.attempts,
        }


def check_publishable(artifact_dir: Path, manifest: Manifest) -> dict[str, Path]:
    """Refuse unverified or failed builds, files that are not the ones the manifest hashed (or not regular files
    inside the folder: `artifact_file`), and unpinned sources. Returns the listed files' paths."""

    if not manifest.passed:
        missed = manifest.verification.failures if manifest.verification else []
        failures = "; ".join(failure.message for failure in missed) or "no report"
        raise PublishError(
            f"{artifact_dir} did not pass verification ({failures}); only verified builds are "
            "published: fix the recipe or its thresholds and rebuild"
        )
    listed = manifest.files or {}
    if not listed:
        raise PublishError(f"{artifact_dir}/{MANIFEST_FILE} lists no files; rebuild the artifact")
    paths = {}
    for name, expected in sorted(listed.items()):
        path = artifact_file(artifact_dir, name)
        if path is None:
            raise PublishError(f"{artifact_dir / name} is listed in the manifest but missing; rebuild the artifact")
        if path.stat().st_size != expected.size or file_sha256(path) != expected.sha256:
            raise PublishError(
                f"{artifact_dir / name} was changed after the build (its sha256 differs from the manifest's); "
                "rebuild the artifact instead of editing it"
            )
        paths[name] = path
    extra = sorted(set(folder_files(artifact_dir)) - set(listed))
    if extra:
        raise PublishError(
            f"{artifact_dir} has files the manifest does not list ({', '.join(extra[:5])}); "
            "remove them or rebuild the artifact"
        )
    source = manifest.recipe.get("source", {})
    if not is_local_path(source.get("model", "")) and not COMMIT_PATTERN.match(source.get("revision") or ""):
        raise PublishError(
            f"source.revision {source.get('revision') or 'main'!r} of {source.get('model')} is not a "
            "40-hex commit: pin it (the build recorded "
            f"{manifest.source.revision}) so the published card names the exact "
            "source, then rebuild"
        )
    return paths


def prepare_upload(artifact_dir: Path, manifest: Manifest, repo: str, paths: dict[str, Path]) -> Upload:
    """Every artifact file (`paths`, as `check_publishable` found them) plus manifest.json. When `repo` is not the
    recipe's `publish.repo`, the card is re-rendered so its usage snippet loads from `repo`, and the uploaded
    manifest lists that card."""
    import hashlib

    listed = manifest.files or {}
    files: dict[str, Path | bytes] = {name: paths[name] for name in sorted(listed)}
    recipe_repo = (manifest.recipe.get("publish") or {}).get("repo")
    if repo != recipe_repo and "README.md" in files:
        card = render_card(manifest, repo_id=repo, folder=Path(artifact_dir)).encode()
        files["README.md"] = card
        card_entry = FileEntry(sha256=hashlib.sha256(card).hexdigest(), size=len(card))
        manifest = manifest.model_copy(update={"files": {**listed, "README.md": card_entry}})
        files[MANIFEST_FILE] = manifest.to_bytes()
    else:
        files[MANIFEST_FILE] = Path(artifact_dir) / MANIFEST_FILE
    return Upload(files, manifest)


def publish(
    artifact_dir: str | Path,
    *,
    repo: str | None = None,
    revision: str | None = None,
    private: bool | None = None,
    create_pr: bool | None = None,
    dry_run: bool = False,
    endpoint: str | None = None,
    token: str | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> PublishResult:
    """Publish the artifact in `artifact_dir` (see the module docstring). Arguments left None come from the
    recipe's `publish` block. Raises `PublishError` when refused or when it finally fails."""
    from huggingface_hub import constants

    artifact_dir = Path(artifact_dir)
    manifest = load_manifest(artifact_dir)
    paths = check_publishable(artifact_dir, manifest)
    settings = manifest.recipe.get("publish") or {}
    repo = repo or settings.get("repo")
    if not repo:
        raise PublishError(
            f"no target repo: add `publish: {{repo: org/name}}` to the recipe of "
            f"{manifest.name} or pass --repo org/name"
        )
    if "/" not in repo or not REPO_ID_PATTERN.match(repo):
        raise PublishError(f"{repo!r} is not a Hub repo id; write it as org/name (letters, digits, '-', '_', '.')")
    revision = revision or settings.get("revision") or "main"
    private = settings.get("private", False) if private is None else private
    create_pr = settings.get("create_pr", False) if create_pr is None else create_pr
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    upload = prepare_upload(artifact_dir, manifest, repo, paths)
    result = PublishResult("dry-run", repo, revision, endpoint, uploaded=sorted(upload.files))
    if dry_run:
        card = upload.files["README.md"] if "README.md" in upload.files else None
        result.card = card.decode() if isinstance(card, bytes) else card.read_text() if card else None
        return result
    token = token or _token()
    result = _push(upload, result, token=token, private=private, create_pr=create_pr, progress=progress)
    _record(artifact_dir, upload.manifest, result, progress)
    return result


def _record(artifact_dir: Path, manifest: Manifest, result: PublishResult, progress: Callable[[str], None]) -> None:
    """`<artifacts>/.published/<name>.json`: where this artifact was last published (`builder list` shows it)."""
    from datetime import datetime, timezone

    record = PublishedRecord(
        name=manifest.name,
        repo=result.repo,
        revision=result.revision,
        endpoint=result.endpoint,
        commit=result.commit,
        pr_url=result.pr_url,
        status=result.status,
        build_hash=manifest.build_hash,
        published_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    artifacts = artifact_dir.resolve().parent
    try:
        write_published(artifacts, record)
    except (OSError, ArtifactError) as error:
        progress(f"could not record the publish in {artifacts / PUBLISHED_DIR}: {error}")


def _token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise PublishError(
            "no Hugging Face token: log in with `hf auth login` (or `huggingface-cli login`), or set "
            "HF_TOKEN to a token with write access"
        )
    return token


def _push(
    upload: Upload,
    result: PublishResult,
    *,
    token: str,
    private: bool,
    create_pr: bool,
    progress: Callable[[str], None],
) -> PublishResult:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=result.endpoint, token=token)
    repo, revision, name = result.repo, result.revision, upload.manifest.name
    _retrying(lambda: api.create_repo(repo, exist_ok=True, private=private), f"create {repo}", progress)
    if revision != "main":
        _retrying(
            lambda: api.create_branch(repo, branch=revision, exist_ok=True), f"create branch {revision}", progress
        )
    first_head = None
    for attempt in range(1, RETRIES + 2):
        result.attempts = attempt
        head = _retrying(lambda: api.repo_info(repo, revision=revision).sha, f"read {repo}@{revision}", progress)
        remote = _retrying(lambda head=head: _remote_state(api, repo, head), f"list {repo}@{head[:12]}", progress)
        if _matches(upload, remote):
            result.commit = head
            # A match on a retry means the commit landed but its response was lost.
            result.status = "published" if first_head not in (None, head) else "unchanged"
            if result.status == "unchanged":
                result.uploaded = []
            progress(
                f"{repo}@{revision} already holds build {upload.manifest.build_hash[:12]} "
                f"(commit {head[:12]}): nothing to push"
                if result.status == "unchanged"
                else f"the commit of attempt {attempt - 1} landed ({head[:12]})"
            )
            return result
        if first_head is not None and head != first_head:
            raise PublishError(
                f"{repo}@{revision} moved from {first_head[:12]} to {head[:12]} while publishing "
                "(another push?); nothing was overwritten: check the repo and run publish again"
            )
        first_head = head
        operations, deleted = _operations(upload, remote)
        progress(
            f"committing {len(upload.files)} files to {repo}@{revision} on top of {head[:12]}"
            + (f", deleting {', '.join(deleted)}" if deleted else "")
        )
        try:
            commit = api.create_commit(
                repo,
                operations,
                revision=revision,
                create_pr=create_pr,
                parent_commit=head,
                commit_message=f"Publish {name} (build {upload.manifest.build_hash[:12]})",
                commit_description=_description(upload.manifest),
            )
        except Exception as error:  # noqa: BLE001 - classified below; anything not transient is re-raised
            _raise_unless_transient(error, f"commit to {repo}@{revision}")
            if attempt > RETRIES:
                raise PublishError(f"publishing to {repo} failed after {attempt} attempts: {_reason(error)}") from None
            delay = _BACKOFF_SECONDS[min(attempt - 1, len(_BACKOFF_SECONDS) - 1)]
            progress(f"attempt {attempt} failed ({_reason(error)}); retrying in {delay:.0f}s")
            time.sleep(delay)
            continue
        result.status, result.commit, result.pr_url, result.deleted = "published", commit.oid, commit.pr_url, deleted
        _retrying(
            lambda oid=commit.oid, deleted=deleted: check_remote(api, repo, oid, upload, deleted),
            f"check {repo}@{commit.oid[:12]}",
            progress,
        )
        progress(
            f"published {repo}@{commit.oid[:12]}"
            + (f" as {commit.pr_url}" if commit.pr_url else "")
            + ": remote files match the manifest"
        )
        return result
    raise AssertionError("unreachable")  # the loop returns or raises


@dataclass
class RemoteState:
    """A branch head's file listing (path -> RepoFile) and its manifest (None when it has none)."""

    tree: dict
    manifest: Manifest | None


def _remote_state(api, repo: str, head: str) -> RemoteState:
    import tempfile

    from huggingface_hub.hf_api import RepoFile

    tree = {f.path: f for f in api.list_repo_tree(repo, recursive=True, revision=head) if isinstance(f, RepoFile)}
    manifest = None
    if MANIFEST_FILE in tree:
        with tempfile.TemporaryDirectory() as cache:
            path = api.hf_hub_download(repo, MANIFEST_FILE, revision=head, cache_dir=cache)
            try:
                manifest = parse_manifest(Path(path).read_bytes(), f"{repo}@{head[:12]}/{MANIFEST_FILE}")
            except ArtifactError:
                manifest = None  # not one of ours (or damaged): the publish replaces it
    return RemoteState(tree, manifest)


def _matches(upload: Upload, remote: RemoteState) -> bool:
    if remote.manifest is None:
        return False
    same = remote.manifest.build_hash == upload.manifest.build_hash and remote.manifest.files == upload.manifest.files
    return same and not _differences(upload, remote.tree)


def _operations(upload: Upload, remote: RemoteState) -> tuple[list, list[str]]:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    additions = [
        CommitOperationAdd(path_in_repo=path, path_or_fileobj=content if isinstance(content, bytes) else str(content))
        for path, content in upload.files.items()
    ]
    previous = set(remote.manifest.files or ()) if remote.manifest else set()
    stale = sorted(path for path in previous - set(upload.files) if path in remote.tree)
    operations: list[CommitOperationAdd | CommitOperationDelete] = [*additions]
    operations += [CommitOperationDelete(path_in_repo=path) for path in stale]
    return operations, stale


def check_remote(api, repo: str, commit: str, upload: Upload, deleted: list[str]) -> None:
    """List `commit`'s files and compare each with the upload: present, same size, same sha256 (LFS) or git blob
    id (regular files), and the `deleted` ones gone. Raises PublishError naming the first differences."""
    from huggingface_hub.hf_api import RepoFile

    tree = {f.path: f for f in api.list_repo_tree(repo, recursive=True, revision=commit) if isinstance(f, RepoFile)}
    problems = _differences(upload, tree) + [f"{path} was not deleted" for path in deleted if path in tree]
    if problems:
        raise PublishError(
            f"{repo}@{commit[:12]} does not hold what was published: {'; '.join(problems[:5])}; run publish again"
        )


def _differences(upload: Upload, tree: dict) -> list[str]:
    import hashlib

    problems = []
    for path, content in upload.files.items():
        remote = tree.get(path)
        if remote is None:
            problems.append(f"{path} is missing")
            continue
        if remote.size != upload.size(path):
            problems.append(f"{path} has {remote.size} bytes, not {upload.size(path)}")
        elif remote.lfs is not None:
            listed = upload.manifest.files or {}
            expected = (
                listed[path].sha256
                if path in listed
                else hashlib.sha256(content if isinstance(content, bytes) else content.read_bytes()).hexdigest()
            )
            if remote.lfs.sha256 != expected:
                problems.append(f"{path} has sha256 {remote.lfs.sha256}, not {expected}")
        else:
            data = content if isinstance(content, bytes) else content.read_bytes()
            if remote.blob_id != git_blob_oid(data):
                problems.append(f"{path} has different bytes (git blob {remote.blob_id})")
    return problems


def _description(manifest: Manifest) -> str:
    metrics = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in sorted((manifest.verification.metrics if manifest.verification else {}).items())
    )
    return (
        f"builder artifact {manifest.name}\n\nbuild hash: {manifest.build_hash}\n"
        f"source: {manifest.source.model} @ {manifest.source.revision}\n"
        f"verification: {'passed' if manifest.passed else 'not passed'} ({metrics})\n"
    )


# --- retries ------------------------------------------------------------------------------------------------


def use_network_timeouts(seconds: float | None = None) -> None:
    """Make huggingface_hub's HTTP client give up on a connection that makes no progress for `seconds` (default
    BUILDER_HTTP_TIMEOUT, else 60) instead of waiting forever (its default), so a stalled server becomes a retried
    timeout. It is process-wide: the CLI calls it; a library user decides for their own process."""
    import os

    from huggingface_hub import set_client_factory
    from huggingface_hub.utils._http import default_client_factory

    timeout = seconds if seconds is not None else float(os.environ.get("BUILDER_HTTP_TIMEOUT") or 60)

    def client_with_timeouts():
        client = default_client_factory()
        client.timeout = timeout  # connect, read, write and pool: each operation, not the whole transfer
        return client

    set_client_factory(client_with_timeouts)


def _retrying(call: Callable, what: str, progress: Callable[[str], None]):
    for attempt in range(1, RETRIES + 2):
        try:
            return call()
        except Exception as error:  # noqa: BLE001 - classified below
            _raise_unless_transient(error, what)
            if attempt > RETRIES:
                raise PublishError(f"{what} failed after {attempt} attempts: {_reason(error)}") from None
            delay = _BACKOFF_SECONDS[min(attempt - 1, len(_BACKOFF_SECONDS) - 1)]
            progress(f"{what}: attempt {attempt} failed ({_reason(error)}); retrying in {delay:.0f}s")
            time.sleep(delay)
    raise AssertionError("unreachable")


def _raise_unless_transient(error: Exception, what: str) -> None:
    """Return when `error` (or its cause) is worth retrying; otherwise raise the PublishError that explains it."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(error, PublishError):
        raise error
    reason = _reason(error)
    if "HF_HUB_DISABLE_XET" in reason or "xet-write-token" in reason:
        raise PublishError(
            f"{what}: the endpoint has no Xet storage; set HF_HUB_DISABLE_XET=1 (huggingface_hub "
            "then uploads through git-LFS) and run publish again"
        ) from None
    chain = _causes(error)
    if any(_is_transient(e) for e in chain):
        return
    http = next((e for e in chain if isinstance(e, HfHubHTTPError)), None)
    status = http.response.status_code if http is not None and http.response is not None else None
    if status == 412:
        raise PublishError(
            f"{what}: the branch moved since it was read (a concurrent push); nothing was "
            "overwritten: check the repo and run publish again"
        ) from None
    if status in (401, 403):
        raise PublishError(
            f"{what}: the token was refused ({status}); log in again with `hf auth login` or set "
            "HF_TOKEN to a token with write access to the repo"
        ) from None
    if isinstance(error, (RepositoryNotFoundError, RevisionNotFoundError)):
        raise PublishError(f"{what}: {reason}") from None
    if isinstance(error, (HfHubHTTPError, ValueError, OSError)):
        raise PublishError(f"{what} failed: {reason}") from None
    raise error


def _causes(error: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        chain.append(current)
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return chain


def _is_transient(error: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        return status is not None and (status == 429 or (status >= 500 and status != 501))
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    return type(error).__name__ in _TRANSPORT_ERRORS and type(error).__module__.split(".")[0] in ("httpx", "httpx2")


# httpx's (huggingface_hub 1.x) and httpx2's (2.x) transport failures: the request may not have reached the server.
_TRANSPORT_ERRORS = {
    "TransportError",
    "TimeoutException",
    "ConnectTimeout",
    "ReadTimeout",
    "WriteTimeout",
    "PoolTimeout",
    "NetworkError",
    "ConnectError",
    "ReadError",
    "WriteError",
    "CloseError",
    "RemoteProtocolError",
    "ProtocolError",
}


def _reason(error: BaseException) -> str:
    """The error's message on one line (huggingface_hub puts the server's own message after a blank line)."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return (text or type(error).__name__)[:500]
