"""One entry for every source kind: a pinned source in, a verified local path out."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fuseline.core.catalog.model import Catalog, Source
from fuseline.core.catalog.sources import ParsedSource, parse_source
from fuseline.core.files import local_lock
from stages.sources.archived import FALLBACK_CODES, ProjectArchive, restore
from stages.sources.cache import DownloadCache
from stages.sources.civitai import CivitaiClient, fetch_civitai
from stages.sources.download import RetryPolicy, download
from stages.sources.errors import SourceError
from stages.sources.hf import fetch_hf
from stages.sources.local import fetch_local
from stages.sources.s3 import download_s3
from stages.sources.safety import check_pickle_policy


def fetch(
    source: Source,
    *,
    cache: DownloadCache,
    catalog: Catalog | None = None,
    family: str = "sdxl",
    allow_patterns: tuple[str, ...] | None = None,
    policy: RetryPolicy | None = None,
    civitai: CivitaiClient | None = None,
    archive: ProjectArchive | None = None,
    recorded: tuple[str, str] | None = None,
) -> Path:
    """The local path of `source`: a file in the download cache (civitai, https, s3), in the
    huggingface_hub cache (hf), or the file itself (file:). Pinned sources already cached cost no request.

    `family` is the model family templates build (the Civitai baseModel check); `allow_patterns`
    limits an hf folder download (config folders: no weights). With an `archive`, a source upstream has
    lost (404/410, other bytes than pinned) comes from the project's source archive instead
    (stages/sources/archived.py); `recorded` is its (kind, sha256) from a fetch receipt, if known.
    """
    try:
        return _fetch(source, cache, catalog, family, allow_patterns, policy, civitai)
    except SourceError as err:
        if archive is None or err.code not in FALLBACK_CODES:
            raise
        path = restore(archive, source, cache, err, recorded=recorded)
    if path.is_file():  # the same refusal as upstream's bytes get (the fetchers check those)
        check_pickle_policy(path, allow_pickle=source.allow_pickle, source=source.parsed.raw)
    return path


def _fetch(
    source: Source,
    cache: DownloadCache,
    catalog: Catalog | None,
    family: str,
    allow_patterns: tuple[str, ...] | None,
    policy: RetryPolicy | None,
    civitai: CivitaiClient | None,
) -> Path:
    parsed = source.parsed
    sha = source.sha256.lower() if source.sha256 else None
    if parsed.scheme == "civitai":
        assert parsed.version_id is not None
        return fetch_civitai(
            parsed.version_id,
            sha256=sha,
            allow_pickle=source.allow_pickle,
            cache=cache,
            family=family,
            client=civitai or CivitaiClient(policy=policy),
        )
    if parsed.scheme == "hf":
        return fetch_hf(
            parsed,
            cache_dir=cache.root,
            sha256=sha,
            allow_pickle=source.allow_pickle,
            allow_patterns=allow_patterns,
        )
    if parsed.scheme == "file":
        path = catalog.resolve_file(parsed) if catalog is not None else Path(parsed.path or "").resolve()
        return fetch_local(path, source=parsed.raw, sha256=sha, allow_pickle=source.allow_pickle)
    if parsed.scheme == "https":
        return _fetch_remote(
            parsed, sha, source.allow_pickle, cache, lambda dest, pin: download(
                parsed.url or "", dest, sha256=pin, label=parsed.raw, policy=policy
            ),
        )  # fmt: skip
    if parsed.scheme == "s3":
        assert parsed.bucket and parsed.key
        return _fetch_remote(
            parsed, sha, source.allow_pickle, cache, lambda dest, pin: download_s3(
                parsed.bucket or "", parsed.key or "", dest, sha256=pin, policy=policy
            ),
        )  # fmt: skip
    raise SourceError("SOURCE_UNSUPPORTED", f"{parsed.raw}: no fetcher for scheme {parsed.scheme!r}")


def _fetch_remote(
    parsed: ParsedSource, sha: str | None, allow_pickle: bool, cache: DownloadCache, get
) -> Path:
    if sha:
        path = cache.fetch(sha, lambda target: get(target, sha), source=parsed.raw, url=parsed.url or "")
    else:
        # Unpinned (the catalog warns): download under a name derived from the source string, hash it,
        # then file it under its hash. Every fetch of an unpinned source downloads again.
        incoming = cache.root / "incoming" / hashlib.sha256(parsed.raw.encode()).hexdigest()[:32]
        # Two stages fetching the same unpinned source would write the same .part file: one at a time,
        # as DownloadCache.locked does for pinned ones.
        with local_lock(incoming.with_name(incoming.name + ".lock")):
            result = get(incoming, None)
            with cache.locked(result.sha256) as target:
                os.replace(incoming, target)
                cache.write_sidecar(result.sha256, source=parsed.raw, url=parsed.url or "")
        path = target
    check_pickle_policy(path, allow_pickle=allow_pickle, source=parsed.raw)
    return path


def source_from_text(text: str, *, sha256: str | None = None, allow_pickle: bool = False) -> Source:
    """A Source for code that has a plain string (tests, the CLI); validates like the catalog does."""
    parse_source(text)
    return Source(source=text, sha256=sha256, allow_pickle=allow_pickle)
