"""The artifact folder format: what `builder build` writes and every other command reads.

An artifact is a folder holding the model files, verify-report.json, recipe.lock.yaml, the README.md card and
manifest.json, written last. The manifest names the build (hash, resolved recipe, pinned source, versions, device,
timings), what it measured (footprints, bits per parameter, quantized layers, the ONNX record, the verification
report) and the sha256 and size of every other file. `Manifest` is its schema; this module is its one reader and
writer, owns the file table, and decides whether an artifact is up to date for a build hash.

The file table holds regular files strictly inside the folder: a table entry is a relative POSIX path with no `..`
part (`FileEntry` paths are checked when a manifest is read) and every file it names on disk goes through
`artifact_file` (no symlink, to a file or a folder; nothing that resolves outside). Build, `builder verify --write`,
publish and list all read or write the table here, so a symlink to a token or an entry like `../../x` is refused
before anything is hashed, uploaded or called verified.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from builder.console import show_progress
from builder.errors import ArtifactError
from builder.recipe.schema import NAME_PATTERN
from builder.source import file_sha256s
from builder.verification import NodePlacement, OnnxRecord, VerificationReport

MANIFEST_FILE = "manifest.json"
LOCK_FILE = "recipe.lock.yaml"
"""The resolved recipe the artifact was built from, a local source as an absolute path (`builder verify` finds it)."""
MANIFEST_VERSION = 2
"""Version 2 types the gate's report (`builder.verification.VerificationReport`) and the ONNX record; a version-1
manifest holds the same fields, and reads as written."""
FAILED_DIR = ".failed"
"""`<out>/.failed/<name>/`: a build that failed verification, kept by `builder build --keep-failed` (no manifest;
its verify-report.json says why)."""
PUBLISHED_DIR = ".published"
"""`<out>/.published/<name>.json`: the last publish of an artifact (`PublishedRecord`; publish writes it, list reads
it)."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceRecord(_Record):
    model: str
    revision: str
    """A Hub commit, or `sha256:<digest>` of a local folder's files."""
    task: str | None


class Footprint(_Record):
    """Memory of the source loaded unquantized in the recipe's dtype vs the artifact loaded, and their ratio."""

    source_bytes: int
    artifact_bytes: int
    ratio: float | None
    """None when the source's size is unknown (0 bytes)."""
    expected_ratio: float | None = None
    """What the plan expected the ratio to be (bitsandbytes builds; the gate's default bound derives from it)."""

    @classmethod
    def of(cls, source_bytes: int, artifact_bytes: int, expected_ratio: float | None = None) -> Footprint:
        footprint = cls(
            source_bytes=source_bytes,
            artifact_bytes=artifact_bytes,
            ratio=round(artifact_bytes / source_bytes, 4) if source_bytes else None,
        )
        if expected_ratio is not None:
            footprint.expected_ratio = expected_ratio
        return footprint


class QuantizedLayers(_Record):
    """The bitsandbytes layers: how many, their weight elements, the bytes their packed weights and quantization
    state take on disk, and the bits per parameter that makes."""

    count: int
    parameters: int
    bytes: int
    bits_per_param: float


class Dequantized(_Record):
    path: str
    dtype: str


class FileEntry(_Record):
    sha256: str
    size: int


def table_path_problem(name: str) -> str:
    """Why `name` cannot be a file table entry ("" when it can): entries are relative POSIX paths strictly inside
    the artifact folder, as huggingface_hub's `upload_folder` also insists."""
    parts = name.split("/")
    if not name or name.startswith("/") or "\\" in name:
        return "is not a relative POSIX path"
    if any(part in ("", ".", "..") for part in parts):
        return "has an empty, '.' or '..' part"
    if any(ord(c) < 32 for c in name):
        return "contains a control character"
    return ""


