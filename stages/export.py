"""Streaming, sharded, byte-deterministic fp16 writer of one diffusers component folder.

A component's tensors are read one at a time from its safetensors files (sharded or not), passed through a
transform (the LoRA fuse), cast to fp16 and appended to the current shard; a shard is written as soon as the
next tensor would make it exceed the size limit, so at most one shard is held in memory.

File names follow what `save_pretrained(variant="fp16")` writes in diffusers 0.42 / transformers 5, which
is what `from_pretrained(variant="fp16")` looks for:
    unsharded  <stem>.fp16.safetensors
    sharded    <stem>.fp16-00001-of-00003.safetensors ... + <stem>.safetensors.index.fp16.json
with <stem> `diffusion_pytorch_model` (diffusers models) or `model` (transformers models), taken from the
source folder's own files.

Byte determinism: tensors in sorted order, shard boundaries fixed by sizes alone, safetensors metadata
exactly {"format": "pt"} (one key, so safetensors cannot reorder it), JSON with sorted keys, no timestamps.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from stages.runtime import StageError

VARIANT = "fp16"
EXPORT_DTYPE = torch.float16
SAFETENSORS_METADATA = {"format": "pt"}
# Shard sizes are in decimal megabytes, as `max_shard_size="5GB"` is in diffusers and transformers.
BYTES_PER_MB = 1_000_000

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


def tensor_shapes(component_dir: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, read from the safetensors headers only (nothing is loaded)."""
    weights = find_weight_files(component_dir)
    shapes: dict[str, tuple[int, ...]] = {}
    by_file: dict[Path, list[str]] = {}
    for name, path in weights.tensor_files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in sorted(by_file.items()):
        with TensorFile(path) as handle:
            for name in names:
                shapes[name] = handle.shape(name)
    return shapes


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


class TensorFile:
    """Reads one tensor at a time from a safetensors file with plain reads.

    `safetensors.safe_open` memory-maps the file, and every page it touches stays mapped (and counted in
    the process's resident memory) until the file is closed: streaming a 10 GB UNet through it shows a
    10 GB peak RSS. Reading each tensor's bytes into its own buffer keeps memory at one tensor.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._handle = self.path.open("rb")
        (header_len,) = struct.unpack("<Q", self._handle.read(8))
        header = json.loads(self._handle.read(header_len))
        header.pop("__metadata__", None)
        self._entries: dict[str, dict[str, Any]] = header
        self._data_start = 8 + header_len

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def get_tensor(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise StageError(
                "BASE_INVALID", f"{self.path}: tensor {name} has unsupported dtype {entry['dtype']}"
            )
        start, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end == start:
            return torch.empty(shape, dtype=dtype)
        buffer = bytearray(end - start)
        self._handle.seek(self._data_start + start)
        if self._handle.readinto(buffer) != len(buffer):
            raise StageError(
                "BASE_INVALID", f"{self.path} is truncated at tensor {name}; re-run the convert stage"
            )
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_tensors(weights: WeightFiles) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in sorted name order, one tensor in memory at a time."""
    with ExitStack() as stack:
        handles: dict[Path, TensorFile] = {}
        for name in sorted(weights.tensor_files):
            path = weights.tensor_files[name]
            if path not in handles:
                handles[path] = stack.enter_context(TensorFile(path))
            yield name, handles[path].get_tensor(name)


def shard_file_name(stem: str, index: int, total: int) -> str:
    if total == 1:
        return f"{stem}.{VARIANT}.safetensors"
    return f"{stem}.{VARIANT}-{index:05d}-of-{total:05d}.safetensors"


def index_file_name(stem: str) -> str:
    return f"{stem}.safetensors.index.{VARIANT}.json"


class ShardWriter:
    """Appends tensors to shards of at most `max_bytes` (a larger tensor gets a shard of its own), writing
    each shard as soon as it is full. Shards get their final names in `close`, once their count is known."""

    def __init__(self, folder: Path, stem: str, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise StageError("PARAMS_INVALID", f"shard size must be positive, got {max_bytes} bytes")
        self.folder, self.stem, self.max_bytes = Path(folder), stem, max_bytes
        self._current: dict[str, torch.Tensor] = {}
        self._current_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._current and self._current_bytes + size > self.max_bytes:
            self._flush()
        self._current[name] = tensor.contiguous()
        self._current_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.folder / f".{self.stem}.shard-{len(self._shards) + 1:05d}.tmp"
        save_file(self._current, str(path), metadata=dict(SAFETENSORS_METADATA))
        self._shards.append((path, sorted(self._current)))
        self._current, self._current_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, name them all, and write the index when there are several. Returns the
        file names written."""
        if self._current or not self._shards:
            self._flush()
        total = len(self._shards)
        written: list[str] = []
        weight_map: dict[str, str] = {}
        for number, (path, names) in enumerate(self._shards, start=1):
            final = shard_file_name(self.stem, number, total)
            os.replace(path, self.folder / final)
            written.append(final)
            weight_map.update(dict.fromkeys(names, final))
        if total > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            write_json(self.folder / index_file_name(self.stem), index)
            written.append(index_file_name(self.stem))
        return written


def to_export_dtype(name: str, tensor: torch.Tensor, where: str) -> torch.Tensor:
    """fp16 for floating tensors (integer buffers such as position ids keep their dtype). A value that does
    not fit fp16 would become inf in the served model: fail here instead."""
    if not tensor.is_floating_point():
        return tensor
    if tensor.dtype == EXPORT_DTYPE:
        # Already fp16 and untouched (fused tensors arrive in fp32): the cast narrows nothing, so it cannot
        # overflow. Skipping the scan saved about a quarter of the merge time in B1 (docs/benchmarks.md).
        return tensor
    out = tensor.to(EXPORT_DTYPE)
    if not torch.isfinite(out).all():
        raise StageError(
            "FP16_OVERFLOW",
            f"{where}: tensor {name} has values beyond the fp16 range after fusing "
            f"(max |w| = {tensor.abs().max().item():.4g}); lower the LoRA scales or check the LoRA",
        )
    return out


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
    target_dir.mkdir(parents=True, exist_ok=True)
    copy_plain_files(source_dir, target_dir)
    writer = ShardWriter(target_dir, weights.stem, int(shard_size_mb * BYTES_PER_MB))
    transformed = 0
    for name, tensor in iter_tensors(weights):
        out = transform(name, tensor) if transform is not None else tensor
        transformed += out is not tensor
        writer.add(name, to_export_dtype(name, out, str(source_dir)))
    files = writer.close()
    return ComponentExport(
        files=files, tensors=len(weights.tensor_files), transformed=transformed, bytes=writer.total_bytes
    )


def copy_plain_files(source_dir: Path, target_dir: Path) -> None:
    """Every file of a component folder except its weights and their index (configs, tokenizer files)."""
    for path in sorted(Path(source_dir).rglob("*")):
        if not path.is_file() or path.name.endswith((".safetensors", ".safetensors.index.json")):
            continue
        target = target_dir / path.relative_to(source_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
