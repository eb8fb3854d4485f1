"""Turn a catalog source into a local path a stage may read: `file:` only (for now), sha256-checked, no
pickle without consent. Shared by the convert and vae stages."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fuseline.catalog import Catalog, parse_source
from stages.checkpoint_kind import PICKLE_SUFFIXES
from stages.runtime import StageError

HASH_CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_local_source(catalog: Catalog, source: str, where: str) -> Path:
    """The existing local path a `file:` source names; `where` is the catalog path shown in errors."""
    parsed = parse_source(source)
    if parsed.scheme != "file":
        raise StageError(
            "DOWNLOAD_NEEDED",
            f"{where}: source {source!r} is a {parsed.scheme}: source, which needs the download stage "
            "(not available yet); download the file yourself and use a file:<path> source meanwhile",
        )
    path = catalog.resolve_file(parsed)
    if not path.exists():
        raise StageError("SOURCE_MISSING", f"{where}: {source!r} resolves to {path}, which does not exist")
    return path


def check_sha256(path: Path, expected: str | None, where: str) -> None:
    """Compare a file's SHA-256 with the catalog's; no-op when the catalog gives none (file: sources)."""
    if expected is None:
        return
    if path.is_dir():
        raise StageError(
            "SHA256_ON_FOLDER",
            f"{where}: sha256 is given but {path} is a folder;"
            " a sha256 pins one file; remove it for a folder",
        )
    actual = sha256_file(path)
    if actual != expected.lower():
        raise StageError(
            "SHA256_MISMATCH",
            f"{where}: {path} has sha256 {actual}, the catalog expects {expected.lower()}; "
            "the file changed or is not the one the catalog names (re-download it, or update sha256 "
            "if you meant to change it)",
        )


def check_pickle_allowed(path: Path, allow_pickle: bool, where: str) -> None:
    """Pickle files can run code when loaded: refuse them unless the catalog entry says allow_pickle."""
    if allow_pickle:
        return
    if path.is_file():
        bad = [path] if path.suffix.lower() in PICKLE_SUFFIXES else []
    else:
        bad = sorted(p for p in path.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
        # A folder that also holds safetensors for every component loads those; only pickle-only ones count.
        bad = [p for p in bad if not any(p.parent.glob("*.safetensors"))]
    if bad:
        raise StageError(
            "PICKLE_REFUSED",
            f"{where}: {bad[0]} is a pickle-based file, which can run arbitrary code when loaded; "
            'use a .safetensors file, or add "allow_pickle": true to the catalog entry if you trust it',
        )
