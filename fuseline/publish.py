"""Publishing: push built templates to a DVC remote, write release manifests, roll back, collect garbage.

The remote is DVC's own (`.dvc/config`): a local folder or an S3-compatible bucket. DVC pushes the
objects (`files/md5/...`) and the run-cache (`runs/...`); this module writes `releases/<channel>.json`
and its immutable history copy `releases/<channel>/<timestamp>.json` next to them, only after checking
that every object a release names is on the remote, so a reader never finds a release pointing at
missing files. Plain functions; `fuseline/cli_publish.py` is the command line over them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import yaml

from fuseline.manifest import ManifestError, ModelManifest
from fuseline.redact import redact
from fuseline.release import (
    TIMESTAMP_FORMAT,
    LoraSummary,
    Release,
    ReleasedTemplate,
    history_key,
    object_key,
    release_key,
)

DEFAULT_CHANNEL = "main"
MODELS_DIR = "artifacts/models"
OBJECTS_PREFIX = "files/md5/"
RELEASES_PREFIX = "releases/"
CHANNEL_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_CREDENTIAL_CODES = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden")
_MERGE_STAGE = re.compile(r"^merge@(?P<id>.+)$")
_VERIFY_STAGE = re.compile(r"^verify@(?P<id>.+)$")


class PublishError(Exception):
    """A publishing step failed; the message is one line naming the cause and the fix (never a secret)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(redact(message))
        self.code = code


# ------------------------------------------------------------------------------------------ remotes


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
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        config = repo.config
        remote_name = name or config["core"].get("remote")
        if not remote_name:
            raise PublishError(
                "no_remote",
                f"{root / '.dvc/config'}: no default remote and no --remote given "
                "(fix: `dvc remote default local` or pass --remote NAME)",
            )
        remotes = config.get("remote", {})
        if remote_name not in remotes:
            known = ", ".join(sorted(remotes)) or "none"
            raise PublishError(
                "unknown_remote",
                f"{root / '.dvc/config'}: no remote named {remote_name!r} (known: {known}; "
                f"fix: `dvc remote add {remote_name} URL` or pick a known one)",
            )
        section = dict(remotes[remote_name])
    url = str(section.pop("url"))
    return RemoteConfig(name=remote_name, url=url, options=section)


