"""Resolve a recipe's source to exact bytes: a local folder's content digest or a Hub repo's commit sha.

Reads only metadata (config.json, safetensors headers, file listings); never tensors. Needs only the core install
(huggingface_hub), so `plan` can run anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from builder.checkpoint import (
    INDEX_FILE,
    TensorInfo,
    read_header,
    safetensors_files,
    weight_map,
)
from builder.errors import SourceError
from builder.recipe import Source

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class ResolvedSource:
    """A source pinned to exact content: `path` is where its files are (None for a Hub source not yet
    downloaded), `revision` the commit sha (Hub) or `sha256:<digest of every file>` (local).

    `pin` is the revision, or, for a local folder whose files builder has not hashed before, the digest being
    computed on a thread (`revision` waits for it): a first build needs it only for its manifest, and streams the
    same files meanwhile (16 GB took 5.4 s to hash on an H200 host before its first build began)."""

    model: str
    pin: str | Future[str]
    path: Path | None
    config: dict
    tensors: tuple[TensorInfo, ...]
    weight_files: tuple[str, ...]

    @property
    def revision(self) -> str:
        return self.pin if isinstance(self.pin, str) else self.pin.result()

    @property
    def parameter_count(self) -> int:
        return sum(t.numel for t in self.tensors)


def resolve(source: Source, local_path: Path | None) -> ResolvedSource:
    """Pin the source and read its config and tensor headers. Raises `SourceError` with the fix."""
    if local_path is not None:
        return _resolve_local(source, local_path)
    return _resolve_hub(source)


def _resolve_local(source: Source, path: Path) -> ResolvedSource:
    if not path.is_dir():
        raise SourceError(
            f"source folder {path} does not exist; check `source.model` (relative paths are relative "
            "to the recipe file)"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise SourceError(
            f"source folder {path} has no config.json; point `source.model` at a Hugging Face model "
            "folder (the one save_pretrained writes)"
        )
    names = sorted(p.name for p in path.iterdir() if p.is_file())
    weight_files = _weight_files(names, weight_map(path), source.allow_pickle, str(path))
    missing = [name for name in weight_files if name not in names]
    if missing:
        raise SourceError(
            f"{path / INDEX_FILE} names shard(s) the folder does not have: {', '.join(missing[:3])}; "
            "copy the missing files or re-save the checkpoint"
        )
    tensors = tuple(t for name in weight_files if name.endswith(".safetensors") for t in read_header(path / name))
    return ResolvedSource(source.model, local_revision(path), path, _read_json(config_file), tensors, weight_files)


def _weight_files(names: list[str], index: dict[str, str] | None, allow_pickle: bool, where: str) -> tuple[str, ...]:
    """The files from_pretrained loads the weights from: safetensors (`builder.checkpoint.safetensors_files`), else
    pickle files when the recipe allows them."""
    safetensors = safetensors_files(names, index)
    if safetensors:
        return tuple(safetensors)
    pickles = [n for n in names if n.endswith(_PICKLE_SUFFIXES)]
    if pickles and not allow_pickle:
        raise SourceError(
            f"{where} has only pickle weights ({', '.join(pickles)}); pickle can run arbitrary code "
            "when loaded. Convert them to safetensors, or set `source.allow_pickle: true` if you trust "
            "the source"
        )
    if not pickles:
        others = [n for n in names if n.endswith(".safetensors")]
        hint = (
            (
                f" ({', '.join(others[:3])} {'is' if len(others) == 1 else 'are'} not {INDEX_FILE}'s shards nor "
                "model.safetensors, the files from_pretrained reads)"
            )
            if others
            else ""
        )
        raise SourceError(
            f"{where} has no weights (model.safetensors, a {INDEX_FILE} with its shards or, with "
            f"allow_pickle, *.bin){hint}"
        )
    return tuple(pickles)


def _read_json(file: Path) -> dict:
    """A JSON object from the source (config.json, the shard index), or a SourceError saying what is wrong."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SourceError(f"{file} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise SourceError(f"{file} holds a JSON {type(value).__name__}, not an object; re-save or re-download it")
    return value


def local_revision(path: Path) -> str | Future[str]:
    """`sha256:<folder_digest>` when every file's hash is cached, else a future of it, computed on a thread (one
    per folder content: the variants of one recipe file wait for the same thread)."""
    files = _digested_files(path)
    keys = _cache_keys(files)
    cache = _read_cache()
    if all(key in cache for key in keys.values()):
        return f"sha256:{_combine(path, files, {file: cache[keys[file]] for file in files})}"
    signature = tuple(sorted(keys.values()))
    with _hashing_lock:
        future = _hashing.get(signature)
        if future is None:
            future = _hashing[signature] = Future()
            threading.Thread(target=_hash_into, args=(future, path), name="builder-source-hash", daemon=True).start()
    return future


_hashing: dict[tuple[str, ...], Future[str]] = {}  # by the files' (path, size, mtime): a changed file hashes anew
_hashing_lock = threading.Lock()
_cache_lock = threading.Lock()  # one writer of the file-hash cache at a time in this process


