"""What a weights file really is, from its first bytes, and the pickle refusal built on it.

The extension is not trusted: a `.bin` can be safetensors, a `.safetensors` can be a renamed pickle.
"""

from __future__ import annotations

import struct
from pathlib import Path

from stages.sources.errors import SourceError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
# A safetensors header is a JSON object; anything near this size is not a real header.
_MAX_SAFETENSORS_HEADER = 100 * 2**20


def sniff_format(path: str | Path) -> str:
    """ "safetensors", "pickle" (a raw pickle stream), "torch-zip" (torch.save's zip holding data.pkl),
    "empty", or "unknown"."""
    path = Path(path)
    with path.open("rb") as fh:
        head = fh.read(16)
    size = path.stat().st_size
    if not head:
        return "empty"
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len <= min(_MAX_SAFETENSORS_HEADER, size - 8) and head[8:9] == b"{":
            return "safetensors"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:  # PROTO opcode, protocol 2-5
        return "pickle"
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    return "unknown"


def check_pickle_policy(path: str | Path, *, allow_pickle: bool, source: str) -> str:
    """Refuse a pickle-based file unless the catalog allows it; return the sniffed format.

    A pickle can run arbitrary code when loaded, so `allow_pickle: true` is an explicit act of trust.
    Files with a pickle extension that are not safetensors are refused too (an old torch format).
    """
    fmt = sniff_format(path)
    suspicious = fmt in ("pickle", "torch-zip") or (
        Path(path).name.lower().endswith(PICKLE_SUFFIXES) and fmt != "safetensors"
    )
    if suspicious and not allow_pickle:
        raise SourceError(
            "PICKLE_REFUSED",
            f"{source}: the file is a {fmt if fmt != 'unknown' else 'non-safetensors'} file "
            f"({Path(path).name}), a pickle-based format that can run code when loaded. Prefer a "
            '.safetensors version of it; if you trust this one, add "allow_pickle": true to its entry '
            "in templates.json",
        )
    return fmt