class ObjectStore(Protocol):
    """The few operations publishing needs on a remote, keyed by paths relative to the remote's root."""

    description: str

    def check(self) -> None: ...
    def exists(self, key: str) -> bool: ...
    def read(self, key: str) -> bytes | None: ...
    def write(self, key: str, data: bytes) -> None: ...
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
            raise PublishError(
                "remote_unwritable",
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
        # Write then rename: a reader sees the old file or the new one, never half of one.
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

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
    """An S3-compatible remote (AWS S3, R2, MinIO, SeaweedFS) through boto3, with the same settings and
    credentials DVC uses: the remote's `endpointurl`, `region`, `profile`, `access_key_id`,
    `secret_access_key` (best kept in .dvc/config.local), else boto3's own chain (AWS_* variables)."""

    def __init__(self, remote: RemoteConfig) -> None:
        import boto3
        from botocore.config import Config

        rest = remote.url[len("s3://") :]
        self.bucket, _, prefix = rest.partition("/")
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        opts = remote.options
        # None lets botocore read AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3, as DVC's s3fs does.
        self.endpoint = opts.get("endpointurl") or os.environ.get("AWS_ENDPOINT_URL_S3") or None
        self.endpoint = self.endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
        self.remote_name = remote.name
        self.description = f"s3://{self.bucket}/{self.prefix}" + (
            f" at {self.endpoint}" if self.endpoint else ""
        )
        session = boto3.session.Session(profile_name=opts.get("profile"))
        self.access_key = opts.get("access_key_id") or os.environ.get("AWS_ACCESS_KEY_ID") or ""
        self.client = session.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=opts.get("region"),
            aws_access_key_id=opts.get("access_key_id"),
            aws_secret_access_key=opts.get("secret_access_key"),
            aws_session_token=opts.get("session_token"),
            config=Config(
                # Path-style works on every S3-compatible store; virtual hosts need DNS per bucket.
                s3={"addressing_style": "path" if self.endpoint else "auto"},
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
            ),
        )

    def _key(self, key: str) -> str:
        return self.prefix + key

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except PublishError:
            raise
        except Exception as exc:
            raise self.explain(exc, action) from None

    def explain(self, exc: Exception, action: str) -> PublishError:
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
            return PublishError("no_credentials", f"{where}: no S3 credentials found (fix: {fix_creds})")
        if isinstance(exc, EndpointConnectionError | BotoConnectionError):
            return PublishError(
                "unreachable",
                f"{where}: cannot reach the S3 endpoint while trying to {action} (fix: check the network and "
                f"`dvc remote modify {self.remote_name} endpointurl URL`, or AWS_ENDPOINT_URL)",
            )
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchBucket", "404", "NotFound") and action == "check the bucket":
                return PublishError(
                    "no_bucket",
                    f"{where}: bucket {self.bucket!r} does not exist (fix: create it, or point the remote at "
                    f"an existing one with `dvc remote modify {self.remote_name} url s3://BUCKET/PREFIX`)",
                )
            if code == "NoSuchBucket":
                return PublishError("no_bucket", f"{where}: bucket {self.bucket!r} does not exist")
            if code in _CREDENTIAL_CODES or status == 403:
                key_hint = f"access key {self.access_key[:4]}…" if self.access_key else "the credentials"
                return PublishError(
                    "bad_credentials",
                    f"{where}: S3 refused {key_hint} ({code or status}) while trying to {action} "
                    f"(fix: {fix_creds})",
                )
            return PublishError("s3_error", f"{where}: S3 error {code or status} while trying to {action}")
        return PublishError("s3_error", f"{where}: {type(exc).__name__} while trying to {action}: {exc}")

    def check(self) -> None:
        with self._errors("check the bucket"):
            self.client.head_bucket(Bucket=self.bucket)
            # head_bucket may succeed for a key that can read the bucket's existence but not list it.
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        with self._errors(f"look up {key}"):
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
                return True
            except ClientError as exc:
                if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                    return False
                raise

    def read(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        with self._errors(f"read {key}"):
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise

    def write(self, key: str, data: bytes) -> None:
        with self._errors(f"write {key}"):
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, ContentType="application/json"
            )

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
                raise PublishError(
                    "delete_failed",
                    f"remote {self.remote_name!r} ({self.description}): could not delete {len(failed)} "
                    f"objects: {', '.join(failed[:5])}{' ...' if len(failed) > 5 else ''} "
                    "(fix: check the key may s3:DeleteObject on the bucket, then re-run `fuseline gc`)",
                )


def open_store(remote: RemoteConfig) -> ObjectStore:
    if remote.is_s3:
        return S3Store(remote)
    if "://" in remote.url:
        scheme = remote.url.split("://", 1)[0]
        raise PublishError(
            "unsupported_remote",
            f"remote {remote.name!r}: {scheme}:// remotes are not supported by fuseline publish "
            "(fix: use a local folder or an s3:// remote)",
        )
    return LocalStore(Path(remote.url))


# ----------------------------------------------------------------------------------- the build side


@dataclass(frozen=True)
class BuiltTemplate:
    """A template's model folder as dvc.lock records it."""

    id: str
    path: str
    dir_md5: str
    size: int
    nfiles: int


def read_lock(root: Path) -> dict[str, Any]:
    path = root / "dvc.lock"
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def catalog_template_ids(root: Path) -> list[str]:
    path = root / "templates.json"
    try:
        return sorted(json.loads(path.read_text())["templates"])
    except FileNotFoundError:
        raise PublishError("no_catalog", f"{path}: not found (fix: run from the project root)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise PublishError(
            "bad_catalog", f"{path}: cannot read templates ({exc}) (fix: `fuseline validate`)"
        ) from None


def built_templates(root: Path, template_ids: Iterable[str] | None = None) -> dict[str, BuiltTemplate]:
    """Each catalog template's model folder from dvc.lock (the `merge@<id>` stage's out)."""
    ids = list(template_ids) if template_ids is not None else catalog_template_ids(root)
    stages = read_lock(root).get("stages", {})
    found: dict[str, BuiltTemplate] = {}
    for template in ids:
        wanted = f"{MODELS_DIR}/{template}"
        outs = stages.get(f"merge@{template}", {}).get("outs", [])
        out = next((o for o in outs if o.get("path") == wanted), None)
        if out is None or not str(out.get("md5", "")).endswith(".dir"):
            raise PublishError(
                "not_built",
                f"{root / 'dvc.lock'}: no entry for {wanted} (stage merge@{template}) "
                f"(fix: `dvc repro merge@{template}`, or `dvc repro --pull` to restore it)",
            )
        found[template] = BuiltTemplate(
            id=template,
            path=wanted,
            dir_md5=out["md5"],
            size=int(out.get("size", 0)),
            nfiles=int(out.get("nfiles", 1)),
        )
    return found


