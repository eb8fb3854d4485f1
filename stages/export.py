"""Streaming, sharded, byte-deterministic fp16 writer of one diffusers component folder.

A component's tensors are read one at a time from its safetensors files (sharded or not), passed through a
transform (the LoRA fuse), cast to fp16 and written straight into their shard. Every shard's safetensors
header is computed up front from the tensors' shapes and dtypes (the headers of the source files say them),
so nothing larger than a tensor is ever held: memory holds a few reusable tensor buffers, whatever the
shard size.

Three things run at once (torch and file I/O release the GIL): a reader thread reads the next tensors into
reusable buffers, the calling thread transforms and casts, a writer thread writes. Buffers are reused
because on this project's build VMs faulting in fresh pages for every tensor cost about four times a copy
into a reused buffer (measured for B1, docs/benchmarks.md).

File names follow what `save_pretrained(variant="fp16")` writes in diffusers 0.42 / transformers 5, which
is what `from_pretrained(variant="fp16")` looks for:
    unsharded  <stem>.fp16.safetensors
    sharded    <stem>.fp16-00001-of-00003.safetensors ... + <stem>.safetensors.index.fp16.json
with <stem> `diffusion_pytorch_model` (diffusers models) or `model` (transformers models), taken from the
source folder's own files.

Byte determinism: shard boundaries fixed by sizes in sorted name order, each shard laid out exactly as
safetensors' own `save_file` lays it out (tests compare the bytes), safetensors metadata exactly
{"format": "pt"}, JSON with sorted keys, no timestamps.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import struct
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fuseline.core.safetensors_io import SafetensorsError, TensorEntry, read_header
from stages.errors import StageError

VARIANT = "fp16"
EXPORT_DTYPE = torch.float16
SAFETENSORS_METADATA = {"format": "pt"}
# Shard sizes are in decimal megabytes, as `max_shard_size="5GB"` is in diffusers and transformers.
BYTES_PER_MB = 1_000_000
# Buffers in flight: one being read, one being transformed, the rest queued for (or being) written.
READ_BUFFERS = 4
CAST_BUFFERS = 2
# CPUs left to the reader and writer threads: torch's intra-op threads get the rest, at least one. On the
# 2-core build machine two intra-op threads beside the I/O threads made a full B1 merge take 72 s of CPU
# instead of 21 s with one (OpenMP threads spin and wait at every op's barrier for a thread the I/O threads
# displaced); see docs/benchmarks.md.
IO_CPUS = 2
# The writer hands what it wrote to the kernel's writeback every WRITEBACK_BYTES and then drops the written
# pages from the page cache once they are clean (POSIX_FADV_DONTNEED does both). Left to itself, the kernel
# let gigabytes of dirty output pages pile up and the writer paid for reclaiming memory: writing 6 GB took
# 3-14 s of system CPU (depending on how full the page cache was) against about 2 s this way, and the final
# sync had nothing left to do (measured on the build VM, docs/benchmarks.md). The cost: whoever reads the
# output next (DVC hashing it) reads it from disk rather than from memory.
WRITEBACK_BYTES = 64 * 2**20

# The transform gets each tensor once and returns it unchanged (nothing to do) or a new tensor. Its result
# is cast before the transform is called again, so it may live in a buffer the transform reuses.
Transform = Callable[[str, torch.Tensor], torch.Tensor]


def write_json(path: Path, data: Any) -> None:
    """JSON the same bytes every time: sorted keys, fixed indent, trailing newline."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class WeightFiles:
    """Where each tensor of a component folder lives, and the file stem the folder uses."""

    stem: str
    tensor_files: dict[str, Path]


