"""s3://bucket/key sources: boto3 signs a GET URL (credentials and endpoint from the standard AWS_*
variables, AWS_ENDPOINT_URL included, through fuseline.core.s3), and the shared HTTP engine downloads it.

Why presign instead of s3transfer's download_file: s3transfer neither resumes a partial file nor hashes
while streaming; the HTTP engine does both, and retries the same way for every source. A fresh URL is
signed for each attempt, so a long resume never runs into an expired signature.
"""

from __future__ import annotations

import os
from typing import Any

from fuseline.core.errors import ConfigInvalid
from fuseline.core.s3 import S3Config, make_client
from stages.sources.download import DownloadResult, RetryPolicy, download
from stages.sources.errors import SourceError

AUTH_HINT = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for an S3-compatible store "
    "such as R2, MinIO or SeaweedFS) to credentials that may read this object"
)
PRESIGN_SECONDS = 3600


def s3_client() -> Any:
    """An S3 client configured from the environment (fuseline.core.s3: the AWS_* variables, one
    addressing rule). Without any credentials it signs nothing: public buckets."""
    return make_client(S3Config.from_env(), unsigned_without_credentials=True)


def download_s3(
    bucket: str,
    key: str,
    dest: os.PathLike[str] | str,
    *,
    sha256: str | None,
    policy: RetryPolicy | None = None,
    client: Any = None,
) -> DownloadResult:
    try:
        client = client or s3_client()
    except ConfigInvalid as exc:  # a malformed AWS_ENDPOINT_URL or FUSELINE_S3_ADDRESSING, a bad region
        raise SourceError("S3_CONFIG", f"s3://{bucket}/{key}: {exc.message}") from None

    def signed_url() -> str:
        return client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=PRESIGN_SECONDS
        )

    return download(
        signed_url, dest, sha256=sha256, auth_hint=AUTH_HINT, label=f"s3://{bucket}/{key}", policy=policy
    )
