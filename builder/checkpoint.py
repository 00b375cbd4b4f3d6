"""What a model folder holds, read without torch: its weight files, their safetensors headers, its tokenizer files.

The one reader of safetensors headers for the whole package: `plan` sizes a build from it, the quantize step counts
serialized bytes with it and the streaming quantizer locates every tensor's bytes with it. A header that does not
describe its own file (a truncated file, a length past the end, offsets outside the data, a shape that does not
match its bytes) is a `SourceError` naming the file and what to do, never a crash further down.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from builder.errors import SourceError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Bytes per element of each safetensors dtype. A dtype missing here is read as opaque bytes: sized by its offsets.
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# Bytes per element of the dtypes a recipe's `source.dtype` names (the unquantized model a build is measured against).
TORCH_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Files whose presence means the folder has a tokenizer that the artifact should carry.
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.txt", "tokenizer.model", "vocab.json")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
# A sentence-transformers model folder: the module list, its settings, and each module's folder (1_Pooling/, ...).
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint: its name, safetensors dtype and shape, and where its bytes are (`file` and the
    absolute `offset`; None for a Hub source known only from metadata)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: Path | None = None
    offset: int | None = None

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n


def read_header(file: Path) -> list[TensorInfo]:
    """Every tensor a safetensors file holds, from its header, checked against the file's size."""
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise _broken(file, f"it has {len(prefix)} bytes, fewer than the 8 of a safetensors header length")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise _broken(
                file,
                f"its header length ({length:,} bytes) is larger than the file ({size:,} bytes)"
                if length > size - 8
                else f"its header length ({length:,} bytes) passes safetensors' {MAX_HEADER_BYTES:,}-byte limit",
            )
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _broken(file, f"its header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise _broken(file, f"its header is a JSON {type(header).__name__}, not a mapping of tensor names")
    data_start, data_bytes = 8 + length, size - 8 - length
    tensors = [
        _tensor(file, name, meta, data_start, data_bytes) for name, meta in header.items() if name != "__metadata__"
    ]
    return tensors


def _tensor(file: Path, name: str, meta: object, data_start: int, data_bytes: int) -> TensorInfo:
    if not isinstance(meta, dict):
        raise _broken(file, f"the header entry of {name!r} is not a mapping")
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if not isinstance(dtype, str):
        raise _broken(file, f"tensor {name!r} has no dtype")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _broken(file, f"tensor {name!r} has no valid shape (got {shape!r:.80})")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int for o in offsets)
        and 0 <= offsets[0] <= offsets[1] <= data_bytes
    ):
        raise _broken(
            file,
            f"tensor {name!r} has data_offsets {offsets!r:.80} outside the file's "
            f"{data_bytes:,} data bytes (a truncated or corrupted file)",
        )
    info = TensorInfo(name, dtype, tuple(shape), offsets[1] - offsets[0], file, data_start + offsets[0])
    if dtype in DTYPE_BYTES and info.numel * DTYPE_BYTES[dtype] != info.nbytes:
        raise _broken(
            file,
            f"tensor {name!r} ({dtype}, shape {list(shape)}) needs {info.numel * DTYPE_BYTES[dtype]:,} "
            f"bytes but its data_offsets span {info.nbytes:,}",
        )
    return info


def _broken(file: Path, what: str) -> SourceError:
    return SourceError(f"{file} is not a valid safetensors file: {what}; re-save or re-download the checkpoint")


def weight_map(folder: Path) -> dict[str, str] | None:
    """model.safetensors.index.json's tensor -> shard map, or None when the folder has no index."""
    index = Path(folder) / INDEX_FILE
    if not index.is_file():
        return None
    try:
        mapping = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SourceError(
            f"{index} is not a safetensors index ({type(error).__name__}: {error}); re-save the checkpoint"
        ) from None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise SourceError(
            f"{index}: `weight_map` is not a mapping of tensor names to shard files; re-save the checkpoint"
        )
    return mapping


def safetensors_files(names: list[str] | tuple[str, ...], index: dict[str, str] | None) -> list[str]:
    """The safetensors files from_pretrained reads among `names` (a folder's listing): the index's shards, else
    model.safetensors. Other *.safetensors beside them (consolidated.safetensors, adapters) are not the model's."""
    if index is not None:
        return sorted(set(index.values()))
    return [SINGLE_FILE] if SINGLE_FILE in names else []


def local_weight_files(folder: Path) -> list[Path]:
    """`safetensors_files` of a local folder, as paths; a shard the index names but the folder lacks is an error."""
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    files = safetensors_files(names, weight_map(folder))
    missing = [name for name in files if name not in names]
    if missing:
        raise SourceError(
            f"{folder / INDEX_FILE} names shard(s) the folder does not have: {', '.join(missing[:3])}; "
            "copy the missing files or re-save the checkpoint"
        )
    return [folder / name for name in files]


def has_tokenizer(folder: Path) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def copy_sentence_transformers(source: Path, target: Path) -> list[str]:
    """Copy a sentence-transformers source's files into the artifact `target`: modules.json, its settings and the
    folder of every module after the first (the Transformer, which is the artifact itself). Without them
    `SentenceTransformer(artifact)` loads mean pooling without normalization: other embeddings. Returns what was
    copied (relative paths); nothing for a plain transformers folder."""
    import shutil

    source, target = Path(source), Path(target)
    if not (source / "modules.json").is_file():
        return []
    try:
        modules = json.loads((source / "modules.json").read_text(encoding="utf-8"))
        folders = [m["path"] for m in modules if isinstance(m, dict) and m.get("path")]
    except (ValueError, TypeError) as error:
        raise SourceError(
            f"{source / 'modules.json'} is not a sentence-transformers module list ({error}); fix or remove it"
        ) from None
    copied = []
    for name in SENTENCE_TRANSFORMERS_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
            copied.append(name)
    for folder in folders:
        # Normalize has no settings, so its folder may be missing from the source; sentence-transformers does not
        # need it then either.
        if (source / folder).is_dir() and Path(folder).name == folder:
            shutil.copytree(source / folder, target / folder, dirs_exist_ok=True, copy_function=shutil.copyfile)
            copied.append(f"{folder}/")
    return copied