class Manifest(_Record):
    """manifest.json. Fields a kind of build does not produce are left unset and so absent from the file
    (`quantize_path`, `quantized_layers` and `device_map` for bitsandbytes builds, `onnx` for exports)."""

    manifest_version: int
    name: str = Field(pattern=NAME_PATTERN)
    """The recipe's artifact name (its pattern is the recipe's): publish names `.published/<name>.json` after it."""
    build_hash: str
    kind: str
    """"quantize" or "export"."""
    recipe: dict[str, Any]
    """The resolved recipe (after `extends` and variants), as JSON."""
    recipe_files: list[str]
    source: SourceRecord
    versions: dict[str, str]
    device: str
    device_uuid: str | None = None
    """Which physical GPU built it (None on CPU)."""
    built_at: str
    timings: dict[str, float]
    footprint: Footprint | None
    bits_per_param: float | None
    library_name: str
    verification: VerificationReport | None
    """The gate's report (the content of verify-report.json)."""
    device_map: str | dict[str, Any] | None = None
    quantize_path: str | None = None
    quantized_layers: QuantizedLayers | None = None
    dequantized: Dequantized | None = None
    warnings: list[str] | None = None
    """What `builder plan` warned about (e.g. a compute dtype other than the load dtype); absent when none."""
    onnx: OnnxRecord | None = None
    """The export step's record (ONNX exports)."""
    files: dict[str, FileEntry] | None = None
    """Every other file of the folder by relative POSIX path; set last, once the folder is complete."""

    @field_validator("files")
    @classmethod
    def _paths_inside_the_folder(cls, files: dict[str, FileEntry] | None) -> dict[str, FileEntry] | None:
        for name in files or {}:
            if problem := table_path_problem(name):
                raise ValueError(f"entry {name!r} {problem}; an artifact lists only files inside its folder")
        return files

    @property
    def passed(self) -> bool:
        return self.verification is not None and self.verification.passed

    @property
    def placement(self) -> NodePlacement | None:
        """The ONNX gate's node placement (None for bitsandbytes builds and manifests written before it)."""
        return None if self.verification is None else self.verification.placement

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True)

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_json(), indent=2) + "\n").encode()


def parse_manifest(data: bytes | str, where: str) -> Manifest:
    """A manifest from its bytes; `ArtifactError` naming `where` when they are not one this builder reads."""
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{where} is not valid JSON ({error}); rebuild the artifact") from None
    if (
        isinstance(raw, dict)
        and isinstance(raw.get("manifest_version"), int)
        and raw["manifest_version"] > MANIFEST_VERSION
    ):
        raise ArtifactError(
            f"{where} has manifest_version {raw['manifest_version']}; this builder reads versions 1 to "
            f"{MANIFEST_VERSION}: upgrade builder"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "(top level)"
        message = first["msg"].split(" or instance of ")[0]  # the report's class names mean nothing to a reader
        raise ArtifactError(f"{where} is not a builder manifest ({field}: {message}); rebuild the artifact") from None


def load_manifest(folder: Path) -> Manifest:
    """The manifest of the artifact in `folder`; `ArtifactError` saying what is wrong when it has none."""
    path = artifact_file(Path(folder), MANIFEST_FILE)
    if path is None:
        raise ArtifactError(
            f"{folder} has no {MANIFEST_FILE}; point at a folder that `builder build` wrote (artifacts/<name>)"
        )
    return parse_manifest(path.read_bytes(), str(Path(folder) / MANIFEST_FILE))


def read_manifest(folder: Path) -> Manifest | None:
    """The manifest of `folder`, or None when it has none or one that cannot be read (an artifact to rebuild)."""
    try:
        return load_manifest(folder)
    except (ArtifactError, OSError):
        return None


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Write manifest.json by an atomic rename: a reader sees the old manifest or the new one."""
    replace_file(Path(folder) / MANIFEST_FILE, manifest.to_bytes())


def replace_file(path: Path, data: bytes) -> None:
    """Write `path` through a temporary file beside it and `os.replace`."""
    temporary = path.with_name(f".{path.name}.new")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def replace_folder(new: Path, final: Path) -> None:
    """Make the complete folder `new` the artifact at `final` so that at every instant `final` is a complete
    artifact, the old one or the new one: an atomic exchange of the two folders (Linux renameat2
    RENAME_EXCHANGE), after which `new` holds the old artifact and is deleted. Where the OS has no exchange the old
    artifact is renamed aside first (a crash between the two renames leaves no artifact at `final`: the old one is
    in `.old-<name>-*`, which the next build of it deletes)."""
    if not final.exists():
        os.rename(new, final)
        return
    if _exchange(new, final):
        shutil.rmtree(new, ignore_errors=True)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-", dir=final.parent))
    os.rename(final, aside / final.name)
    try:
        os.rename(new, final)
    except BaseException:
        os.rename(aside / final.name, final)  # put the old artifact back
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with renameat2(RENAME_EXCHANGE); False where the OS or filesystem has no such
    call (the caller falls back to two renames)."""
    import ctypes  # deferred: only a replacing build needs it

    rename_exchange, at_fdcwd = 2, -100
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), str(b))