def released_template(root: Path, built: BuiltTemplate) -> ReleasedTemplate:
    """The release entry of a built template: its hash and sizes plus its manifest's summary."""
    try:
        manifest = ModelManifest.read(root / built.path)
    except ManifestError as exc:
        fix = f"(fix: `dvc checkout {built.path}` or `dvc repro`)"
        raise PublishError("bad_manifest", f"{exc} {fix}") from None
    if manifest.template != built.id:
        raise PublishError(
            "bad_manifest",
            f"{root / built.path}/fuseline.json: names template {manifest.template!r}, expected {built.id!r} "
            f"(fix: `dvc repro merge@{built.id}`)",
        )
    return ReleasedTemplate(
        dir_md5=built.dir_md5,
        path=built.path,
        size=built.size,
        nfiles=built.nfiles,
        spec_hash=manifest.spec_hash,
        checkpoint=manifest.checkpoint.source,
        loras=[LoraSummary(source=x.source, sha256=x.sha256, scale=x.scale) for x in manifest.loras],
        prediction_type=manifest.prediction_type,
    )


def git_commit(root: Path) -> str | None:
    """HEAD's commit, or None when `root` is not in a git work tree (or git is missing)."""
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "--verify", "-q", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def _dvc_bin() -> str:
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.is_file() else "dvc"


def run_dvc(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "DVC_NO_ANALYTICS": "1", **(env or {})}
    return subprocess.run(
        [_dvc_bin(), *args], cwd=root, env=full_env, capture_output=True, text=True, check=False
    )


def stale_templates(root: Path, template_ids: Iterable[str]) -> list[str]:
    """Templates whose merge stage `dvc status` reports changed (dvc.lock does not match the workspace)."""
    targets = [f"merge@{t}" for t in template_ids]
    proc = run_dvc(root, "status", "--json", *targets)
    if proc.returncode != 0:
        raise PublishError("dvc_failed", f"`dvc status` failed in {root}: {_last_line(proc.stderr)}")
    changed = json.loads(proc.stdout or "{}")
    return sorted(m["id"] for name in changed if (m := _MERGE_STAGE.match(name)))


def unverified_templates(root: Path, template_ids: Iterable[str]) -> list[str]:
    """Templates whose `verify@<id>` stage has no dvc.lock entry or is out of date.

    DVC locks `merge@<id>` as soon as the merge finishes, before verify runs; a merge whose check then
    failed (or never ran) is locked all the same. Only a locked, up-to-date verify says the model passed.
    """
    ids = list(template_ids)
    locked = read_lock(root).get("stages", {})
    missing = {t for t in ids if f"verify@{t}" not in locked}
    targets = [f"verify@{t}" for t in ids if t not in missing]
    changed: dict[str, Any] = {}
    if targets:
        proc = run_dvc(root, "status", "--json", *targets)
        if proc.returncode != 0:
            raise PublishError("dvc_failed", f"`dvc status` failed in {root}: {_last_line(proc.stderr)}")
        changed = json.loads(proc.stdout or "{}")
    stale = {m["id"] for name in changed if (m := _VERIFY_STAGE.match(name))}
    return sorted(missing | stale)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in redact(text).splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def push(root: Path, remote: RemoteConfig) -> None:
    """`dvc push --run-cache` to `remote`: the outputs and the run-cache entries of every stage."""
    proc = run_dvc(root, "push", "--run-cache", "-r", remote.name)
    if proc.returncode != 0:
        raise PublishError(
            "push_failed",
            f"`dvc push --run-cache -r {remote.name}` failed: {_last_line(proc.stderr or proc.stdout)} "
            "(fix: the cause above, then re-run `fuseline publish`; the current release is untouched)",
        )


# ------------------------------------------------------------------------------ what would rebuild

# `dvc status` entries that mean a stage's definition or inputs changed. A fresh CI clone has no outputs,
# so "deleted" outs, and "deleted" deps that another stage produces, are not changes.
_DEFINITION_CHANGES = ("changed command", "changed params")


