"""Streaming, byte-deterministic fp16 export of one diffusers component folder.

A component's tensors are read one at a time from its safetensors files (stages/tensor_files.py), passed
through a transform (the LoRA fuse), cast to fp16 and written straight into their shard
(stages/shards.py). Every shard's header is computed up front from the tensors' shapes and dtypes, so
nothing larger than a tensor is ever held: memory holds a few reusable tensor buffers, whatever the shard
size.

Three things run at once (torch and file I/O release the GIL): a reader thread reads the next tensors into
reusable buffers, the calling thread transforms and casts, a writer thread writes. Buffers are reused
because on this project's build VMs faulting in fresh pages for every tensor cost about four times a copy
into a reused buffer (measured for B1, docs/benchmarks.md).
"""

from __future__ import annotations

import math
import os
import queue
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stages.errors import StageError
from stages.shards import ShardWriter
from stages.tensor_files import TensorFile, TensorSpec, WeightFiles, find_weight_files, tensor_specs

EXPORT_DTYPE = torch.float16
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
# The transform gets each tensor once, with `destination`: a function returning the tensor's place in the
# export (fp16, same shape, a reused buffer). It returns the tensor itself (nothing to do), that destination
# after writing its result there (the cheapest: no second pass to cast), or any other tensor, which the
# export casts into the destination. Whatever it returned is cast before it is called again, so a result
# may live in a buffer the transform reuses. Transformed tensors are checked for fp16 overflow.
Destination = Callable[[], torch.Tensor]
Transform = Callable[[str, torch.Tensor, Destination], torch.Tensor]


def export_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16 for floating tensors; integer buffers (position ids) keep their dtype."""
    return EXPORT_DTYPE if dtype.is_floating_point else dtype


# ---------------------------------------------------------------------------------------------------------
# Reusable buffers and the reader thread


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


# ---------------------------------------------------------------------------------------------------------
# The export


def to_export_dtype(
    name: str,
    tensor: torch.Tensor,
    where: str,
    out: torch.Tensor | None = None,
    *,
    transformed: bool = False,
) -> torch.Tensor:
    """fp16 for floating tensors (integer buffers such as position ids keep their dtype), cast into `out`
    (a byte buffer, or an fp16 tensor of the same shape) when one is given. A value that does not fit fp16
    would become inf in the served model: fail here instead. `transformed`: the tensor was computed (fused),
    so even an fp16 one is checked."""
    if not tensor.is_floating_point():
        return tensor
    if tensor.dtype == EXPORT_DTYPE:
        # Already fp16: untouched (nothing narrowed, nothing to check; skipping the scan saved about a
        # quarter of the merge time in B1, docs/benchmarks.md), or fused straight into fp16 (checked).
        cast = tensor
    elif out is None:
        cast = tensor.to(EXPORT_DTYPE)
    else:
        cast = _as_export(out, tensor.shape)
        cast.copy_(tensor)
    # One pass over the fp16 result without a temporary: an overflow is inf there, a NaN stays NaN.
    checked = transformed or tensor.dtype != EXPORT_DTYPE
    if checked and cast.numel() and not all(math.isfinite(v) for v in torch.aminmax(cast)):
        largest = tensor.abs().max().item() if tensor.dtype != EXPORT_DTYPE else math.inf
        raise StageError(
            "FP16_OVERFLOW",
            f"{where}: tensor {name} has values beyond the fp16 range after fusing "
            f"(max |w| = {largest:.4g}); lower the LoRA scales or check the LoRA",
        )
    return cast


def _as_export(buffer: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The start of a byte buffer as an fp16 tensor of `shape` (an fp16 tensor of that shape passes)."""
    if buffer.dtype == EXPORT_DTYPE and tuple(buffer.shape) == tuple(shape):
        return buffer
    return buffer[: math.prod(shape) * EXPORT_DTYPE.itemsize].view(EXPORT_DTYPE).view(shape)


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
    `transform(name, tensor, destination)` (see `Transform`; it returns the tensor itself when it has
    nothing to do)."""
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
    torch.set_num_threads(intra_op_threads(threads))
    try:
        for name, tensor, read_buffer in reader:
            destination = _Destination(casts, tensor.shape)
            out = transform(name, tensor, destination) if transform is not None else tensor
            changed = out is not tensor
            transformed += changed
            if out.is_floating_point() and out.dtype != EXPORT_DTYPE and destination.buffer is None:
                destination()
            final = to_export_dtype(name, out, str(source_dir), destination.buffer, transformed=changed)
            writer.add(name, final, done=_releaser(reads, read_buffer, casts, destination.buffer))
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


def intra_op_threads(current: int | None = None) -> int:
    """torch's intra-op threads during an export: the CPUs left beside the reader and writer, at least one
    (never more than `current`, torch's setting before)."""
    current = torch.get_num_threads() if current is None else current
    return max(1, min(current, _available_cpus() - IO_CPUS))


def fuse_threads() -> int:
    """Threads a transform may split its work over (each running single-threaded torch ops): every CPU
    where torch's own pool is down to one thread during the export (small machines), else one (torch's
    pool parallelises each op)."""
    return _available_cpus() if intra_op_threads() == 1 else 1


def _available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


class _Destination:
    """A tensor's fp16 place in the export: a buffer from the cast pool, taken on the first call."""

    def __init__(self, pool: BufferPool, shape: torch.Size) -> None:
        self._pool, self._shape = pool, tuple(shape)
        self.buffer: torch.Tensor | None = None

    def __call__(self) -> torch.Tensor:
        if self.buffer is None:
            self.buffer = self._pool.acquire(math.prod(self._shape) * EXPORT_DTYPE.itemsize)
        return _as_export(self.buffer, self._shape)


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
