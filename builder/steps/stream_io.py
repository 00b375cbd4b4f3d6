"""The streaming quantizer's I/O engine: safetensors in, safetensors out, one tensor at a time.

Readers fill a small pool of (pinned, on CUDA) host buffers straight from the source files with `preadv`; device
workers copy each buffer to the device, quantize it and bring the result back; writer threads `pwrite` the result
into its place in the output file. Tensors that are copied unchanged never enter Python: `copy_file_range` moves
them file to file in the kernel. Memory stays bounded by the buffer pool and the write budget, whatever the model's
size.

Output files are valid safetensors that every reader accepts, but not byte-identical to `save_file`'s: tensors of
known size are laid out in advance (sorted by alignment, like `save_file`), the few whose size is only known after
quantization (bitsandbytes' packed quant-state JSON) follow them, and the header is padded with spaces to a size
reserved up front.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from queue import Queue

import torch

from builder.checkpoint import read_header
from builder.errors import BuildError

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in ST_DTYPES.items()}
_MAX_NUMBER = 10**15  # wider than any offset or length written; reserves header room for unknown sizes


@dataclass(frozen=True)
class SourceTensor:
    """Where one tensor's bytes lie in a source safetensors file (absolute byte offset)."""

    file: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_source_tensors(files: Iterable[Path]) -> dict[str, SourceTensor]:
    """Every tensor of the given safetensors files, by name, with its absolute location (headers read by
    `builder.checkpoint`). A dtype torch cannot hold is a `BuildError` naming the tensor."""
    tensors = {}
    for file in files:
        for info in read_header(file):
            if info.dtype not in ST_DTYPES:
                raise BuildError(
                    f"{file.name}: tensor {info.name} has dtype {info.dtype}, which the streaming "
                    f"quantizer cannot read (it reads {', '.join(ST_DTYPES)})"
                )
            assert info.offset is not None  # local files always have one
            tensors[info.name] = SourceTensor(file, info.offset, info.nbytes, ST_DTYPES[info.dtype], info.shape)
    return tensors


@dataclass(frozen=True)
class OutTensor:
    """One tensor the output will hold; `shape` None means its size is known only once it is computed."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...] | None

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for dim in self.shape or ():
            n *= dim
        return n


class ShardWriter:
    """One output safetensors file, written in place by several threads; call `finish` once all tensors are in."""

    def __init__(self, path: Path, tensors: list[OutTensor], metadata: dict[str, str]):
        self.path = path
        self.metadata = metadata
        fixed = sorted((t for t in tensors if t.shape is not None), key=lambda t: (-t.dtype.itemsize, t.name))
        self._entries: dict[str, dict] = {}
        self._offsets: dict[str, int] = {}
        cursor = 0
        for tensor in fixed:
            self._offsets[tensor.name] = cursor
            self._entries[tensor.name] = {
                "dtype": ST_NAMES[tensor.dtype],
                "shape": list(tensor.shape or ()),
                "data_offsets": [cursor, cursor + tensor.nbytes],
            }
            cursor += tensor.nbytes
        self._late = [t for t in tensors if t.shape is None]
        if any(t.dtype.itemsize != 1 for t in self._late):
            raise ValueError("tensors of unknown size must be byte tensors (they go last, unaligned)")
        self._cursor = cursor
        self._late_data: dict[str, bytes] = {}
        self._lock = threading.Lock()
        placeholder = dict(self._entries)
        for tensor in self._late:
            placeholder[tensor.name] = {
                "dtype": ST_NAMES[tensor.dtype],
                "shape": [_MAX_NUMBER],
                "data_offsets": [_MAX_NUMBER, _MAX_NUMBER],
            }
        reserved = len(self._header_bytes(placeholder))
        self._data_start = 8 + reserved + (-reserved % 8)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self.fd, self._data_start + cursor)

    def _header_bytes(self, entries: dict[str, dict]) -> bytes:
        return json.dumps({"__metadata__": self.metadata, **entries}, separators=(",", ":")).encode()

    def place(self, name: str, nbytes: int) -> int:
        """The absolute file offset where planned tensor `name`'s `nbytes` bytes go."""
        entry = self._entries[name]
        if entry["data_offsets"][1] - entry["data_offsets"][0] != nbytes:
            raise ValueError(f"{name}: planned {entry['data_offsets']} bytes, got {nbytes}")
        return self._data_start + self._offsets[name]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        if name not in self._offsets:
            # A tensor of unknown size (a quant-state JSON, a few hundred bytes): kept until `finish`, which lays
            # them out by name, so the file does not depend on which thread finished first.
            with self._lock:
                self._late_data[name] = data.tobytes()
            return
        _pwrite_all(self.fd, data.data, self.place(name, data.nbytes))

    def copy_from(self, name: str, source: SourceTensor) -> None:
        """Copy a source tensor's bytes unchanged, inside the kernel."""
        offset = self.place(name, source.nbytes)
        with open(source.file, "rb") as handle:
            done = 0
            while done < source.nbytes:
                moved = os.copy_file_range(
                    handle.fileno(), self.fd, source.nbytes - done, source.offset + done, offset + done
                )
                if moved == 0:
                    raise OSError(f"{source.file}: unexpected end of file")
                done += moved

    def finish(self) -> int:
        """Write the header (padded with spaces to the reserved size) and close; returns the file size."""
        missing = [t.name for t in self._late if t.name not in self._late_data]
        if missing:
            raise ValueError(f"{self.path.name}: never written: {', '.join(missing[:5])}")
        for name in sorted(self._late_data):
            data = self._late_data[name]
            self._entries[name] = {
                "dtype": "U8",
                "shape": [len(data)],
                "data_offsets": [self._cursor, self._cursor + len(data)],
            }
            _pwrite_all(self.fd, memoryview(data), self._data_start + self._cursor)
            self._cursor += len(data)
        header = self._header_bytes(self._entries)
        room = self._data_start - 8
        if len(header) > room:
            raise ValueError(f"{self.path.name}: header of {len(header)} bytes exceeds the {room} reserved")
        header += b" " * (room - len(header))
        _pwrite_all(self.fd, memoryview(struct.pack("<Q", room) + header), 0)
        size = self._data_start + self._cursor
        os.ftruncate(self.fd, size)
        os.close(self.fd)
        return size

    def abort(self) -> None:
        os.close(self.fd)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def read_into(source: SourceTensor, buffer: torch.Tensor) -> torch.Tensor:
    """Read a source tensor's bytes into the front of a uint8 host buffer; returns the typed, shaped view."""
    view = buffer[: source.nbytes]
    target = view.numpy().data
    with open(source.file, "rb", buffering=0) as handle:
        done = 0
        while done < source.nbytes:
            got = os.preadv(handle.fileno(), [target[done:]], source.offset + done)
            if got == 0:
                raise OSError(f"{source.file}: unexpected end of file")
            done += got
    return view.view(source.dtype).view(source.shape)


