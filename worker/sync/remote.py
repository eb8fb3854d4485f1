"""Reading a release and its DVC objects from the remote: an S3 bucket (any S3-compatible endpoint) or a
local DVC remote folder. Only boto3 and the standard library: the worker image has no DVC.

A release location is `s3://bucket/prefix/releases/<channel>.json` or `/path/remote/releases/<channel>.json`;
the remote's root (where `files/md5/...` lives) is the release file's grandparent.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fuseline.core.errors import ConfigInvalid
from fuseline.core.release import Release
from fuseline.core.s3 import S3Config, make_client
from worker.sync.errors import ReleaseInvalid, RemoteMissing, RemoteUnavailable, SyncError


class Remote(Protocol):
    """What sync needs from a remote: whole small objects, sizes, and byte ranges of large ones."""

    def describe(self, key: str) -> str: ...

    def read_bytes(self, key: str) -> bytes: ...

    def size(self, key: str) -> int: ...

    def read_range_into(self, key: str, start: int, end: int, fd: int) -> int:
        """Write bytes [start, end) of `key` at offset `start` of the open file `fd`; return the count."""
        ...


# Bytes copied per read while streaming a ranged GET into the partial file.
_CHUNK = 1 << 20


def _pwrite_stream(read: Any, fd: int, offset: int, limit: int) -> int:
    written = 0
    while written < limit:
        chunk = read(min(_CHUNK, limit - written))
        if not chunk:
            break
        view = memoryview(chunk)
        while view:
            n = os.pwrite(fd, view, offset + written)
            view = view[n:]
            written += n
    return written


@dataclass
class LocalRemote:
    """A DVC local remote folder (the embedded default remote)."""

    root: Path

    def describe(self, key: str) -> str:
        return str(self.root / key)

    def _path(self, key: str) -> Path:
        path = self.root / key
        if not self.root.is_dir():
            raise RemoteUnavailable(
                f"remote folder {self.root} is not reachable (missing or not mounted); "
                "check FUSELINE_RELEASE and that the volume holding the remote is mounted"
            )
        return path

    def _unreadable(self, key: str, err: OSError) -> RemoteUnavailable:
        # A folder where a file should be, a file this user may not read (another user's 0600 file on a
        # shared remote), an I/O error: the remote's fault, reported with its path, never a traceback.
        return RemoteUnavailable(
            f"{self.describe(key)}: cannot read it ({err.strerror or type(err).__name__}); check that it is "
            "a file this user can read (publish writes remote files readable by all)"
        )

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise RemoteMissing(
                f"{self.describe(key)}: object not on the remote; publish again (dvc push) so the release "
                "names only pushed objects"
            ) from None
        except OSError as err:
            raise self._unreadable(key, err) from None

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise RemoteMissing(f"{self.describe(key)}: object not on the remote; run `dvc push`") from None
        except OSError as err:
            raise self._unreadable(key, err) from None

    def read_range_into(self, key: str, start: int, end: int, fd: int) -> int:
        try:
            src = self._path(key).open("rb")
        except FileNotFoundError:
            raise RemoteMissing(f"{self.describe(key)}: object not on the remote; run `dvc push`") from None
        except OSError as err:
            raise self._unreadable(key, err) from None
        with src:
            src.seek(start)
            return _pwrite_stream(src.read, fd, start, end - start)


class S3Remote:
    """An S3 remote (AWS S3, R2, MinIO, SeaweedFS), configured by the standard AWS_* variables
    (AWS_ENDPOINT_URL for a non-AWS endpoint) through fuseline.core.s3."""

    def __init__(self, bucket: str, prefix: str, client: Any | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                # Many parallel ranged GETs: a pool as large as the sync's worker threads allow.
                self._client = make_client(S3Config.from_env(), read_timeout=60, max_pool_connections=32)
            except ConfigInvalid as err:
                raise SyncError(f"s3://{self.bucket}: {err.message}") from None
        return self._client

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def describe(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _call(self, key: str, fn: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, Key=self._key(key), **kwargs)
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                raise RemoteMissing(
                    f"{self.describe(key)}: object not on the remote; publish again (dvc push) so the "
                    "release names only pushed objects"
                ) from None
            if code in ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                raise RemoteUnavailable(
                    f"{self.describe(key)}: {code}; check the bucket name and the AWS_* credentials"
                ) from None
            raise RemoteUnavailable(f"{self.describe(key)}: S3 error {code}: {err}") from None
        except BotoCoreError as err:
            endpoint = self.client.meta.endpoint_url
            raise RemoteUnavailable(
                f"{self.describe(key)}: remote at {endpoint} unreachable ({err}); check AWS_ENDPOINT_URL "
                "and the network. Templates already on the volume keep being served."
            ) from None

    def read_bytes(self, key: str) -> bytes:
        body = self._call(key, self.client.get_object)["Body"]
        return self._read_body(key, body.read)

    def _read_body(self, key: str, read: Any) -> Any:
        from botocore.exceptions import BotoCoreError

        try:
            return read()
        except (BotoCoreError, OSError) as err:
            raise RemoteUnavailable(f"{self.describe(key)}: transfer broke off ({err})") from None

    def size(self, key: str) -> int:
        return int(self._call(key, self.client.head_object)["ContentLength"])

    def read_range_into(self, key: str, start: int, end: int, fd: int) -> int:
        response = self._call(key, self.client.get_object, Range=f"bytes={start}-{end - 1}")
        body = response["Body"]
        # A server that ignores Range answers 200 with the whole object: writing that at `start` would
        # be silently wrong, so insist on the range asked for.
        if not str(response.get("ContentRange", "")).startswith(f"bytes {start}-{end - 1}/"):
            body.close()
            raise RemoteUnavailable(
                f"{self.describe(key)}: asked for bytes {start}-{end - 1}, the server answered "
                f"{response.get('ContentRange') or 'without Content-Range'}; the endpoint must support "
                "ranged GETs (S3 does)"
            )
        try:
            return self._read_body(key, lambda: _pwrite_stream(body.read, fd, start, end - start))
        finally:
            with contextlib.suppress(Exception):
                body.close()


def open_release(location: str) -> tuple[Remote, str]:
    """The remote holding `location` and the release's key relative to the remote root."""
    if location.startswith("s3://"):
        bucket, _, key = location[len("s3://") :].partition("/")
        parts = key.split("/")
        if not bucket or len(parts) < 2 or parts[-2] != "releases" or not parts[-1].endswith(".json"):
            raise ReleaseInvalid(
                f"release location {location!r} must look like s3://bucket/[prefix/]releases/<channel>.json"
            )
        return S3Remote(bucket, "/".join(parts[:-2])), "/".join(parts[-2:])
    path = Path(location.removeprefix("file:")).expanduser().absolute()
    if path.parent.name != "releases":
        raise ReleaseInvalid(
            f"release location {location!r} must be <remote folder>/releases/<channel>.json "
            "(objects are read from the remote folder under files/md5/)"
        )
    if path.is_dir():
        raise ReleaseInvalid(
            f"release location {location!r} is a folder, not a release file; FUSELINE_RELEASE (or "
            "--release) must name the file <remote folder>/releases/<channel>.json"
        )
    return LocalRemote(path.parent.parent), f"releases/{path.name}"


def read_release(remote: Remote, key: str) -> Release:
    raw = remote.read_bytes(key)
    try:
        return Release.from_json(raw)
    except ValueError as err:
        raise ReleaseInvalid(f"{remote.describe(key)}: not a valid release manifest: {err}") from None
