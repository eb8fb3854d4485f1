"""The pickle refusal for downloaded sources: a pickle-based file is refused unless the catalog allows it.

The extension is not trusted: fuseline.core.safetensors_io.sniff_format reads the file's first bytes (a
`.bin` can be safetensors, a `.safetensors` can be a renamed pickle).
"""

from __future__ import annotations

from pathlib import Path

from fuseline.core.safetensors_io import PICKLE_SUFFIXES, sniff_format
from stages.sources.errors import SourceError


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
