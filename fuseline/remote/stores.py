"""DVC remotes as publishing sees them: the remote's configuration as DVC resolves it, and a small object
store over it (a local folder, or an S3-compatible bucket through fuseline.core.s3), keyed by paths
relative to the remote's root."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fuseline.core.errors import ConfigInvalid
from fuseline.core.files import atomic_copy, atomic_create, atomic_write
from fuseline.core.s3 import S3Config, make_client
from fuseline.remote.errors import RemoteError

_CREDENTIAL_CODES = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden")
# A local remote's files are read by every user of the shared folder (the workers syncing from it among
# them) and never edited in place, only replaced by rename: read-only for all, as DVC writes its objects.
LOCAL_FILE_MODE = 0o444


@dataclass(frozen=True)
class RemoteConfig:
    """One `[remote "<name>"]` section of the merged DVC config (.dvc/config + config.local + env)."""

    name: str
    url: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def is_s3(self) -> bool:
        return self.url.startswith("s3://")


def read_remote_config(root: Path, name: str | None = None) -> RemoteConfig:
    """The remote `name` (DVC's default remote when None) as DVC itself resolves it: relative local paths
    are made absolute against the config file they came from, `--local` settings override committed ones."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        repo = Repo(str(root))
    except NotDvcRepoError:
        # DVC's own exception is no coded error: a stage whose upstream failed would end in a traceback
        # instead of its source's error (stages/sources/archived.py turns RemoteError into that).
        raise RemoteError(
            "NOT_A_PROJECT",
            f"{root}: not a DVC project, so it has no remote "
            "(fix: run from the project's root, or `dvc init`)",
        ) from None
    with repo:
        config = repo.config
        remote_name = name or config["core"].get("remote")
        if not remote_name:
            raise RemoteError(
                "NO_REMOTE",
                f"{root / '.dvc/config'}: no default remote and no --remote given "
                "(fix: `dvc remote default local` or pass --remote NAME)",
            )
        remotes = config.get("remote", {})
        if remote_name not in remotes:
            known = ", ".join(sorted(remotes)) or "none"
            raise RemoteError(
                "UNKNOWN_REMOTE",
                f"{root / '.dvc/config'}: no remote named {remote_name!r} (known: {known}; "
                f"fix: `dvc remote add {remote_name} URL` or pick a known one)",
            )
        section = dict(remotes[remote_name])
    url = str(section.pop("url"))
    return RemoteConfig(name=remote_name, url=url, options=section)


class ObjectStore(Protocol):
    """The few operations publishing and the source archive need on a remote, keyed by paths relative to
    the remote's root."""

    description: str

    def check(self) -> None: ...
    def exists(self, key: str) -> bool: ...
    def read(self, key: str) -> bytes | None: ...
    def write(self, key: str, data: bytes) -> None: ...
    def create(self, key: str, data: bytes) -> bool:
        """Write `data` at `key` only if nothing is there: True when written, False when `key` exists
        (it is never overwritten, also when many writers race for it)."""
        ...

    def upload(self, key: str, path: Path) -> None:
        """Store the file at `path` as `key`, streaming (files of many GB), replacing what is there."""
        ...

    def download(self, key: str, path: Path) -> bool:
        """Write `key` to the file `path`, streaming; False (and no file) when `key` is not there."""
        ...

    def keys(self, prefix: str) -> Iterator[str]: ...
    def delete(self, keys: Iterable[str]) -> None: ...


class LocalStore:
    """A DVC local remote: a plain folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.description = str(self.root)

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RemoteError(
                "REMOTE_UNWRITABLE",
                f"cannot create the local remote folder {self.root}: {exc.strerror} "
                "(fix: `dvc remote modify local url PATH` to a writable folder)",
            ) from None

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def read(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, key: str, data: bytes) -> None:
        atomic_write(self.root / key, data, mode=LOCAL_FILE_MODE)

    def create(self, key: str, data: bytes) -> bool:
        return atomic_create(self.root / key, data, mode=LOCAL_FILE_MODE)

    def upload(self, key: str, path: Path) -> None:
        atomic_copy(path, self.root / key, mode=LOCAL_FILE_MODE)

    def download(self, key: str, path: Path) -> bool:
        if not (self.root / key).is_file():
            return False
        atomic_copy(self.root / key, path)
        return True

    def keys(self, prefix: str) -> Iterator[str]:
        base = self.root / prefix
        if not base.is_dir():
            return
        for path in sorted(base.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                yield path.relative_to(self.root).as_posix()

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            with contextlib.suppress(FileNotFoundError):
                (self.root / key).unlink()


class S3Store:
    """An S3-compatible remote (AWS S3, R2, MinIO, SeaweedFS) with the settings and credentials DVC uses:
    the remote's own options (endpointurl, region, profile, credentialpath, configpath, keys, use_ssl,
    ssl_verify, sse, sse_kms_key_id, acl; secrets best kept in .dvc/config.local), else boto3's chain (the
    AWS_* variables), through the one client factory (fuseline.core.s3)."""

    def __init__(self, remote: RemoteConfig) -> None:
        rest = remote.url[len("s3://") :]
        self.bucket, _, prefix = rest.partition("/")
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.remote_name = remote.name
        try:
            self.config = S3Config.from_dvc_remote(remote.options)
            self.client = make_client(self.config)
        except ConfigInvalid as err:
            raise RemoteError(
                "REMOTE_CONFIG", f"remote {remote.name!r} ({remote.url}): {err.message}"
            ) from None
        self.endpoint = self.config.endpoint()
        self.description = f"s3://{self.bucket}/{self.prefix}" + (
            f" at {self.endpoint}" if self.endpoint else ""
        )
        self.access_key = self.config.access_key_id or os.environ.get("AWS_ACCESS_KEY_ID") or ""

    def _key(self, key: str) -> str:
        return self.prefix + key

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except RemoteError:
            raise
        except Exception as exc:
            raise self.explain(exc, action) from None

    def explain(self, exc: Exception, action: str) -> RemoteError:
        """One line: what went wrong talking to S3 and how to fix it (never the secret key)."""
        from botocore.exceptions import (
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )
        from botocore.exceptions import ConnectionError as BotoConnectionError

        where = f"remote {self.remote_name!r} ({self.description})"
        fix_creds = (
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
            f"`dvc remote modify --local {self.remote_name} access_key_id ...` and secret_access_key"
        )
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return RemoteError("NO_CREDENTIALS", f"{where}: no S3 credentials found (fix: {fix_creds})")
        if isinstance(exc, EndpointConnectionError | BotoConnectionError):
            return RemoteError(
                "UNREACHABLE",
                f"{where}: cannot reach the S3 endpoint while trying to {action} (fix: check the network and "
                f"`dvc remote modify {self.remote_name} endpointurl URL`, or AWS_ENDPOINT_URL)",
            )
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchBucket", "404", "NotFound") and action == "check the bucket":
                return RemoteError(
                    "NO_BUCKET",
                    f"{where}: bucket {self.bucket!r} does not exist (fix: create it, or point the remote at "
                    f"an existing one with `dvc remote modify {self.remote_name} url s3://BUCKET/PREFIX`)",
                )
            if code == "NoSuchBucket":
                return RemoteError("NO_BUCKET", f"{where}: bucket {self.bucket!r} does not exist")
            if code in _CREDENTIAL_CODES or status == 403:
                key_hint = f"access key {self.access_key[:4]}…" if self.access_key else "the credentials"
                return RemoteError(
                    "BAD_CREDENTIALS",
                    f"{where}: S3 refused {key_hint} ({code or status}) while trying to {action} "
                    f"(fix: {fix_creds})",
                )
            return RemoteError("S3_ERROR", f"{where}: S3 error {code or status} while trying to {action}")
        return RemoteError("S3_ERROR", f"{where}: {type(exc).__name__} while trying to {action}: {exc}")

    def check(self) -> None:
        with self._errors("check the bucket"):
            self.client.head_bucket(Bucket=self.bucket)
            # head_bucket may succeed for a key that can read the bucket's existence but not list it.
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        with self._errors(f"look up {key}"):
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._key(key), **self.config.read_args)
                return True
            except ClientError as exc:
                if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                    return False
                raise

    def read(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        with self._errors(f"read {key}"):
            try:
                return self.client.get_object(
                    Bucket=self.bucket, Key=self._key(key), **self.config.read_args
                )["Body"].read()
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise

    def write(self, key: str, data: bytes) -> None:
        with self._errors(f"write {key}"):
            self.client.put_object(
                Bucket=self.bucket,
                Key=self._key(key),
                Body=data,
                ContentType="application/json",
                **self.config.write_args,
            )

    def create(self, key: str, data: bytes) -> bool:
        """A conditional put (`If-None-Match: *`): the store refuses it with 412 when the key exists, and
        decides between concurrent ones itself (AWS S3 since 2024, SeaweedFS (tested), MinIO, R2). 409 is
        AWS's answer to a conditional put racing another one: the key is as good as taken."""
        from botocore.exceptions import ClientError

        with self._errors(f"create {key}"):
            try:
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=self._key(key),
                    Body=data,
                    ContentType="application/json",
                    IfNoneMatch="*",
                    **self.config.write_args,
                )
            except ClientError as exc:
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return False
                raise
        return True

    def upload(self, key: str, path: Path) -> None:
        # s3transfer: multipart and parallel for large files, one put for small ones.
        with self._errors(f"upload {key}"):
            self.client.upload_file(
                str(path), self.bucket, self._key(key), ExtraArgs=dict(self.config.write_args) or None
            )

    def download(self, key: str, path: Path) -> bool:
        from botocore.exceptions import ClientError

        with self._errors(f"download {key}"):
            try:
                # s3transfer writes to a temporary name beside `path` and renames it when complete.
                self.client.download_file(
                    self.bucket, self._key(key), str(path), ExtraArgs=dict(self.config.read_args) or None
                )
            except ClientError as exc:
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status == 404 or exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return False
                raise
        return True

    def keys(self, prefix: str) -> Iterator[str]:
        with self._errors(f"list {prefix}"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(prefix)
            )
            for page in pages:
                for item in page.get("Contents", []):
                    yield item["Key"][len(self.prefix) :]

    def delete(self, keys: Iterable[str]) -> None:
        batch = [{"Key": self._key(k)} for k in keys]
        with self._errors("delete objects"):
            failed: list[str] = []
            for start in range(0, len(batch), 1000):  # the S3 API limit per request
                answer = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch[start : start + 1000], "Quiet": True}
                )
                # Quiet mode answers 200 with only the failures listed: the call raising is not enough.
                failed += [f"{e.get('Key')} ({e.get('Code')})" for e in answer.get("Errors", [])]
            if failed:
                raise RemoteError(
                    "DELETE_FAILED",
                    f"remote {self.remote_name!r} ({self.description}): could not delete {len(failed)} "
                    f"objects: {', '.join(failed[:5])}{' ...' if len(failed) > 5 else ''} "
                    "(fix: check the key may s3:DeleteObject on the bucket, then re-run `fuseline gc`)",
                )


def open_store(remote: RemoteConfig) -> ObjectStore:
    if remote.is_s3:
        return S3Store(remote)
    if "://" in remote.url:
        scheme = remote.url.split("://", 1)[0]
        raise RemoteError(
            "UNSUPPORTED_REMOTE",
            f"remote {remote.name!r}: {scheme}:// remotes are not supported by fuseline publish "
            "(fix: use a local folder or an s3:// remote)",
        )
    return LocalStore(Path(remote.url))
