"""Sharded safetensors output laid out exactly as safetensors' `save_file` lays a file out, and written by
a thread of its own one tensor at a time (`ShardWriter`).

File names follow what `save_pretrained(variant="fp16")` writes in diffusers 0.42 / transformers 5, which
is what `from_pretrained(variant="fp16")` looks for:
    unsharded  <stem>.fp16.safetensors
    sharded    <stem>.fp16-00001-of-00003.safetensors ... + <stem>.safetensors.index.fp16.json
with <stem> `diffusion_pytorch_model` (diffusers models) or `model` (transformers models), taken from the
source folder's own files.

Byte determinism: shard boundaries fixed by sizes in sorted name order, each shard laid out exactly as
`save_file` lays it out (tests compare the bytes), safetensors metadata exactly {"format": "pt"}, JSON with
sorted keys, no timestamps.
"""

from __future__ import annotations

import json
import os
import queue
import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stages.errors import StageError
from stages.tensor_files import SAFETENSORS_NAMES, TensorSpec

VARIANT = "fp16"
SAFETENSORS_METADATA = {"format": "pt"}
# The writer hands what it wrote to the kernel's writeback every WRITEBACK_BYTES and then drops the written
# pages from the page cache once they are clean (POSIX_FADV_DONTNEED does both). Left to itself, the kernel
# let gigabytes of dirty output pages pile up and the writer paid for reclaiming memory: writing 6 GB took
# 3-14 s of system CPU (depending on how full the page cache was) against about 2 s this way, and the final
# sync had nothing left to do (measured on the build VM, docs/benchmarks.md). The cost: whoever reads the
# output next (DVC hashing it) reads it from disk rather than from memory.
WRITEBACK_BYTES = 64 * 2**20

# The order in which safetensors' `save_file` lays tensors out in a file: by dtype, in descending order of
# its Dtype enum (checked against safetensors 0.8 by tests/stages/test_export.py), then by name.
SAFETENSORS_FILE_ORDER: tuple[str, ...] = (
    "I64",
    "F64",
    "F32",
    "I32",
    "BF16",
    "F16",
    "I16",
    "I8",
    "U8",
    "BOOL",
)


def write_json(path: Path, data: Any) -> None:
    """JSON the same bytes every time: sorted keys, fixed indent, trailing newline."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def shard_file_name(stem: str, index: int, total: int) -> str:
    if total == 1:
        return f"{stem}.{VARIANT}.safetensors"
    return f"{stem}.{VARIANT}-{index:05d}-of-{total:05d}.safetensors"


def index_file_name(stem: str) -> str:
    return f"{stem}.safetensors.index.{VARIANT}.json"


# ---------------------------------------------------------------------------------------------------------
# Shard layout, computed before any tensor is read


@dataclass(frozen=True)
class ShardLayout:
    """One safetensors file, laid out as `save_file` lays it out: `header` (length prefix, JSON, space
    padding to 8 bytes) and then the tensors' bytes back to back in the order of `names`."""

    names: tuple[str, ...]
    header: bytes
    data_bytes: int

    @property
    def size(self) -> int:
        return len(self.header) + self.data_bytes


def safetensors_layout(
    specs: Mapping[str, TensorSpec], metadata: Mapping[str, str] = SAFETENSORS_METADATA
) -> ShardLayout:
    """The layout safetensors' `save_file(tensors, metadata=metadata)` gives tensors of these specs."""
    names = sorted(specs, key=lambda n: (SAFETENSORS_FILE_ORDER.index(SAFETENSORS_NAMES[specs[n].dtype]), n))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    cursor = 0
    for name in names:
        spec = specs[name]
        header[name] = {
            "dtype": SAFETENSORS_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [cursor, cursor + spec.nbytes],
        }
        cursor += spec.nbytes
    # serde_json's compact form: no spaces, non-ASCII as UTF-8.
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return ShardLayout(names=tuple(names), header=struct.pack("<Q", len(raw)) + raw, data_bytes=cursor)


def plan_shards(specs: Mapping[str, TensorSpec], max_bytes: int) -> list[dict[str, TensorSpec]]:
    """Tensors in sorted name order, cut into shards of at most `max_bytes` of tensor data (a larger tensor
    gets a shard of its own). Always at least one shard, possibly empty."""
    shards: list[dict[str, TensorSpec]] = [{}]
    current = 0
    for name in sorted(specs):
        size = specs[name].nbytes
        if shards[-1] and current + size > max_bytes:
            shards.append({})
            current = 0
        shards[-1][name] = specs[name]
        current += size
    return shards


