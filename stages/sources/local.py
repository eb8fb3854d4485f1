"""file:<path> sources: used in place (no copy), verified when the catalog pins a sha256."""

from __future__ import annotations

from pathlib import Path

from fuseline.core.files import sha256_file
from stages.sources.errors import SourceError
from stages.sources.safety import check_pickle_policy


def fetch_local(path: Path, *, source: str, sha256: str | None, allow_pickle: bool) -> Path:
    """`path` itself after checks: it exists; a file matches its pin and is not a refused pickle.
    Folders (diffusers layouts, config folders) are returned as they are."""
    if not path.exists():
        raise SourceError(
            "NOT_FOUND",
            f"{source}: {path} does not exist; file: paths are relative to the catalog's folder",
        )
    if path.is_dir():
        if sha256:
            raise SourceError("SHA256_ON_FOLDER", f"{source}: {path} is a folder; remove its sha256")
        return path
    if sha256:
        actual = sha256_file(path)
        if actual != sha256.lower():
            raise SourceError(
                "SHA256_MISMATCH",
                f"{source}: {path} has sha256 {actual}, but templates.json pins {sha256.lower()}; "
                "the file changed or the pin is wrong",
            )
    check_pickle_policy(path, allow_pickle=allow_pickle, source=source)
    return path
