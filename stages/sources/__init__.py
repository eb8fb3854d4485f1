"""Pinned, resumable, verified downloads for catalog sources (civitai:, hf:, https://, s3://, file:).

    from stages.sources.cache import DownloadCache
    from stages.sources.resolve import fetch
    path = fetch(catalog.checkpoints["sdxl-base"], cache=DownloadCache(), catalog=catalog)

Every network download goes through `download.download` (temp file beside the target, Range resume,
sha256 while streaming, retries with backoff); results land in a content-addressed `DownloadCache`.
Errors are `SourceError` (a StageError) with redacted messages. Import the modules themselves: this
package imports none of them, so a stage depends (in dvc.yaml) only on the modules it uses.
"""
