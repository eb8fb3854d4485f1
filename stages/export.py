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
# The transform gets each tensor once and returns it unchanged (nothing to do) or a new tensor. Its result
# is cast before the transform is called again, so it may live in a buffer the transform reuses.
Transform = Callable[[str, torch.Tensor], torch.Tensor]


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
