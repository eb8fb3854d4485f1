"""Reading a diffusers component folder's tensors: which file holds each tensor (one `<stem>.safetensors`,
or the shards of its index), their shapes and dtypes from the headers alone, and one tensor at a time
read into a reusable buffer with plain positioned reads (`TensorFile`)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fuseline.core.safetensors_io import SafetensorsError, TensorEntry, read_header
from stages.errors import StageError


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