class ShardWriter:
    """Writes a component's tensors into shards laid out up front from their specs, on a thread of its own.

    Tensors must be added in `order` (shard by shard, each in its file order); each is written as it comes,
    so memory holds only the tensors queued for writing. Shards are written under temporary names and get
    their final names once complete; `close` waits for the last write and writes the index when there are
    several shards."""

    def __init__(self, folder: Path, stem: str, max_bytes: int, specs: Mapping[str, TensorSpec]) -> None:
        if max_bytes <= 0:
            raise StageError("PARAMS_INVALID", f"shard size must be positive, got {max_bytes} bytes")
        self.folder, self.stem = Path(folder), stem
        shards = plan_shards(specs, max_bytes)
        self._layouts = [safetensors_layout(shard) for shard in shards]
        self.files = [shard_file_name(stem, i, len(shards)) for i in range(1, len(shards) + 1)]
        self.order: list[str] = [name for layout in self._layouts for name in layout.names]
        self._specs = dict(specs)
        self.total_bytes = sum(layout.data_bytes for layout in self._layouts)
        self._next = 0
        self._error: BaseException | None = None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="fuseline-export-writer", daemon=True)
        self._thread.start()

    def add(self, name: str, tensor: torch.Tensor, done: Callable[[], None] | None = None) -> None:
        """Queue `tensor` for writing; `done()` runs once its bytes are written (or dropped on an error)."""
        if self._error is not None:
            raise self._error
        expected = self.order[self._next] if self._next < len(self.order) else None
        spec = self._specs.get(name)
        if (
            name != expected
            or spec is None
            or tuple(tensor.shape) != spec.shape
            or tensor.dtype != spec.dtype
        ):
            raise StageError(
                "EXPORT_BUG",
                f"{self.folder}: got tensor {name} {tuple(tensor.shape)} {tensor.dtype}, expected {expected} "
                f"{spec}; the export writes tensors in its planned order",
            )
        self._next += 1
        self._queue.put((name, tensor.contiguous(), done))

    def _run(self) -> None:
        fd, tmp = -1, None
        try:
            for path_name, layout in zip(self.files, self._layouts, strict=True):
                tmp = self.folder / f".{path_name}.tmp"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                _write_all(fd, memoryview(layout.header))
                position, handed_over, dropped = len(layout.header), 0, 0
                for _ in layout.names:
                    item = self._queue.get()
                    if item is None:
                        return
                    _, tensor, done = item
                    try:
                        if tensor.numel():
                            _write_all(fd, memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
                            position += tensor.numel() * tensor.element_size()
                    finally:
                        if done is not None:
                            done()
                    if position - handed_over >= WRITEBACK_BYTES:
                        _drop_pages(fd, handed_over, position)  # starts writeback of these dirty pages
                        handed_over = position
                        # Pages handed over two rounds ago are clean by now (or stay, if not yet).
                        if handed_over - 2 * WRITEBACK_BYTES > dropped:
                            _drop_pages(fd, dropped, handed_over - 2 * WRITEBACK_BYTES)
                            dropped = handed_over - 2 * WRITEBACK_BYTES
                _drop_pages(fd, handed_over, position)
                os.close(fd)
                fd = -1
                os.replace(tmp, self.folder / path_name)
                tmp = None
        except BaseException as exc:
            self._error = exc
            # Keep taking tensors so that nobody waits on a buffer this thread would have given back.
            while (item := self._queue.get()) is not None:
                if item[2] is not None:
                    item[2]()
        finally:
            if fd >= 0:
                os.close(fd)
            if tmp is not None:
                tmp.unlink(missing_ok=True)

    def abort(self) -> None:
        """Stop after an error elsewhere: drop what is queued and remove the shard being written."""
        self._queue.put(None)
        self._thread.join()

    def close(self) -> list[str]:
        """Wait for every shard, name them, and write the index when there are several. Returns the file
        names written."""
        if self._next != len(self.order):
            self.abort()
            raise StageError(
                "EXPORT_BUG", f"{self.folder}: {len(self.order) - self._next} tensors were never written"
            )
        self._queue.put(None)  # lets the thread finish if it failed and is draining
        self._thread.join()
        if self._error is not None:
            raise self._error
        written = list(self.files)
        if len(self.files) > 1:
            weight_map = {
                name: file
                for file, layout in zip(self.files, self._layouts, strict=True)
                for name in layout.names
            }
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            write_json(self.folder / index_file_name(self.stem), index)
            written.append(index_file_name(self.stem))
        return written


def _drop_pages(fd: int, start: int, end: int) -> None:
    """POSIX_FADV_DONTNEED on [start, end): Linux starts writeback of the dirty pages there and drops the
    clean ones from the page cache. Advice only: where the OS has no posix_fadvise, nothing happens."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None and end > start:
        advise(fd, start, end - start, os.POSIX_FADV_DONTNEED)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        written = os.write(fd, data)
        data = data[written:]
