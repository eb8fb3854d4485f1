"""Archiving a built project's sources in its DVC remote (fuseline/remote/archive.py): what `fuseline publish`
runs before it writes a release, so that every source a released model was built from can be fetched again
after its upstream has lost it (stages/sources/archived.py does that).

The fetch receipts dvc.lock names (one per group: vae, checkpoints.<id>, templates.<id>) say what the build
used: each source's kind and sha256. A source the archive already holds costs one request; another comes
from the download cache (or is fetched again: a cached pin costs no request, a cache miss downloads it, a
folder comes from the hub's cache or its `file:` path) and is uploaded, verified against that hash first.
Every source but `file:` ones is also recorded in the archive's index under its source string, which is how
a fetch finds an archived folder or unpinned file.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from fuseline.core.catalog.loading import load_catalog
from fuseline.core.catalog.model import Catalog, Source
from fuseline.core.errors import FuselineError
from fuseline.core.redact import redact
from fuseline.remote.archive import ArchiveReport, SourceArchive
from fuseline.remote.errors import RemoteError
from fuseline.remote.stores import ObjectStore
from stages.fetch import group_sources
from stages.receipts import read_receipt
from stages.settings import BuildSettings
from stages.sources.cache import DownloadCache
from stages.sources.download import RetryPolicy
from stages.sources.hf import CONFIG_FOLDER_PATTERNS
from stages.sources.resolve import fetch

# A fetch stage's command in dvc.lock (dvc.yaml's fetch-* stages): its group and where its receipt lies.
_RECEIPT_COMMAND = re.compile(r"--receipt\s+(\S+)\s+--receipt-out\s+(\S+)")


def receipt_paths(root: Path) -> dict[str, Path]:
    """{group: receipt file} for every fetch stage dvc.lock records."""
    lock_file = root / "dvc.lock"
    try:
        stages = (yaml.safe_load(lock_file.read_text()) or {}).get("stages", {})
    except (OSError, yaml.YAMLError) as exc:
        raise RemoteError("NOT_BUILT", f"{lock_file}: cannot read it ({exc}) (fix: `dvc repro`)") from None
    found = {}
    for entry in stages.values():
        match = _RECEIPT_COMMAND.search(str(entry.get("cmd", "")))
        if match:
            found[match.group(1)] = root / match.group(2)
    return found


def archive_sources(root: Path, store: ObjectStore, settings: BuildSettings) -> ArchiveReport:
    """Put every source the project's build recorded into the archive in `store` (what is there already is
    left alone); then check the archive holds each. Raises RemoteError naming the source at fault."""
    root = Path(root)
    archive = SourceArchive(store)
    report = ArchiveReport(archive.description)
    try:
        catalog = load_catalog(root / "templates.json")
    except FuselineError as exc:
        raise RemoteError("CATALOG_INVALID", f"{root / 'templates.json'}: {exc}") from None
    cache = DownloadCache(settings.download_cache)
    policy = RetryPolicy.from_settings(settings)
    archived = _Archived(archive, report, catalog, cache, policy)
    for group, path in sorted(receipt_paths(root).items()):
        try:
            sources = group_sources(catalog, group)
        except FuselineError:
            continue  # a checkpoint or template dropped from the catalog: nothing of it is released
        try:
            recorded = read_receipt(path, group)
        except FuselineError as exc:
            raise RemoteError("NOT_BUILT", f"{exc} (fix: `dvc repro` or `dvc checkout`)") from None
        for where, source, is_config in sources:
            entry = recorded.get(where)
            if entry is None or entry.get("source") != redact(source.source):
                raise RemoteError(
                    "STALE",
                    f"{path}: the receipt does not record {where} as the catalog has it (fix: "
                    "`dvc repro`, or `dvc checkout` when the receipt is missing)",
                )
            archived.put(where, source, entry["kind"], entry["sha256"], is_config)
    return report


class _Archived:
    """One publish's archiving: the archive, what it did so far, and where local copies come from."""

    def __init__(
        self,
        archive: SourceArchive,
        report: ArchiveReport,
        catalog: Catalog,
        cache: DownloadCache,
        policy: RetryPolicy,
    ) -> None:
        self.archive, self.report, self.catalog, self.cache, self.policy = (
            archive,
            report,
            catalog,
            cache,
            policy,
        )

    def put(self, where: str, source: Source, kind: str, sha: str, is_config: bool) -> None:
        has = self.archive.has_file if kind == "file" else self.archive.has_tree
        if has(sha):
            self.report.present.append(sha)
        else:
            try:
                self._upload(source, kind, sha, is_config)
            except RemoteError:
                raise
            except FuselineError as exc:
                raise RemoteError(
                    "SOURCE_UNAVAILABLE",
                    f"{where}: {redact(source.source)} is not in the source archive and cannot be read "
                    f"here to put it there ({exc}) (fix: publish from the machine that built it, or "
                    "restore the source)",
                ) from None
            if not has(sha):
                raise RemoteError(
                    "INCOMPLETE_ARCHIVE",
                    f"{self.archive.description}: {where} ({sha}) is not there after uploading it",
                )
        if source.parsed.scheme != "file" and self.archive.lookup(source.source) != (kind, sha):
            self.archive.put_index(source.source, kind, sha)

    def _upload(self, source: Source, kind: str, sha: str, is_config: bool) -> None:
        if kind == "file":
            # The bytes the build used: the cache's copy, else the source fetched again by that hash.
            local = self.cache.get(sha) or fetch(
                source.model_copy(update={"sha256": sha}),
                cache=self.cache,
                catalog=self.catalog,
                policy=self.policy,
            )
            if self.archive.put_file(sha, local):
                self.report.uploaded.append(sha)
                self.report.uploaded_bytes += local.stat().st_size
            return
        folder = fetch(
            source,
            cache=self.cache,
            catalog=self.catalog,
            allow_patterns=CONFIG_FOLDER_PATTERNS if is_config else None,
            policy=self.policy,
        )
        for entry in self.archive.put_tree(sha, folder):
            self.report.uploaded.append(entry["sha256"])
            self.report.uploaded_bytes += entry["size"]