def changed_templates(status: dict[str, Any], catalog: dict[str, Any], produced: set[str]) -> list[str]:
    """Templates whose stages would compute something new, from `dvc status --json` output.

    `produced` holds the paths some stage outputs (their absence in a fresh clone is not a change).
    A changed `convert@<checkpoint>` rebuilds the templates on that checkpoint, a changed `vae` all."""
    templates: dict[str, Any] = catalog.get("templates", {})
    changed: set[str] = set()
    for stage, entries in status.items():
        if not _stage_inputs_changed(entries, produced):
            continue
        kind, _, key = stage.partition("@")
        if kind in ("merge", "verify") and key in templates:
            changed.add(key)
        elif kind == "convert":
            changed.update(t for t, spec in templates.items() if spec.get("checkpoint") == key)
        elif stage == "vae":
            changed.update(templates)
    return sorted(changed)


def _stage_inputs_changed(entries: Any, produced: set[str]) -> bool:
    if not isinstance(entries, list):
        return True  # an unexpected shape: rebuilding is the safe answer
    for entry in entries:
        if isinstance(entry, str):  # "always changed", "changed checksum": the stage must run
            return True
        if not isinstance(entry, dict):
            return True
        for what, detail in entry.items():
            if what in _DEFINITION_CHANGES:
                return True
            if what == "changed deps":
                for path, state in detail.items():
                    if not (state == "deleted" and path in produced):
                        return True
    return False


def produced_paths(root: Path) -> set[str]:
    """Every path a stage of the pipeline outputs (outs, metrics, plots), as dvc.yaml resolves them."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {out.def_path for stage in repo.index.stages for out in stage.outs}


def project_changed_templates(root: Path) -> list[str]:
    root = Path(root).resolve()
    proc = run_dvc(root, "status", "--json")
    if proc.returncode != 0:
        raise PublishError("dvc_failed", f"`dvc status` failed in {root}: {_last_line(proc.stderr)}")
    catalog = json.loads((root / "templates.json").read_text())
    return changed_templates(json.loads(proc.stdout or "{}"), catalog, produced_paths(root))


def print_changed_templates(root: Path | str = ".") -> None:
    """Print the templates to rebuild as a JSON list (what CI feeds its job matrix)."""
    print(json.dumps(project_changed_templates(Path(root))))


# ------------------------------------------------------------------------------------- verification


def dir_listing(store: ObjectStore, dir_md5: str, local_cache: Path | None = None) -> list[dict[str, str]]:
    """The `[{"md5", "relpath"}]` listing of a folder object: from the remote, else from a local cache."""
    data = store.read(object_key(dir_md5))
    if data is None and local_cache is not None:
        path = local_cache / "files/md5" / dir_md5[:2] / dir_md5[2:]
        data = path.read_bytes() if path.is_file() else None
    if data is None:
        raise PublishError(
            "missing_object",
            f"{store.description}: folder listing {object_key(dir_md5)} is missing "
            "(fix: `fuseline publish` again to push it)",
        )
    return json.loads(data)


def missing_objects(store: ObjectStore, dir_md5s: Iterable[str]) -> list[str]:
    """Keys of every object the folders need (their listings and each file) that the remote lacks."""
    present = set(store.keys(OBJECTS_PREFIX))
    missing: list[str] = []
    for dir_md5 in dir_md5s:
        if object_key(dir_md5) not in present:
            missing.append(object_key(dir_md5))
            continue
        for entry in dir_listing(store, dir_md5):
            key = object_key(entry["md5"])
            if key not in present:
                missing.append(key)
    return sorted(set(missing))


# ---------------------------------------------------------------------------------------- releases


def _check_channel(channel: str) -> None:
    if not CHANNEL_PATTERN.match(channel):
        raise PublishError(
            "bad_channel",
            f"channel {channel!r}: use lowercase letters, digits and hyphens (it names remote keys)",
        )


def _free_timestamp(store: ObjectStore, channel: str, now: datetime) -> str:
    # History copies are immutable: two publishes in one second get distinct names, never an overwrite.
    for offset in range(120):
        stamp = (now + timedelta(seconds=offset)).strftime(TIMESTAMP_FORMAT)
        if not store.exists(history_key(channel, stamp)):
            return stamp
    raise PublishError("busy", f"channel {channel!r}: 120 releases within two minutes; wait and retry")


def write_release(store: ObjectStore, release: Release) -> None:
    """History copy first, then the channel pointer: a crash in between leaves the old release current."""
    data = release.to_json().encode()
    store.write(history_key(release.channel, release.created), data)
    store.write(release_key(release.channel), data)


@dataclass(frozen=True)
class PublishResult:
    release: Release
    remote: str
    pushed: bool


def publish(
    root: Path,
    *,
    remote_name: str | None = None,
    channel: str = DEFAULT_CHANNEL,
    do_push: bool = True,
    now: datetime | None = None,
) -> PublishResult:
    """Push the built templates (and the run-cache), check every object is on the remote, then write the
    channel's release. Raises PublishError with nothing written when any step fails."""
    root = Path(root).resolve()
    _check_channel(channel)
    remote = read_remote_config(root, remote_name)
    store = open_store(remote)
    store.check()
    built = built_templates(root)
    stale = stale_templates(root, built)
    if stale:
        raise PublishError(
            "stale",
            f"{root / 'dvc.lock'}: out of date for {', '.join(stale)} "
            "(fix: `dvc repro` (or `dvc repro --pull`) and commit dvc.lock, then publish)",
        )
    unverified = unverified_templates(root, built)
    if unverified:
        raise PublishError(
            "unverified",
            f"{root / 'dvc.lock'}: {', '.join(unverified)} not verified (verify stage failed, never ran "
            f"or is out of date) (fix: `dvc repro {' '.join(f'verify@{t}' for t in unverified)}`, "
            "check it passes, commit dvc.lock, then publish)",
        )
    templates = {t: released_template(root, b) for t, b in built.items()}
    dir_md5s = sorted(b.dir_md5 for b in built.values())
    if do_push:
        push(root, remote)
    missing = missing_objects(store, dir_md5s)
    if missing:
        # DVC uploads a folder's `.dir` listing after its files and, when the listing is on the remote,
        # takes the whole folder as present. So files missing under a present listing (deleted on the
        # remote) are never re-sent: the listing has to go first.
        orphaned = [d for d in dir_md5s if object_key(d) not in missing and store.exists(object_key(d))]
        lost = [d for d in orphaned if any(object_key(e["md5"]) in missing for e in dir_listing(store, d))]
        fix = (
            f"delete {', '.join(object_key(d) for d in lost)} from the remote so DVC re-sends those folders, "
            "then re-run `fuseline publish`"
            if lost
            else "re-run `fuseline publish`"
        )
        raise PublishError(
            "incomplete_push",
            f"{store.description}: {len(missing)} objects of the release are not on the remote "
            f"(first: {missing[0]}) (fix: {fix}; the current release is untouched)",
        )
    created = _free_timestamp(store, channel, now or datetime.now(UTC))
    release = Release(channel=channel, created=created, git_commit=git_commit(root), templates=templates)
    write_release(store, release)
    return PublishResult(release=release, remote=remote.name, pushed=do_push)


