"""Sources from the project's source archive (fuseline.remote.archive) when upstream has lost them.

`fetch` (stages/sources/resolve.py) falls back here when upstream answers 404/410 (`NOT_FOUND`) or its
bytes differ from what the build pinned (`SHA256_MISMATCH`, `SHA256_PIN_MISMATCH`); any other failure
(credentials, network, a refused pickle) is upstream's to fix and is not hidden behind an old copy. The
copy is found by the catalog's pin, else by the hash a fetch receipt recorded, else through the archive's
index of source strings (not for `file:` sources: their strings are paths, meaningful in one project
only); it lands in the download cache, verified against that hash, and a `source.archived` warning event
says so.

The archive is the project's DVC remote (FUSELINE_ARCHIVE_REMOTE names it, default: DVC's default remote),
opened on first use only: a build whose sources all come from upstream or the cache never reads DVC's
configuration for it.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from fuseline.core.catalog.model import Source
from fuseline.core.files import atomic_dir, local_lock
from fuseline.core.logs import log_event
from fuseline.core.redact import redact
from fuseline.remote.archive import SourceArchive
from fuseline.remote.errors import RemoteError
from fuseline.remote.stores import open_store, read_remote_config
from stages.sources.cache import DownloadCache
from stages.sources.errors import SourceError

log = logging.getLogger("fuseline.sources.archive")

# Upstream failures that an archived copy answers: the file is gone, or is not the one the build used.
FALLBACK_CODES = ("NOT_FOUND", "SHA256_MISMATCH", "SHA256_PIN_MISMATCH")


class ProjectArchive:
    """The source archive in the DVC remote `remote` (None: DVC's default) of the project at `root`, opened
    when first needed."""

    def __init__(self, root: Path | str, remote: str | None = None) -> None:
        self.root = Path(root)
        self.remote = remote
        self._archive: SourceArchive | None = None

    def open(self) -> SourceArchive:
        if self._archive is None:
            self._archive = SourceArchive(open_store(read_remote_config(self.root.resolve(), self.remote)))
        return self._archive


def restore(
    archive: ProjectArchive,
    source: Source,
    cache: DownloadCache,
    failure: SourceError,
    *,
    recorded: tuple[str, str] | None = None,
) -> Path:
    """The archived copy of `source` in the download cache (a file, or a folder under `<cache>/trees/`),
    after upstream failed with `failure`; `recorded`: (kind, sha256) from the fetch receipt. Raises
    `failure`'s code, its message saying what the archive answered, when there is no usable copy."""
    try:
        found = archive.open()
        identity = _identity(found, source, recorded)
        if identity is None:
            raise RemoteError(
                "ARCHIVE_MISSING",
                f"{found.description}: no copy of {redact(source.source)} "
                + (
                    "(a file: source without sha256 is found only through its receipt)"
                    if _is_file(source)
                    else ""
                ),
            )
        kind, sha = identity
        label = redact(source.source)
        path = (
            _restore_file(found, sha, cache, label)
            if kind == "file"
            else _restore_tree(found, sha, cache, label)
        )
    except RemoteError as err:
        raise SourceError(
            failure.code,
            f"{failure.message}; the project's source archive has no usable copy either ({err.code}: "
            f"{err.message}) (fix: publish once from a machine that has the source, `fuseline publish`)",
        ) from None
    log_event(
        log,
        "source.archived",
        f"{redact(source.source)}: upstream failed ({failure.code}); using the archived copy "
        f"({kind} sha256 {sha}) from {found.description}",
        level=logging.WARNING,
        source=redact(source.source),
        kind=kind,
        sha256=sha,
        archive=found.description,
        upstream_code=failure.code,
        upstream_error=failure.message,
    )
    return path


def _is_file(source: Source) -> bool:
    return source.parsed.scheme == "file"


def _identity(
    found: SourceArchive, source: Source, recorded: tuple[str, str] | None
) -> tuple[str, str] | None:
    if source.sha256:
        return "file", source.sha256.lower()
    if recorded is not None:
        return recorded
    if _is_file(source):
        return None
    return found.lookup(source.source)


def _restore_file(found: SourceArchive, sha: str, cache: DownloadCache, label: str) -> Path:
    return cache.fetch(sha, lambda target: found.get_file(sha, target), source=label, url=found.description)


def _restore_tree(found: SourceArchive, tree: str, cache: DownloadCache, label: str) -> Path:
    """`<cache>/trees/<tree>/`: the folder rebuilt from its archived listing, each file a hard link to its
    verified copy in the cache (stored once)."""
    final = cache.root / "trees" / tree
    with local_lock(cache.root / "locks" / f"tree-{tree}.lock"):
        if final.is_dir():
            return final  # made whole by atomic_dir, so complete
        listing = found.get_tree(tree)  # checked against its hash, so the folder it builds is `tree`
        with atomic_dir(final) as tmp:
            for entry in listing:
                stored = _restore_file(found, entry["sha256"], cache, f"{label}: {entry['relpath']}")
                dest = tmp / entry["relpath"]
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(stored, dest)
                except OSError:  # another filesystem: a copy
                    shutil.copyfile(stored, dest)
    return final