def artifact_file(folder: Path, name: str) -> Path | None:
    """`name` in the artifact `folder` when it is a regular file strictly inside it: reached through no symlink (to a
    file or a folder) below the resolved folder. None when nothing is there; `ArtifactError` naming the entry when
    something else is (a symlink, a folder, a device or pipe, a path with a `..` part or an absolute one)."""
    if problem := table_path_problem(name):
        raise ArtifactError(
            f"{folder}: the file table entry {name!r} {problem}; an artifact holds only files inside its folder: "
            "rebuild it (builder build RECIPE --force)"
        )
    root = Path(folder).resolve()
    path, mode = root, 0
    for part in name.split("/"):
        path = path / part
        try:
            mode = path.lstat().st_mode
        except (FileNotFoundError, NotADirectoryError):
            return None
        if stat.S_ISLNK(mode):
            raise ArtifactError(
                f"{Path(folder) / name}: {path.relative_to(root).as_posix()} is a symlink (to {os.readlink(path)}); "
                "an artifact holds regular files only, so nothing outside it is hashed or published: remove the "
                "link and rebuild the artifact (builder build RECIPE --force)"
            )
    if not stat.S_ISREG(mode):
        raise ArtifactError(
            f"{Path(folder) / name} is not a regular file; an artifact's file table lists regular files only: "
            "remove it and rebuild the artifact (builder build RECIPE --force)"
        )
    return path


def folder_files(folder: Path) -> list[str]:
    """The relative POSIX path of every file under `folder` except manifest.json, sorted, each checked by
    `artifact_file` (a symlink anywhere in the folder is an `ArtifactError`, not a file to follow)."""
    names = []
    for path in Path(folder).rglob("*"):  # rglob lists a symlinked folder but does not descend into it
        name = path.relative_to(folder).as_posix()
        if (path.is_dir() and not path.is_symlink()) or name == MANIFEST_FILE:
            continue
        if artifact_file(folder, name) is not None:
            names.append(name)
    return sorted(names)


def file_table(folder: Path, ahead: HashAhead | None = None) -> dict[str, FileEntry]:
    """sha256 and size of every file under `folder` except manifest.json (`folder_files`), by relative POSIX path;
    each file read once, several at a time (hashlib releases the GIL). A file `ahead` hashed, unchanged since, is
    not read again."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm  # deferred: huggingface_hub's dependency, absent from the core install

    files = [folder / name for name in folder_files(folder)]
    known = {path: found for path in files if ahead is not None and (found := ahead.entry(path)) is not None}
    todo = [path for path in files if path not in known]
    with tqdm(
        total=sum(p.stat().st_size for p in todo),
        unit="B",
        unit_scale=True,
        desc="Hashing files",
        leave=False,
        disable=not show_progress(),
    ) as bar:
        with ThreadPoolExecutor(max(1, min(len(todo), os.cpu_count() or 1, 8))) as pool:
            known |= zip(todo, pool.map(lambda path: _hash_file(path, bar.update)[0], todo), strict=True)
    return {path.relative_to(folder).as_posix(): known[path] for path in files}


class HashAhead:
    """`folder`'s files hashed on background threads while the build does other work (the pipeline starts it when
    the weights are final, so they are hashed while the gate runs); `file_table` takes an entry only when its file
    still has the size and modification time it had when it was read."""

    def __init__(self, folder: Path):
        from concurrent.futures import ThreadPoolExecutor

        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
        self._pool = ThreadPoolExecutor(max(1, min(len(files), os.cpu_count() or 1, 8)), "builder-hash")
        self._futures = {path: self._pool.submit(_hash_file, path) for path in files}

    def entry(self, path: Path) -> FileEntry | None:
        future = self._futures.get(path)
        if future is None:
            return None
        found, stamp = future.result()
        return found if stamp is not None and stamp == _stamp(path) else None

    def cancel(self) -> None:
        """Stop hashing: files not started are dropped; a file being read finishes on its own."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def _hash_file(path: Path, progress=None) -> tuple[FileEntry, tuple[int, int] | None]:
    """(entry, the file's (size, mtime) if it did not change while it was read, else None)."""
    before = _stamp(path)
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
            if progress is not None:
                progress(len(chunk))
    return FileEntry(sha256=digest.hexdigest(), size=size), before if _stamp(path) == before else None