def load_release(store: ObjectStore, key: str, data: bytes) -> Release:
    """`data` (read from `key`) as a Release; a corrupt or foreign file is a PublishError naming the key."""
    from pydantic import ValidationError

    try:
        return Release.from_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(document)"
        fix = (
            "delete it from the remote; the channel's pointer is a separate file"
            if "/" in key[len(RELEASES_PREFIX) :]
            else "`fuseline release rollback --to TIMESTAMP` to a good history copy"
        )
        raise PublishError(
            "bad_release",
            f"{store.description}: {key}: not a valid release manifest ({where}: {first['msg']}) "
            f"(fix: {fix})",
        ) from None


def read_release(store: ObjectStore, channel: str) -> Release | None:
    key = release_key(channel)
    data = store.read(key)
    return load_release(store, key, data) if data is not None else None


def release_history(store: ObjectStore, channel: str | None = None) -> list[Release]:
    """Every release in the history (of one channel, or of all), oldest first."""
    prefix = f"{RELEASES_PREFIX}{channel}/" if channel else RELEASES_PREFIX
    releases = []
    for key in store.keys(prefix):
        rel = key[len(RELEASES_PREFIX) :]
        if "/" not in rel or not rel.endswith(".json"):
            continue  # a channel pointer, not a history copy
        data = store.read(key)
        if data is not None:
            releases.append(load_release(store, key, data))
    return sorted(releases, key=lambda r: (r.channel, r.created))


def current_releases(store: ObjectStore) -> dict[str, Release]:
    """The pointer of every channel on the remote."""
    found = {}
    for key in store.keys(RELEASES_PREFIX):
        rel = key[len(RELEASES_PREFIX) :]
        if "/" in rel or not rel.endswith(".json"):
            continue
        data = store.read(key)
        if data is not None:
            release = load_release(store, key, data)
            found[release.channel] = release
    return found


