"""Weights files on disk: the one safetensors header reader and the one format sniffer.

A safetensors file is an 8-byte little-endian header length, a JSON header naming every tensor with its
dtype, shape and byte range (plus an optional `__metadata__` dict of strings), then the tensor bytes. The
header alone says what a file holds: which model family (stages/checkpoint_kind.py), where each tensor's
bytes lie (the export streams them), how many bytes per value a folder loads as (the worker's cache).

Read by hand (about fifty lines) because the safetensors library has no header-only reader that returns the
byte offsets and the metadata without memory-mapping the file, and because a half-downloaded file must
fail here naming the file and saying "truncated", not deep inside a loader.

The extension of a weights file is never trusted: `sniff_format` reads its first bytes. A safetensors file
is recognised by its layout first (a header length that fits the file, then the JSON header's `{`); only
a file that is not safetensors is tested for pickle magic, because a header length whose low byte is 0x80
(one in 32 files: headers are padded to 8 bytes) makes a valid safetensors file start with 0x80, pickle's
PROTO opcode.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from fuseline.core.errors import FuselineError

SAFETENSORS_SUFFIXES = (".safetensors",)
# Pickle-based weight files run arbitrary code when loaded (torch.load of a .ckpt/.pt/.pth/.bin/.pkl).
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
# The safetensors format itself refuses headers above 100 MB.
MAX_HEADER_BYTES = 100_000_000
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# torch.save writes a zip archive (local file header magic); a raw pickle stream starts with the PROTO
# opcode 0x80 and its protocol number, 2 to 5.
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTOCOLS = range(2, 6)


class SafetensorsError(FuselineError):
    """A file that is not a readable safetensors file. `truncated` is set when the header is sound but the
    tensor bytes it promises are not all there (an interrupted download): callers name that apart."""

    code = "SAFETENSORS_INVALID"

    def __init__(self, path: str | os.PathLike[str], problem: str, *, truncated: bool = False) -> None:
        self.path = Path(path)
        self.problem = problem
        self.truncated = truncated
        super().__init__(f"{path}: {problem}")

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a header states it. `start`/`end` are offsets into the data section (after the
    header); 0 for tensors known from elsewhere (a pickle checkpoint's state dict)."""

    dtype: str
    shape: tuple[int, ...]
    start: int = 0
    end: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    # Absolute file offset of the first tensor byte (8 + header length).
    data_start: int
    size: int


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """The header of a safetensors file, checked against the file: every entry well-formed, byte counts
    that fit dtype and shape, and every byte range inside the file. SafetensorsError names the file."""
    path = Path(path)
    with path.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        head = handle.read(8)
        if len(head) < 8:
            raise SafetensorsError(path, f"{size} bytes, too short to be a safetensors file (truncated?)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise SafetensorsError(
                path,
                f"header claims {header_len} bytes but the file has {size}: truncated, or not safetensors "
                "(fetch it again)",
            )
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsError(
            path, f"no valid safetensors header (not valid JSON: {exc}): corrupt"
        ) from None
    if not isinstance(header, dict):
        raise SafetensorsError(path, "no valid safetensors header (not a JSON object): corrupt")
    metadata = header.pop("__metadata__", None) or {}
    data_len = size - 8 - header_len
    tensors: dict[str, TensorEntry] = {}
    end_max = 0
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = (
                info["dtype"],
                tuple(int(d) for d in info["shape"]),
                info["data_offsets"],
            )
            start, end = int(start), int(end)
        except (TypeError, KeyError, ValueError):
            raise SafetensorsError(path, f"header entry {name!r} is malformed: corrupt") from None
        width = DTYPE_BYTES.get(dtype)
        if width is not None and end - start != math.prod(shape) * width:
            raise SafetensorsError(
                path, f"tensor {name!r} has {end - start} bytes for shape {shape}: corrupt"
            )
        end_max = max(end_max, end)
        tensors[name] = TensorEntry(dtype, shape, start, end)
    if end_max > data_len:
        raise SafetensorsError(
            path,
            f"tensors need {end_max} data bytes but only {data_len} are there: the file is truncated (an "
            "interrupted download?); fetch it again",
            truncated=True,
        )
    return SafetensorsHeader(path, tensors, metadata, 8 + header_len, size)


def sniff_head(head: bytes, size: int) -> str:
    """What a file of `size` bytes starting with `head` (its first 16 bytes, or all of a shorter file) is:
    "safetensors", "pickle" (a raw pickle stream), "torch-zip" (torch.save's zip), "empty" or "unknown"."""
    if not head:
        return "empty"
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len <= min(MAX_HEADER_BYTES, size - 8) and head[8:9] == b"{":
            return "safetensors"
    if head.startswith(ZIP_MAGIC):
        return "torch-zip"
    if len(head) >= 2 and head[0] == 0x80 and head[1] in PICKLE_PROTOCOLS:
        return "pickle"
    return "unknown"


def sniff_format(path: str | os.PathLike[str]) -> str:
    """`sniff_head` of a file on disk."""
    with Path(path).open("rb") as handle:
        head = handle.read(16)
        size = os.fstat(handle.fileno()).st_size
    return sniff_head(head, size)