def up_to_date(final: Path, build_hash: str) -> Manifest | None:
    """The manifest of the artifact at `final` when it has `build_hash`, passed verification and still has every
    file it lists at the listed size; else None. `builder build` skips exactly these artifacts."""
    manifest = read_manifest(final)
    try:
        if manifest is None or not_current(final, manifest, build_hash):
            return None
    except ArtifactError:
        return None  # a symlink or another non-file in the table: the build replaces the folder
    return manifest


def not_current(final: Path, manifest: Manifest, build_hash: str, *, hashes: bool = False) -> str:
    """Why the artifact is not up to date for `build_hash` ("" when it is): every listed file must be there at its
    listed size and, with `hashes`, have its listed sha256 (through the file-hash cache, so a second look reads
    nothing). `ArtifactError` for an entry that is not a regular file inside the folder (`artifact_file`)."""
    if manifest.build_hash != build_hash:
        return "another build hash"
    if not manifest.passed:
        return "verification did not pass"
    listed = manifest.files or {}
    paths = {}
    for name, entry in listed.items():
        path = artifact_file(final, name)
        if path is None or path.stat().st_size != entry.size:
            return f"{name} is missing or changed"
        paths[name] = path
    if hashes:
        digests = file_sha256s(list(paths.values()))
        for name, path in paths.items():
            if digests[path] != listed[name].sha256:
                return f"{name} changed after the build (its sha256 differs from the manifest's)"
    return ""


class PublishedRecord(_Record):
    """`<out>/.published/<name>.json`: where and when an artifact was last published from this machine."""

    name: str = Field(pattern=NAME_PATTERN)
    repo: str
    revision: str
    endpoint: str
    commit: str | None
    pr_url: str | None
    status: str
    """published or unchanged (a publish that found the build already there)."""
    build_hash: str
    published_at: str


def read_published(artifacts: Path, name: str) -> PublishedRecord | None:
    """The publish record of artifact `name` under `artifacts` (None when it was never published from here);
    `ArtifactError` naming the file when it is not a record."""
    path = Path(artifacts) / PUBLISHED_DIR / f"{name}.json"
    what_to_do = "delete it (it only records the last publish) or publish the artifact again"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ArtifactError(f"{path}: cannot be read ({error.strerror}); {what_to_do}") from None
    try:
        return PublishedRecord.model_validate_json(data)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise ArtifactError(f"{path}: {field}: {first['msg']}; {what_to_do}") from None


def write_published(artifacts: Path, record: PublishedRecord) -> Path:
    """Write the record as `<artifacts>/.published/<name>.json` through a new temporary file (never one planted
    there) and an atomic rename; refuses (`ArtifactError`) when `.published` is a symlink, so a record lands
    nowhere else."""
    folder = Path(artifacts).resolve() / PUBLISHED_DIR
    folder.mkdir(exist_ok=True)
    if folder.resolve() != folder:
        raise ArtifactError(
            f"{folder} is a symlink (to {folder.resolve()}); publish records only inside {folder.parent}: "
            "remove the link"
        )
    fd, temporary = tempfile.mkstemp(prefix=f".{record.name}.", suffix=".tmp", dir=folder)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(record.model_dump_json(indent=2) + "\n")
    path = folder / f"{record.name}.json"
    os.replace(temporary, path)
    return path