def rollback(store: ObjectStore, channel: str, to: str) -> Release:
    """Make the history release `to` (its timestamp) the channel's current one again, after checking its
    objects are still all on the remote."""
    _check_channel(channel)
    data = store.read(history_key(channel, to))
    if data is None:
        known = ", ".join(r.created for r in release_history(store, channel)) or "none"
        raise PublishError(
            "no_such_release",
            f"{store.description}: no release {to!r} in channel {channel!r} (known: {known}; "
            "fix: pick one from `fuseline release list`)",
        )
    release = load_release(store, history_key(channel, to), data)
    missing = missing_objects(store, (t.dir_md5 for t in release.templates.values()))
    if missing:
        raise PublishError(
            "incomplete_release",
            f"{store.description}: release {to} lacks {len(missing)} objects (first: {missing[0]}); "
            "not rolled back (fix: rebuild and publish instead)",
        )
    store.write(release_key(channel), data)
    return release


# ----------------------------------------------------------------------------------------------- gc


@dataclass(frozen=True)
class LocalGarbage:
    """Lock entries of stages the pipeline no longer defines (removed templates or checkpoints) and their
    outputs in the workspace."""

    stages: list[str]
    paths: list[str]


def defined_stages(root: Path) -> set[str]:
    from dvc.repo import Repo

    if not (root / "dvc.yaml").is_file():
        # Without the pipeline every lock entry would look orphaned: refuse rather than wipe the lock.
        raise PublishError("no_pipeline", f"{root / 'dvc.yaml'}: not found (fix: run from the project root)")
    with Repo(str(root)) as repo:
        # dvc.lock names a stage by its bare name (`merge@alpha`); `addressing` would prefix the dvc.yaml
        # path relative to the current directory.
        return {stage.name for stage in repo.index.stages if getattr(stage, "name", None)}


def find_local_garbage(root: Path) -> LocalGarbage:
    root = Path(root).resolve()
    lock_stages = read_lock(root).get("stages", {})
    defined = defined_stages(root)
    orphans = sorted(name for name in lock_stages if name not in defined)
    paths = sorted(
        {
            entry["path"]
            for name in orphans
            for kind in ("outs", "metrics", "plots")
            for entry in lock_stages[name].get(kind, []) or []
            if isinstance(entry, dict) and "path" in entry
        }
    )
    return LocalGarbage(stages=orphans, paths=paths)


def remove_local_garbage(root: Path, garbage: LocalGarbage) -> None:
    from dvc.utils.serialize import modify_yaml

    root = Path(root).resolve()
    for rel in garbage.paths:
        path = (root / rel).resolve()
        if root not in path.parents:
            raise PublishError("unsafe_path", f"{root / 'dvc.lock'}: out {rel!r} lies outside the project")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        # Leave no empty parent folders behind (artifacts/verify/<id>/ after its files go).
        parent = path.parent
        while parent != root and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
    if garbage.stages:
        # DVC's own YAML round-trip keeps dvc.lock's formatting for the entries that stay.
        with modify_yaml(str(root / "dvc.lock")) as lock:
            for name in garbage.stages:
                lock["stages"].pop(name, None)


def _lock_object_refs(root: Path) -> tuple[set[str], set[str]]:
    """(file md5s, .dir md5s) of every output dvc.lock records."""
    files: set[str] = set()
    dirs: set[str] = set()
    for stage in read_lock(root).get("stages", {}).values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []) or []:
                md5 = isinstance(entry, dict) and entry.get("md5")
                if md5:
                    (dirs if md5.endswith(".dir") else files).add(md5)
    return files, dirs


def referenced_objects(root: Path, store: ObjectStore) -> set[str]:
    """Keys under files/md5/ that some release in the history, some channel's current release, or some
    output in dvc.lock needs."""
    local_cache = root / ".dvc" / "cache"
    dirs: set[str] = set()
    for release in [*release_history(store), *current_releases(store).values()]:
        dirs.update(t.dir_md5 for t in release.templates.values())
    files, lock_dirs = _lock_object_refs(root)
    dirs |= lock_dirs
    keys = {object_key(m) for m in files}
    for dir_md5 in dirs:
        keys.add(object_key(dir_md5))
        keys.update(object_key(e["md5"]) for e in dir_listing(store, dir_md5, local_cache))
    return keys


def find_remote_garbage(root: Path, store: ObjectStore) -> list[str]:
    """Objects on the remote that nothing references. Only files/md5/ is considered: the run-cache
    (runs/) and the releases (releases/) are never touched."""
    referenced = referenced_objects(Path(root).resolve(), store)
    return sorted(k for k in store.keys(OBJECTS_PREFIX) if k not in referenced)
