"""Fixtures for the sync tests: a real DVC remote (made with `dvc add` + `dvc push`, to a local folder and to
SeaweedFS S3) holding model folders of two templates and a second version of one, release manifests on it,
and a recording reverse proxy in front of SeaweedFS.

Why a proxy to count requests: SeaweedFS keeps no request log we can read, and counting in the client
would trust the code under test. The proxy sits between every sync process and the server and records each
request it forwards, so "each object fetched once" is counted where the bytes leave the server. It can
also slow responses down (to kill a sync mid-object) and stop (a server that is down, as the client sees
it: connection refused).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fuseline.core.manifest import CheckpointRef, ModelManifest, VaeRef
from fuseline.core.release import Release, ReleasedTemplate, release_key
from testkit.servers import SeaweedS3

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
DVC = str(Path(sys.executable).parent / "dvc")
BIG = 3 * (1 << 20) + 12345  # a multi-MB, part-straddling "UNet"
SHARED = (1 << 20) + 7  # a "text encoder" both templates share
PART = 256 << 10  # part size the tests sync with: the big object is 13 ranged GETs


# ------------------------------------------------------------------------------------- the DVC remote


def _rand(seed: str, size: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha512(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def _write_model(folder: Path, template: str, unet_seed: str) -> None:
    files = {
        "unet/diffusion_pytorch_model.fp16.safetensors": _rand(unet_seed, BIG),
        "text_encoder/model.fp16.safetensors": _rand("shared-te", SHARED),
        "vae/diffusion_pytorch_model.fp16.safetensors": _rand("shared-vae", 200_000),
        "vae/config.json": b'{"_class_name": "AutoencoderKL"}\n',
        "model_index.json": b'{"_class_name": "StableDiffusionXLPipeline"}\n',
        "scheduler/scheduler_config.json": b"{}\n",  # same bytes in both templates
        "tokenizer/special_tokens_map.json": b"",  # an empty file
    }
    shutil.rmtree(folder, ignore_errors=True)
    for rel, data in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    ModelManifest(
        template=template,
        checkpoint=CheckpointRef(id="tiny", source="file:tiny.safetensors", sha256="a" * 64),
        loras=[],
        vae=VaeRef(source="checkpoint"),
        prediction_type="epsilon",
        spec_hash=hashlib.sha256(unet_seed.encode()).hexdigest(),
        fuseline_version="test",
    ).write(folder)


def _listing_of(folder: Path) -> dict[str, tuple[int, str]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, hashlib.md5(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@dataclass
class Version:
    template: str
    released: ReleasedTemplate
    files: dict[str, tuple[int, str]]  # relpath -> (size, md5): what a complete folder holds

    @property
    def dir_md5(self) -> str:
        return self.released.dir_md5

    @property
    def big_md5(self) -> str:
        return self.files["unet/diffusion_pytorch_model.fp16.safetensors"][1]


@dataclass
class DvcRemote:
    local: Path  # the local DVC remote folder (also the source of S3 clones)
    bucket: str  # the same objects pushed to SeaweedFS by dvc
    a1: Version
    b1: Version
    a2: Version


def _dvc(project: Path, *args: str, env: dict[str, str]) -> str:
    done = subprocess.run([DVC, *args], cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def released_entry(project: Path, name: str) -> ReleasedTemplate:
    """The release entry publishing derives from `<name>.dvc` and the folder's fuseline.json."""
    text = (project / f"{name}.dvc").read_text()
    # The .dvc file is YAML; the fields we need are plain `key: value` lines.
    fields = dict(line.strip("- ").split(": ", 1) for line in text.splitlines() if ": " in line)
    manifest = ModelManifest.read(project / name)
    return ReleasedTemplate(
        dir_md5=fields["md5"],
        path=name,
        size=int(fields["size"]),
        nfiles=int(fields["nfiles"]),
        spec_hash=manifest.spec_hash,
        checkpoint=manifest.checkpoint.source,
    )