class ByteBudget:
    """Blocks `acquire(n)` while more than `limit` bytes are out; one request larger than the limit still passes."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


@dataclass
class Engine:
    """Thread pools and buffers of one streaming run. `device` is where quantization runs."""

    device: torch.device
    buffer_bytes: int
    buffers: int = 4
    readers: int = 4
    workers: int = 2
    writers: int = 4
    write_budget: int = 512 << 20
    _pool: Queue = field(init=False)
    _errors: list = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        pin = self.device.type == "cuda"
        self._pool = Queue()
        for _ in range(self.buffers):
            self._pool.put(torch.empty(self.buffer_bytes, dtype=torch.uint8, pin_memory=pin))
        self._read = ThreadPoolExecutor(self.readers, thread_name_prefix="stream-read")
        self._work = ThreadPoolExecutor(self.workers, thread_name_prefix="stream-work", initializer=self._init_worker)
        self._write = ThreadPoolExecutor(self.writers, thread_name_prefix="stream-write")
        self._budget = ByteBudget(self.write_budget)
        self._futures: list[Future] = []

    def _init_worker(self) -> None:
        # Workers stay on the default stream: bitsandbytes' 4-bit kernels launch there whatever the current stream
        # is, so copies on another stream would race them.
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def copy(self, writer: ShardWriter, name: str, source: SourceTensor) -> None:
        """Queue an unchanged copy of a source tensor."""
        self._futures.append(self._write.submit(writer.copy_from, name, source))

    def convert(self, writer: ShardWriter, name: str, source: SourceTensor, dtype: torch.dtype) -> None:
        """Queue a copy cast to `dtype` on the host."""

        def task() -> None:
            host = torch.empty(source.nbytes, dtype=torch.uint8)
            writer.write(name, read_into(source, host).to(dtype))

        self._futures.append(self._write.submit(task))

    def quantize(
        self,
        source: SourceTensor,
        fn: Callable[[torch.Tensor], dict[str, torch.Tensor]],
        outputs: Callable[[dict[str, torch.Tensor]], None],
    ) -> None:
        """Queue: read into a pooled buffer, `fn(tensor on device) -> {name: tensor}`, hand the host copies to
        `outputs` (on a writer thread). Blocks while every buffer is in use."""
        buffer = self._pool.get()
        read = self._read.submit(read_into, source, buffer)

        def work() -> None:
            try:
                host = read.result()
                result = fn(host.to(self.device, non_blocking=True))
                on_host = {name: t.to("cpu") for name, t in result.items()}  # synchronizes this worker's stream
            finally:
                self._pool.put(buffer)
            size = sum(t.nbytes for t in on_host.values())
            self._budget.acquire(size)

            def write() -> None:
                try:
                    outputs(on_host)
                finally:
                    self._budget.release(size)

            self._futures.append(self._write.submit(write))

        self._futures.append(self._work.submit(work))

    def wait(self) -> None:
        """Wait for everything queued (re-raising the first failure) and shut the pools down."""
        try:
            for pool in (self._read, self._work):
                pool.shutdown(wait=True)
            self._write.shutdown(wait=True)
            for future in self._futures:
                future.result()
        finally:
            for pool in (self._read, self._work, self._write):
                pool.shutdown(wait=True, cancel_futures=True)