def find_weight_files(component_dir: Path) -> WeightFiles:
    """The tensors of a component folder saved without a variant: one `<stem>.safetensors`, or the shards
    named by `<stem>.safetensors.index.json`."""
    component_dir = Path(component_dir)
    indexes = sorted(component_dir.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise StageError(
            "BASE_AMBIGUOUS", f"{component_dir}: several index files {[p.name for p in indexes]}"
        )
    if indexes:
        index = indexes[0]
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise StageError(
                "BASE_INVALID", f"{index}: not a safetensors index ({exc}); re-run convert"
            ) from exc
        files = {name: component_dir / file for name, file in weight_map.items()}
        missing = sorted({str(p) for p in files.values() if not p.is_file()})
        if missing:
            raise StageError(
                "BASE_INVALID", f"{index} names missing shard files {missing[:5]}; re-run convert"
            )
        return WeightFiles(stem=index.name.removesuffix(".safetensors.index.json"), tensor_files=files)
    # Unsharded: exactly one weights file without a variant infix (`model.safetensors`, not `model.fp16...`).
    singles = sorted(p for p in component_dir.glob("*.safetensors") if p.name.count(".") == 1)
    if len(singles) != 1:
        found = sorted(p.name for p in component_dir.glob("*.safetensors"))
        raise StageError(
            "BASE_INVALID",
            f"{component_dir}: expected one <name>.safetensors or a *.safetensors.index.json, found {found}; "
            "the base folder must be written by the convert stage (no variant)",
        )
    with TensorFile(singles[0]) as handle:
        names = handle.keys()
    return WeightFiles(
        stem=singles[0].name.removesuffix(".safetensors"), tensor_files=dict.fromkeys(names, singles[0])
    )


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's shape and dtype, as a safetensors header states them."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def tensor_specs(weights: WeightFiles) -> dict[str, TensorSpec]:
    """Every tensor's shape and dtype, read from the safetensors headers only (nothing is loaded)."""
    by_file: dict[Path, list[str]] = {}
    for name, path in weights.tensor_files.items():
        by_file.setdefault(path, []).append(name)
    specs: dict[str, TensorSpec] = {}
    for path, names in sorted(by_file.items()):
        with TensorFile(path) as handle:
            for name in names:
                specs[name] = handle.spec(name)
    return specs


def tensor_shapes(component_dir: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, read from the safetensors headers only (nothing is loaded)."""
    return {name: spec.shape for name, spec in tensor_specs(find_weight_files(component_dir)).items()}


# safetensors dtype names -> torch dtypes (the ones diffusers/transformers checkpoints use).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
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
}
SAFETENSORS_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
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


class TensorFile:
    """Reads one tensor at a time from a safetensors file with plain reads.

    `safetensors.safe_open` memory-maps the file, and every page it touches stays mapped (and counted in
    the process's resident memory) until the file is closed: streaming a 10 GB UNet through it shows a
    10 GB peak RSS. Reading each tensor's bytes into a buffer of its own keeps memory at one tensor.
    Reads are positioned (`pread`), so one handle serves any thread.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            header = read_header(self.path)
        except SafetensorsError as exc:
            raise StageError("BASE_INVALID", f"{exc.message}; re-run the convert stage") from None
        self._entries: dict[str, TensorEntry] = header.tensors
        self._data_start = header.data_start
        self._fd = os.open(self.path, os.O_RDONLY)

    def keys(self) -> list[str]:
        return list(self._entries)

    def spec(self, name: str) -> TensorSpec:
        entry = self._entries[name]
        dtype = SAFETENSORS_DTYPES.get(entry.dtype)
        if dtype is None:
            raise StageError(
                "BASE_INVALID", f"{self.path}: tensor {name} has unsupported dtype {entry.dtype}"
            )
        return TensorSpec(shape=entry.shape, dtype=dtype)

    def read_into(self, name: str, buffer: torch.Tensor) -> torch.Tensor:
        """The tensor `name`, read into the start of `buffer` (a 1-D uint8 tensor, large enough)."""
        spec = self.spec(name)
        start, end = self._entries[name].start, self._entries[name].end
        size = end - start
        if size != spec.nbytes:
            raise StageError(
                "BASE_INVALID", f"{self.path}: tensor {name} has {size} bytes for {spec}; re-run convert"
            )
        if size == 0:
            return torch.empty(spec.shape, dtype=spec.dtype)
        view = memoryview(buffer[:size].numpy())
        done = 0
        while done < size:
            got = os.preadv(self._fd, [view[done:]], self._data_start + start + done)
            if got == 0:
                raise StageError(
                    "BASE_INVALID", f"{self.path} is truncated at tensor {name}; re-run the convert stage"
                )
            done += got
        return buffer[:size].view(spec.dtype).reshape(spec.shape)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def shard_file_name(stem: str, index: int, total: int) -> str:
    if total == 1:
        return f"{stem}.{VARIANT}.safetensors"
    return f"{stem}.{VARIANT}-{index:05d}-of-{total:05d}.safetensors"


def index_file_name(stem: str) -> str:
    return f"{stem}.safetensors.index.{VARIANT}.json"


def export_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16 for floating tensors; integer buffers (position ids) keep their dtype."""
    return EXPORT_DTYPE if dtype.is_floating_point else dtype


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


# ---------------------------------------------------------------------------------------------------------
# Reusable buffers and the reader and writer threads


class PoolClosed(Exception):
    """The export stopped (an error elsewhere); raised in threads waiting for a buffer."""


class BufferPool:
    """At most `count` reusable byte buffers, handed out and given back; `acquire` waits while all are out.

    A buffer grows when a larger tensor needs it and is then kept, so over a component the buffers settle at
    the largest tensor sizes and are reused from then on."""

    def __init__(self, count: int) -> None:
        self._count = count
        self._free: list[torch.Tensor] = []
        self._out = 0
        self._closed = False
        self._cond = threading.Condition()

    def acquire(self, nbytes: int) -> torch.Tensor:
        with self._cond:
            while self._out >= self._count and not self._closed:
                self._cond.wait()
            if self._closed:
                raise PoolClosed
            self._out += 1
            # Indexes, not list.remove: tensors compare element-wise.
            sizes = [buffer.numel() for buffer in self._free]
            fitting = [i for i, size in enumerate(sizes) if size >= nbytes]
            if fitting:
                return self._free.pop(min(fitting, key=sizes.__getitem__))
            if self._free:  # replace the largest free buffer by a larger one
                self._free.pop(max(range(len(sizes)), key=sizes.__getitem__))
        return torch.empty(max(nbytes, 1), dtype=torch.uint8)

    def release(self, buffer: torch.Tensor) -> None:
        with self._cond:
            self._free.append(buffer)
            self._out -= 1
            self._cond.notify()

    def close(self) -> None:
        """Wake every waiter with PoolClosed and refuse further acquires; drop the buffers."""
        with self._cond:
            self._closed = True
            self._free.clear()
            self._cond.notify_all()


_END = object()


class TensorReader:
    """Reads the tensors `order` names, in that order, on a thread of its own, each into a buffer of
    `pool`; iterating yields (name, tensor, buffer). The consumer gives each buffer back to the pool."""

    def __init__(self, weights: WeightFiles, order: list[str], pool: BufferPool) -> None:
        self._weights, self._order, self._pool = weights, order, pool
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="fuseline-export-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with ExitStack() as stack:
                handles: dict[Path, TensorFile] = {}
                for name in self._order:
                    path = self._weights.tensor_files[name]
                    if path not in handles:
                        handles[path] = stack.enter_context(TensorFile(path))
                    handle = handles[path]
                    buffer = self._pool.acquire(handle.spec(name).nbytes)
                    try:
                        tensor = handle.read_into(name, buffer)
                    except BaseException:
                        self._pool.release(buffer)
                        raise
                    self._queue.put((name, tensor, buffer))
            self._queue.put(_END)
        except PoolClosed:
            self._queue.put(_END)
        except BaseException as exc:  # handed to the consumer, which raises it
            self._queue.put(exc)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop reading (the pool must be closed first when stopping early) and wait for the thread."""
        self._thread.join()


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


# ---------------------------------------------------------------------------------------------------------
# The export


def to_export_dtype(
    name: str, tensor: torch.Tensor, where: str, out: torch.Tensor | None = None
) -> torch.Tensor:
    """fp16 for floating tensors (integer buffers such as position ids keep their dtype), cast into the
    byte buffer `out` when one is given. A value that does not fit fp16 would become inf in the served
    model: fail here instead."""
    if not tensor.is_floating_point():
        return tensor
    if tensor.dtype == EXPORT_DTYPE:
        # Already fp16 and untouched (fused tensors arrive in fp32): the cast narrows nothing, so it cannot
        # overflow. Skipping the scan saved about a quarter of the merge time in B1 (docs/benchmarks.md).
        return tensor
    if out is None:
        cast = tensor.to(EXPORT_DTYPE)
    else:
        cast = out[: tensor.numel() * EXPORT_DTYPE.itemsize].view(EXPORT_DTYPE).view(tensor.shape)
        cast.copy_(tensor)
    # One pass over the fp16 result without a temporary: an overflow is inf there, a NaN stays NaN.
    if cast.numel() and not all(math.isfinite(v) for v in torch.aminmax(cast)):
        raise StageError(
            "FP16_OVERFLOW",
            f"{where}: tensor {name} has values beyond the fp16 range after fusing "
            f"(max |w| = {tensor.abs().max().item():.4g}); lower the LoRA scales or check the LoRA",
        )
    return cast


@dataclass(frozen=True)
class ComponentExport:
    files: list[str]
    tensors: int
    transformed: int
    bytes: int


def export_component(
    source_dir: Path,
    target_dir: Path,
    shard_size_mb: float,
    transform: Transform | None = None,
) -> ComponentExport:
    """Copy a component folder as fp16 (variant "fp16"): its configs unchanged, its tensors streamed through
    `transform(name, tensor)` (which returns the tensor itself when it has nothing to do)."""
    source_dir, target_dir = Path(source_dir), Path(target_dir)
    weights = find_weight_files(source_dir)
    specs = tensor_specs(weights)
    target_dir.mkdir(parents=True, exist_ok=True)
    copy_plain_files(source_dir, target_dir)
    out_specs = {name: TensorSpec(spec.shape, export_dtype(spec.dtype)) for name, spec in specs.items()}
    writer = ShardWriter(target_dir, weights.stem, int(shard_size_mb * BYTES_PER_MB), out_specs)
    reads, casts = BufferPool(READ_BUFFERS), BufferPool(CAST_BUFFERS)
    reader = TensorReader(weights, writer.order, reads)
    transformed = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, _available_cpus() - IO_CPUS)))
    try:
        for name, tensor, read_buffer in reader:
            out = transform(name, tensor) if transform is not None else tensor
            transformed += out is not tensor
            cast_buffer = None
            if out.is_floating_point() and out.dtype != EXPORT_DTYPE:
                cast_buffer = casts.acquire(out.numel() * EXPORT_DTYPE.itemsize)
            final = to_export_dtype(name, out, str(source_dir), cast_buffer)
            writer.add(name, final, done=_releaser(reads, read_buffer, casts, cast_buffer))
        files = writer.close()
    except BaseException:
        reads.close()
        casts.close()
        writer.abort()
        reader.close()
        raise
    finally:
        torch.set_num_threads(threads)
    reader.close()
    return ComponentExport(files=files, tensors=len(specs), transformed=transformed, bytes=writer.total_bytes)


def _available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def _releaser(
    reads: BufferPool, read_buffer: torch.Tensor, casts: BufferPool, cast_buffer: torch.Tensor | None
) -> Callable[[], None]:
    """Gives a tensor's buffers back once it is written (the written tensor may be a view of either)."""

    def release() -> None:
        reads.release(read_buffer)
        if cast_buffer is not None:
            casts.release(cast_buffer)

    return release


def copy_plain_files(source_dir: Path, target_dir: Path) -> None:
    """Every file of a component folder except its weights and their index (configs, tokenizer files)."""
    for path in sorted(Path(source_dir).rglob("*")):
        if not path.is_file() or path.name.endswith((".safetensors", ".safetensors.index.json")):
            continue
        target = target_dir / path.relative_to(source_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
