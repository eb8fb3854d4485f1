"""Pinned, resumable, verified downloads for catalog sources (civitai:, hf:, https://, s3://, file:).

    from stages.sources import DownloadCache, fetch
    path = fetch(catalog.checkpoints["sdxl-base"], cache=DownloadCache(), catalog=catalog)

Every network download goes through `download.download` (temp file beside the target, Range resume,
sha256 while streaming, retries with backoff); results land in a content-addressed `DownloadCache`.
Errors are `SourceError` (a StageError) with redacted messages.
"""

from stages.sources.cache import DownloadCache, default_cache_dir
from stages.sources.civitai import CivitaiClient, CivitaiModelVersion, check_base_model
from stages.sources.download import DownloadResult, RetryPolicy, download
from stages.sources.errors import SourceError
from stages.sources.lock import LockEntry, LockReport, lock_catalog
from stages.sources.resolve import fetch, source_from_text
from stages.sources.safety import check_pickle_policy, sniff_format

__all__ = [
    "CivitaiClient",
    "CivitaiModelVersion",
    "DownloadCache",
    "DownloadResult",
    "LockEntry",
    "LockReport",
    "RetryPolicy",
    "SourceError",
    "check_base_model",
    "check_pickle_policy",
    "default_cache_dir",
    "download",
    "fetch",
    "lock_catalog",
    "sniff_format",
    "source_from_text",
]