def write_release(remote_root: Path, channel: str, templates: dict[str, ReleasedTemplate]) -> str:
    """What publishing writes: releases/<channel>.json under the remote root. Returns its path."""
    release = Release(channel=channel, created=time.strftime("%Y%m%dT%H%M%SZ"), templates=templates)
    path = remote_root / release_key(channel)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(release.to_json())
    return str(path)


def put_release(s3: SeaweedS3, bucket: str, channel: str, templates: dict[str, ReleasedTemplate]) -> str:
    release = Release(channel=channel, created=time.strftime("%Y%m%dT%H%M%SZ"), templates=templates)
    s3.client().put_object(Bucket=bucket, Key=release_key(channel), Body=release.to_json().encode())
    return f"s3://{bucket}/{release_key(channel)}"


@pytest.fixture(scope="session")
def dvc_remote(s3_server: SeaweedS3, tmp_path_factory: pytest.TempPathFactory) -> DvcRemote:
    """Two templates (a, b) sharing text encoder, VAE and small files, and a second version of a, all
    `dvc add`-ed and `dvc push`-ed to a local remote and to S3 by DVC itself."""
    base = tmp_path_factory.mktemp("dvc")
    project, local = base / "project", base / "remote"
    project.mkdir()
    env = os.environ | s3_server.env() | {"DVC_NO_ANALYTICS": "1"}
    bucket = s3_server.make_bucket(f"dvc-{uuid.uuid4().hex[:12]}")
    _dvc(project, "init", "--no-scm", "-q", env=env)
    # What `dvc remote add local ...`, `dvc remote add s3 ...` and `dvc remote modify s3 endpointurl ...`
    # write, written at once (each dvc call costs ~3 s on 2 cores).
    with (project / ".dvc" / "config").open("a") as config:
        config.write(
            f"['remote \"local\"']\n    url = {local}\n"
            f"['remote \"s3\"']\n    url = s3://{bucket}\n    endpointurl = {s3_server.endpoint_url}\n"
        )
    versions = {}
    for name, template in (("a1", "tpl-a"), ("b1", "tpl-b"), ("a2", "tpl-a")):
        _write_model(project / name, template, name)
    _dvc(project, "add", "-q", "a1", "b1", "a2", env=env)
    for name, template in (("a1", "tpl-a"), ("b1", "tpl-b"), ("a2", "tpl-a")):
        versions[name] = Version(template, released_entry(project, name), _listing_of(project / name))
    for remote in ("local", "s3"):
        _dvc(project, "push", "-q", "-r", remote, env=env)
    return DvcRemote(local, bucket, versions["a1"], versions["b1"], versions["a2"])


def clone_bucket(s3: SeaweedS3, source: str) -> str:
    """A fresh bucket with every object of `source` (server-side copies): for tests that damage it."""
    client = s3.client()
    bucket = s3.make_bucket(f"clone-{uuid.uuid4().hex[:12]}")
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=source):
        for obj in page.get("Contents", []):
            client.copy_object(
                Bucket=bucket, Key=obj["Key"], CopySource={"Bucket": source, "Key": obj["Key"]}
            )
    return bucket


# --------------------------------------------------------------------------------- recording proxy


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    range: str | None
    status: int
    sent: int


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def log_message(self, *args: object) -> None:
        pass

    def _forward(self) -> None:
        owner = self.server.owner
        owner.begin()
        try:
            self._relay(owner)
        finally:
            owner.end()

    def _relay(self, owner: RecordingProxy) -> None:
        for part, seconds in owner.request_delays.items():
            if part in self.path:
                time.sleep(seconds)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        upstream = http.client.HTTPConnection("127.0.0.1", owner.upstream_port, timeout=60)
        # Headers go through unchanged (Host included): the client's SigV4 signature covers them.
        upstream.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
        response = upstream.getresponse()
        self.send_response(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, value)
        data = response.read()
        length_out = response.getheader("Content-Length", "0") if self.command == "HEAD" else len(data)
        self.send_header("Content-Length", str(length_out))
        self.end_headers()
        sent = 0
        slow = owner.delay_per_64k if self.path.split("?")[0].count("/files/md5/") else 0.0
        if self.command != "HEAD":
            for start in range(0, len(data), 65536):
                if slow:
                    time.sleep(slow)
                self.wfile.write(data[start : start + 65536])
                sent += len(data[start : start + 65536])
        upstream.close()
        owner.record(
            Seen(self.command, self.path.split("?")[0], self.headers.get("Range"), response.status, sent)
        )

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward


class _ProxyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    owner: RecordingProxy


class RecordingProxy:
    """A reverse proxy on 127.0.0.1 in front of SeaweedFS that records every request it forwards."""

    def __init__(self, s3: SeaweedS3) -> None:
        self.s3 = s3
        self.upstream_port = s3.ports["s3"]
        self.delay_per_64k = 0.0
        # {path substring: seconds}: requests whose path contains the substring wait that long before they
        # are forwarded (a slow remote, to make concurrent clients overlap).
        self.request_delays: dict[str, float] = {}
        self._seen: list[Seen] = []
        self._lock = threading.Lock()
        # Requests being relayed: a request is recorded after its body is sent, so the client can see its
        # answer a moment before the record exists; `seen` waits for the relays in flight to finish.
        self._active = 0
        self._idle = threading.Condition(self._lock)
        self._httpd = _ProxyServer(("127.0.0.1", 0), _ProxyHandler)
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.daemon = True
        self._thread.start()
        self.port = self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """AWS_* for a sync process that must go through the proxy."""
        return self.s3.env() | {"AWS_ENDPOINT_URL": self.url, "AWS_ENDPOINT_URL_S3": self.url}

    def record(self, seen: Seen) -> None:
        with self._lock:
            self._seen.append(seen)

    def begin(self) -> None:
        with self._lock:
            self._active += 1

    def end(self) -> None:
        with self._lock:
            self._active -= 1
            self._idle.notify_all()

    @property
    def seen(self) -> list[Seen]:
        with self._lock:
            self._idle.wait_for(lambda: self._active == 0, timeout=10)
            return list(self._seen)

    def gets(self, md5: str) -> list[Seen]:
        """GETs of the object `md5` (as `files/md5/<2>/<30>`)."""
        return [
            s for s in self.seen if s.method == "GET" and s.path.endswith(f"/files/md5/{md5[:2]}/{md5[2:]}")
        ]

    def clear(self) -> None:
        with self._lock:
            self._idle.wait_for(lambda: self._active == 0, timeout=10)
            self._seen.clear()

    def stop(self) -> None:
        """Close the port: from now on clients get 'connection refused', as from a stopped server."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(5)


@pytest.fixture
def proxy(s3_server: SeaweedS3) -> Iterator[RecordingProxy]:
    p = RecordingProxy(s3_server)
    yield p
    p.stop()


@contextlib.contextmanager
def aws_env(env: dict[str, str]) -> Iterator[None]:
    """Point in-process boto3 (sync_templates called directly) at a server, for the block."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# -------------------------------------------------------------------------------------- assertions


def folder_state(folder: Path) -> dict[str, tuple[int, str]]:
    return {rel: v for rel, v in _listing_of(folder).items() if not rel.startswith(".fuseline-sync")}


def assert_complete(volume: Path, version: Version) -> None:
    folder = volume / "models" / version.template
    assert folder.is_symlink(), f"{folder} should be a symlink to a version folder"
    assert folder_state(folder) == version.files
    marker = json.loads((folder / ".fuseline-sync.json").read_text())
    assert marker["dir_md5"] == version.dir_md5


def sync_statuses(stderr: str) -> dict[str, str]:
    """{template: status} from the `sync.template` events `python -m worker.sync` logs (JSON lines, piped)."""
    records = [json.loads(line) for line in stderr.splitlines()]
    return {r["template"]: r["status"] for r in records if r["event"] == "sync.template"}


def sync_cmd(release: str, volume: Path, *templates: str) -> list[str]:
    cmd = [PYTHON, "-m", "worker.sync", "--release", release, "--volume", str(volume)]
    for template in templates:
        cmd += ["--template", template]
    return cmd
