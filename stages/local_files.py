"""Turn a catalog source into a local path a stage may read (`materialize`), sha256-checked, no pickle
without consent. Shared by the convert, vae and merge stages."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from fuseline.core.catalog.model import Catalog, Source
from fuseline.core.catalog.sources import parse_source
from fuseline.core.files import sha256_file
from fuseline.core.redact import install_redaction, redact
from fuseline.core.safetensors_io import PICKLE_SUFFIXES, sniff_format
from stages.errors import StageError
from stages.settings import BuildSettings
from stages.sources.archived import ProjectArchive, restore
from stages.sources.cache import DownloadCache
from stages.sources.download import RetryPolicy
from stages.sources.errors import SourceError
from stages.sources.hf import CONFIG_FOLDER_PATTERNS
from stages.sources.resolve import fetch


def resolve_local_source(catalog: Catalog, source: str, where: str) -> Path:
    """The existing local path a `file:` source names; `where` is the catalog path shown in errors."""
    parsed = parse_source(source)
    if parsed.scheme != "file":
        raise StageError(
            "DOWNLOAD_NEEDED",
            f"{where}: source {source!r} is a {parsed.scheme}: source, not a local file; "
            "use materialize() (download cache) for it",
        )
    path = catalog.resolve_file(parsed)
    if not path.exists():
        raise StageError("SOURCE_MISSING", f"{where}: {source!r} resolves to {path}, which does not exist")
    return path


def project_archive(catalog: Catalog, settings: BuildSettings) -> ProjectArchive:
    """The source archive of the project whose catalog this is (the catalog sits at the project's root),
    in the remote FUSELINE_ARCHIVE_REMOTE names (default: DVC's default remote)."""
    root = catalog.path.parent if catalog.path is not None else Path.cwd()
    return ProjectArchive(root, settings.archive_remote)


def materialize(
    catalog: Catalog,
    source: Source,
    where: str,
    *,
    receipt: dict[str, dict[str, Any]] | None = None,
    is_config: bool = False,
    cache_dir: str | Path | None = None,
    policy: RetryPolicy | None = None,
    archive: ProjectArchive | None = None,
) -> Path:
    """The local path of one catalog source, for a stage that reads it. `where` is its catalog path
    (`checkpoints.<id>`, `checkpoints.<id>.config`, `templates.<id>.loras[<n>]`, `vae`).

    `file:` sources are used in place. Every other source comes from the shared download cache, looked
    up by sha256 (the catalog's pin, else the one its fetch stage recorded in `receipt`): a hit costs no
    network; a miss (another machine, a cleaned cache) downloads it again, verified against that sha256.
    The receipt only supplies hashes; its paths are never used, so it means the same on every machine.
    `cache_dir` and `policy` come from the stage's build settings (default: read from the environment).
    With an `archive` (project_archive), a source upstream lost (or a `file:` source missing on this
    machine) comes from the project's source archive, found by its pin or the receipt's hash.
    """
    parsed = source.parsed
    recorded = (receipt or {}).get(where)
    identity = None  # (kind, sha256) the fetch stage recorded: what the archive knows the source by
    if recorded is not None and recorded.get("source") == redact(source.source):
        identity = (recorded.get("kind"), recorded.get("sha256"))
    cache = DownloadCache(cache_dir)
    if parsed.scheme == "file":
        used_in_place = catalog.resolve_file(parsed).exists() or archive is None
        if used_in_place or not (source.sha256 or identity):
            return resolve_local_source(catalog, source.source, where)
        failure = SourceError("NOT_FOUND", f"{where}: {source.source} names a path that does not exist")
        path = restore(archive, source, cache, failure, recorded=identity)
    else:
        pin = source.sha256
        if recorded is not None:
            if identity is None:
                raise StageError(
                    "RECEIPT_STALE",
                    f"{where}: the fetch receipt names {recorded.get('source')!r}, the catalog "
                    f"{redact(source.source)!r}; run `dvc repro` (it re-runs the fetch stage first), "
                    "not this stage alone",
                )
            if pin is None and recorded.get("kind") == "file":
                pin = recorded.get("sha256")
        install_redaction()
        pinned = source.model_copy(update={"sha256": pin}) if pin != source.sha256 else source
        path = fetch(
            pinned,
            cache=cache,
            catalog=catalog,
            allow_patterns=CONFIG_FOLDER_PATTERNS if is_config else None,
            policy=policy,
            archive=archive,
            recorded=identity,
        )
    if path.is_file() and path.parent.parent == cache.root / "sha256":
        return named_view(path, cache.root)
    return path


# Extension a loader needs for each sniffed format: the cache names files by hash alone, but diffusers'
# single-file loader picks safetensors-vs-torch.load from the extension, and so do the stages' checks.
_EXTENSIONS = {"safetensors": ".safetensors", "pickle": ".ckpt", "torch-zip": ".ckpt"}


def named_view(cached: Path, cache_root: Path) -> Path:
    """`<cache>/named/<2 hex>/<sha256><ext>`: a hard link (same bytes, no copy; a symlink across
    filesystems) to a content-addressed cache file, with the extension its sniffed format calls for."""
    ext = _EXTENSIONS.get(sniff_format(cached), "")
    view = cache_root / "named" / cached.name[:2] / f"{cached.name}{ext}"
    if view.is_file() and view.stat().st_size == cached.stat().st_size:
        return view
    view.parent.mkdir(parents=True, exist_ok=True)
    # Made under a name of its own, then renamed: a concurrent stage sees no view or a complete one.
    tmp = view.with_name(f".{view.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        os.link(cached, tmp)
    except OSError:
        tmp.symlink_to(cached.resolve())
    os.replace(tmp, view)
    return view


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
