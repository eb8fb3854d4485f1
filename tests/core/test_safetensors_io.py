"""fuseline.core.safetensors_io: the one header reader and the format sniffer."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fuseline.core.safetensors_io import SafetensorsError, read_header, sniff_format, sniff_head


def _saved(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file(tensors, path, metadata=metadata)
    return path


def test_header_matches_the_library(tmp_path: Path):
    tensors = {"b": torch.ones(3, 2), "a": torch.zeros(4, dtype=torch.float16)}
    path = _saved(tmp_path / "a.safetensors", tensors, {"format": "pt"})
    header = read_header(path)
    assert header.metadata == {"format": "pt"}
    with safe_open(path, "pt") as handle:
        assert set(header.tensors) == set(handle.keys())
        for name, entry in header.tensors.items():
            assert entry.shape == tuple(handle.get_slice(name).get_shape())
            data = path.read_bytes()[header.data_start + entry.start : header.data_start + entry.end]
            assert data == handle.get_tensor(name).contiguous().numpy().tobytes()
    assert header.data_start == 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_sniffing_reads_the_layout_before_pickle_magic(tmp_path: Path):
    # A header length of 128 mod 256 starts a valid safetensors file with 0x80, pickle's PROTO opcode.
    for pad in range(64):
        path = _saved(tmp_path / "odd.safetensors", {"x": torch.zeros(2)}, {"p": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no padding gave a 0x80 first byte")
    assert sniff_format(path) == "safetensors" and read_header(path).tensors["x"].shape == (2,)
    torch.save({"x": torch.zeros(2)}, tmp_path / "zip.pt")
    assert sniff_format(tmp_path / "zip.pt") == "torch-zip"
    assert sniff_head(b"\x80\x04\x95" + b"\0" * 13, 1000) == "pickle"
    assert sniff_head(b"", 0) == "empty" and sniff_head(b"<html>", 6) == "unknown"


@pytest.mark.parametrize(
    ("cut", "message", "truncated"),
    [(5, "too short", False), (12, "header claims", False), (-3, "truncated", True)],
)
def test_a_damaged_file_is_named_with_what_is_wrong(tmp_path: Path, cut: int, message: str, truncated: bool):
    whole = _saved(tmp_path / "w.safetensors", {"x": torch.ones(64)}).read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(whole[:cut])
    with pytest.raises(SafetensorsError, match=message) as info:
        read_header(path)
    assert str(path) in str(info.value) and info.value.truncated is truncated
    assert info.value.code == "SAFETENSORS_INVALID"


def test_byte_counts_must_fit_dtype_and_shape(tmp_path: Path):
    header = b'{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}'
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(SafetensorsError, match="tensor 'x' has 8 bytes for shape"):
        read_header(path)
