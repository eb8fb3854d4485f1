"""Image upload for `output.return: "s3"`: one object per image, answered with a presigned GET URL.

The bucket, prefix and URL lifetime come from the worker's settings (FUSELINE_OUTPUT_*), or from the job's
own `output.s3` place (a bucket on FUSELINE_OUTPUT_BUCKETS, checked before generation: worker/modes.py);
the endpoint and credentials from the standard AWS_* variables boto3 reads, as for the volume sync
(fuseline/core/s3.py).
Errors are `[UPLOAD_FAILED]` with the endpoint, bucket and key at fault, redacted, never a credential.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fuseline.core.errors import ConfigInvalid
from fuseline.core.redact import redact
from fuseline.core.s3 import S3Config, make_client
from worker.errors import UploadFailed, UploadNotConfigured
from worker.modes import OutputPlace, check_output_place
from worker.settings import WorkerSettings

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}

# The AWS_* variables that decide which endpoint, account and signing a client uses: a client is reused
# only while they stay the same (tests, and a worker whose environment changes, get a fresh one).
_CLIENT_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "FUSELINE_S3_ADDRESSING",
)
_clients: dict[tuple[str | None, ...], Any] = {}
_clients_lock = threading.Lock()

# S3 error codes that mean "these credentials may not do this", whatever the provider calls it.
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden"}


def s3_client() -> Any:
    """The worker's S3 client (fuseline.core.s3, configured like the sync's), shared while AWS_* are
    unchanged; a configuration boto3 refuses is UploadFailed naming the variable (settings refuse most at
    start).

    boto3 clients are thread-safe; building one costs tens of milliseconds, too much to pay per job."""
    env_key = tuple(os.environ.get(name) for name in _CLIENT_ENV)
    with _clients_lock:
        client = _clients.get(env_key)
        if client is None:
            try:
                # A job waits on these calls: a 30 s read timeout, not the sync's 60.
                client = make_client(S3Config.from_env(), read_timeout=30)
            except ConfigInvalid as err:
                raise UploadFailed(f"output bucket not reachable: {redact(err.message)}") from None
            _clients[env_key] = client
        return client


def object_key(prefix: str, batch: str, index: int, seed: int, fmt: str) -> str:
    """`<prefix>/<batch>/<index>-<seed>.<ext>` (no prefix: `<batch>/…`): one folder per job, and each
    file name carries the seed that redoes that image alone."""
    name = f"{batch}/{index}-{seed}.{EXTENSIONS[fmt]}"
    return f"{prefix}/{name}" if prefix else name


@dataclass(frozen=True)
class ImageUploader:
    """Puts encoded images into one bucket and signs a GET URL for each."""

    bucket: str
    prefix: str = ""
    url_expiry_s: int = 3600
    # Where the bucket name came from, for messages: the endpoint's setting or the job's field.
    bucket_from: str = "FUSELINE_OUTPUT_BUCKET"

    @classmethod
    def for_output(cls, settings: WorkerSettings, place: OutputPlace | None) -> ImageUploader:
        """The job's own place (`output.s3`, allowed by FUSELINE_OUTPUT_BUCKETS), else the endpoint's."""
        if place is None:
            return cls.from_settings(settings)
        check_output_place(place, settings)  # parse_input refused it already; this guards direct calls
        expiry = place.expires_in if place.expires_in is not None else settings.output_url_expiry_s
        return cls(place.bucket, place.prefix, expiry, bucket_from="output.s3.bucket")

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> ImageUploader:
        if settings.output_bucket is None:
            # parse_input refuses such jobs before generation; this guards direct calls.
            raise UploadNotConfigured(
                "output.return 's3' needs an output bucket: set FUSELINE_OUTPUT_BUCKET on the worker's "
                "endpoint, or ask for output.return 'base64'"
            )
        return cls(settings.output_bucket, settings.output_prefix, settings.output_url_expiry_s)

    def upload(
        self, images: Sequence[bytes], fmt: str, seeds: Sequence[int], batch: str | None = None
    ) -> list[dict[str, Any]]:
        """Upload `images` (encoded as `fmt`) under one new folder; `{"url", "key", "format", "seed"}` each.

        All or nothing: when one upload fails, the objects already put for this job are deleted (best
        effort: the credentials may not allow deletes) and UploadFailed is raised."""
        client = s3_client()
        batch = batch or uuid.uuid4().hex
        done: list[str] = []
        results = []
        try:
            for index, (data, seed) in enumerate(zip(images, seeds, strict=True)):
                key = object_key(self.prefix, batch, index, seed, fmt)
                self._put(client, key, data, fmt)
                done.append(key)
                url = client.generate_presigned_url(
                    "get_object",
                    Params={"Bucket": self.bucket, "Key": key},
                    ExpiresIn=self.url_expiry_s,
                )
                results.append({"url": url, "key": key, "format": fmt, "seed": seed})
        except BaseException:
            for key in done:
                with contextlib.suppress(Exception):
                    client.delete_object(Bucket=self.bucket, Key=key)
            raise
        return results

    def _put(self, client: Any, key: str, data: bytes, fmt: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        where = f"s3://{self.bucket}/{key}"
        endpoint = client.meta.endpoint_url
        try:
            client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=CONTENT_TYPES[fmt])
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            if code == "NoSuchBucket":
                message = (
                    f"{where}: bucket {self.bucket!r} does not exist at {endpoint}; create it, or fix "
                    f"{self.bucket_from} / AWS_ENDPOINT_URL"
                )
            elif code in _DENIED:
                message = (
                    f"{where}: {endpoint} refused the upload ({code}); the worker's AWS_ACCESS_KEY_ID / "
                    f"AWS_SECRET_ACCESS_KEY need s3:PutObject and s3:GetObject on bucket {self.bucket!r}"
                )
            else:
                message = f"{where}: {endpoint} answered {code or 'an error'}: {err}"
            raise UploadFailed(redact(message)) from None
        except NoCredentialsError:
            raise UploadFailed(
                f"{where}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY on the "
                "worker's endpoint"
            ) from None
        except BotoCoreError as err:
            raise UploadFailed(
                redact(
                    f"{where}: S3 endpoint {endpoint} unreachable ({err}); check AWS_ENDPOINT_URL and the "
                    "network, or ask for output.return 'base64'"
                )
            ) from None