def _hash_into(future: Future[str], path: Path) -> None:
    try:
        future.set_result(f"sha256:{folder_digest(path)}")
    except OSError as error:
        future.set_exception(SourceError(f"cannot read the source folder {path} to hash it: {error}"))


def folder_digest(path: Path) -> str:
    """sha256 over every file's relative name and sha256. File hashes are cached by size and mtime (re-planning is
    fast) and the missing ones computed in parallel threads (hashlib releases the GIL), each file once."""
    files = _digested_files(path)
    return _combine(path, files, file_sha256s(files))


def _digested_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.relative_to(path).parts)


def _combine(path: Path, files: list[Path], digests: dict[Path, str]) -> str:
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode() + b"\0" + digests[file].encode() + b"\n")
    return digest.hexdigest()


def _cache_file() -> Path:
    root = os.environ.get("BUILDER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "builder"
    )
    return Path(root) / "sha256.json"


def _read_cache() -> dict[str, str]:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _cache_keys(files: list[Path]) -> dict[Path, str]:
    keys = {}
    for file in files:
        stat = file.stat()
        keys[file] = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return keys


def file_sha256(file: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) in the user's cache folder."""
    return file_sha256s([file])[file]


def file_sha256s(files: list[Path]) -> dict[Path, str]:
    """sha256 of each file: from the cache where its (path, size, mtime) is there, else read in parallel threads;
    the cache is read and written once."""
    from concurrent.futures import ThreadPoolExecutor

    cache, keys = _read_cache(), _cache_keys(files)
    missing = [file for file in files if keys[file] not in cache]
    if missing:
        with ThreadPoolExecutor(max(1, min(len(missing), os.cpu_count() or 1, 8))) as pool:
            computed = {keys[file]: digest for file, digest in zip(missing, pool.map(_sha256, missing), strict=True)}
        # Re-read under the lock: another thread (the artifact's hashing, a source hashed ahead) may have written.
        with _cache_lock:
            cache = _read_cache() | computed
            try:
                cache_path = _cache_file()
                cache_path.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache_path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(cache))
                tmp.replace(cache_path)
            except OSError:
                pass  # a read-only cache only costs speed
    return {file: cache[keys[file]] for file in files}


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _resolve_hub(source: Source) -> ResolvedSource:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    api = HfApi()
    revision = source.revision or "main"
    try:
        info = api.model_info(source.model, revision=revision, files_metadata=False)
        names = sorted(s.rfilename for s in info.siblings or ())
        if "config.json" not in names:
            raise SourceError(f"Hub repo {source.model}@{revision} has no config.json; it is not a transformers model")
        top = [n for n in names if "/" not in n]
        index = None
        if INDEX_FILE in top:
            index = _read_json(Path(api.hf_hub_download(source.model, INDEX_FILE, revision=info.sha)))["weight_map"]
        weight_files = _weight_files(top, index, source.allow_pickle, f"Hub repo {source.model}@{revision}")
        config = _read_json(Path(api.hf_hub_download(source.model, "config.json", revision=info.sha)))
        tensors: tuple[TensorInfo, ...] = ()
        if weight_files[0].endswith(".safetensors"):
            metadata = api.get_safetensors_metadata(source.model, revision=info.sha)
            tensors = tuple(
                t for file_meta in metadata.files_metadata.values() for t in _tensors_from_metadata(file_meta)
            )
    except GatedRepoError:
        raise SourceError(
            f"Hub repo {source.model} is gated; accept its terms on the Hub and log in (hf auth login, or set HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise SourceError(
            f"revision {revision!r} not found in Hub repo {source.model}; check `source.revision`"
        ) from None
    except RepositoryNotFoundError:
        raise SourceError(
            f"Hub repo {source.model} not found (or private: log in with hf auth login or set "
            f"HF_TOKEN); endpoint {api.endpoint}"
        ) from None
    except Exception as error:
        if not _is_network_error(error):
            raise
        raise SourceError(
            f"cannot reach the Hub at {api.endpoint} to resolve {source.model}@{revision} "
            f"({type(error).__name__}: {error}); check the network connection, DNS and proxy "
            "(HTTPS_PROXY), and HF_ENDPOINT when it is set, or point `source.model` at a local "
            "folder"
        ) from None
    if info.sha is None:
        raise SourceError(
            f"the Hub did not say which commit {source.model}@{revision} is; try again, or pin "
            "`source.revision` to a 40-hex commit"
        )
    return ResolvedSource(source.model, info.sha, None, config, tensors, weight_files)


# huggingface_hub's HTTP client raises its own transport errors (httpx's, or requests' in older releases), not
# OSError; matched by name so that no HTTP library is imported here.
_NETWORK_ERRORS = {"TransportError", "ConnectionError", "Timeout", "TimeoutException"}


def _is_network_error(error: Exception) -> bool:
    return isinstance(error, OSError) or any(cls.__name__ in _NETWORK_ERRORS for cls in type(error).__mro__)


def _tensors_from_metadata(file_meta) -> list[TensorInfo]:
    return [
        TensorInfo(name, info.dtype, tuple(info.shape), info.data_offsets[1] - info.data_offsets[0])
        for name, info in file_meta.tensors.items()
    ]
