"""Tests for the kit's local servers: SeaweedFS S3 and the recording, fault-injecting range server."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from testkit.servers import RangeHTTPServer, Response, SeaweedS3, SeaweedStartError

REPO = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------------------ helpers


def fetch(
    server: RangeHTTPServer,
    path: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, http.client.HTTPMessage, bytes, bool]:
    """(status, headers, body, complete); complete is False when the server cut the body short."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        try:
            return resp.status, resp.headers, resp.read(), True
        except http.client.IncompleteRead as short:
            return resp.status, resp.headers, short.partial, False
    finally:
        conn.close()


def pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def payload(tmp_path: Path) -> bytes:
    data = os.urandom(1000)
    (tmp_path / "blob.bin").write_bytes(data)
    return data


@pytest.fixture
def served(http_server, tmp_path: Path, payload: bytes) -> RangeHTTPServer:
    return http_server(tmp_path)


# ------------------------------------------------------------------------------------- HTTP server


def test_full_get_has_length_etag_and_accept_ranges(served: RangeHTTPServer, payload: bytes) -> None:
    status, headers, body, complete = fetch(served, "/blob.bin")
    assert (status, body, complete) == (200, payload, True)
    assert headers["Content-Length"] == "1000"
    assert headers["Accept-Ranges"] == "bytes"
    assert headers["ETag"].startswith('"') and headers["ETag"].endswith('"')
    assert fetch(served, "/blob.bin")[1]["ETag"] == headers["ETag"]  # stable for an unchanged file


def test_closed_range_gives_206_with_exact_bytes(served: RangeHTTPServer, payload: bytes) -> None:
    status, headers, body, _ = fetch(served, "/blob.bin", headers={"Range": "bytes=100-199"})
    assert status == 206
    assert headers["Content-Range"] == "bytes 100-199/1000"
    assert headers["Content-Length"] == "100"
    assert body == payload[100:200]


@pytest.mark.parametrize(
    ("spec", "first", "last"),
    [("bytes=900-", 900, 999), ("bytes=-10", 990, 999), ("bytes=990-5000", 990, 999)],
)
def test_open_ended_and_suffix_ranges(
    served: RangeHTTPServer, payload: bytes, spec: str, first: int, last: int
) -> None:
    status, headers, body, _ = fetch(served, "/blob.bin", headers={"Range": spec})
    assert status == 206
    assert headers["Content-Range"] == f"bytes {first}-{last}/1000"
    assert body == payload[first : last + 1]


def test_unsatisfiable_range_gives_416(served: RangeHTTPServer) -> None:
    status, headers, body, _ = fetch(served, "/blob.bin", headers={"Range": "bytes=1000-"})
    assert status == 416
    assert headers["Content-Range"] == "bytes */1000"
    assert body == b""


def test_if_range_with_stale_etag_sends_whole_file(served: RangeHTTPServer, payload: bytes) -> None:
    etag = fetch(served, "/blob.bin", "HEAD")[1]["ETag"]
    same = fetch(served, "/blob.bin", headers={"Range": "bytes=10-", "If-Range": etag})
    assert (same[0], same[2]) == (206, payload[10:])
    stale = fetch(served, "/blob.bin", headers={"Range": "bytes=10-", "If-Range": '"other"'})
    assert (stale[0], stale[2]) == (200, payload)


def test_head_has_headers_and_no_body(served: RangeHTTPServer) -> None:
    status, headers, body, _ = fetch(served, "/blob.bin", "HEAD")
    assert (status, body) == (200, b"")
    assert headers["Content-Length"] == "1000"
    assert headers["Accept-Ranges"] == "bytes"
    assert "ETag" in headers


def test_missing_file_and_path_escape_give_404(served: RangeHTTPServer, tmp_path: Path) -> None:
    (tmp_path.parent / "secret.txt").write_text("outside the root")
    assert fetch(served, "/nope.bin")[0] == 404
    assert fetch(served, "/../secret.txt")[0] == 404
    assert fetch(served, "/%2e%2e/secret.txt")[0] == 404


def test_every_request_is_recorded_with_headers(served: RangeHTTPServer) -> None:
    def one(i: int) -> int:
        headers = {"Authorization": f"Bearer token-{i}", "Range": f"bytes={i}-{i + 9}"}
        return fetch(served, f"/blob.bin?n={i}", headers=headers)[0]

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(one, range(20)))
    fetch(served, "/blob.bin", "HEAD")

    assert statuses == [206] * 20
    recorded = served.requests
    assert len(recorded) == 21
    gets = sorted((r for r in recorded if r.method == "GET"), key=lambda r: int(r.path.split("=")[1]))
    for i, req in enumerate(gets):
        assert req.path == f"/blob.bin?n={i}"
        assert req.authorization == f"Bearer token-{i}"
        assert req.range == f"bytes={i}-{i + 9}"
        assert req.status == 206
    assert (recorded[-1].method, recorded[-1].status, recorded[-1].range) == ("HEAD", 200, None)
    served.clear_requests()
    assert served.requests == []


def test_cut_connection_gives_short_body_then_resume_works(served: RangeHTTPServer, payload: bytes) -> None:
    served.cut_next(300)
    status, headers, body, complete = fetch(served, "/blob.bin")
    assert (status, headers["Content-Length"], complete) == (200, "1000", False)
    assert body == payload[:300]

    # Only the next request was cut: a resume from byte 300 gets the rest.
    status, _, rest, complete = fetch(served, "/blob.bin", headers={"Range": "bytes=300-"})
    assert (status, complete) == (206, True)
    assert body + rest == payload
    assert [r.fault for r in served.requests] == ["cut", None]


def test_cut_applies_to_k_requests_and_skips_head(served: RangeHTTPServer, payload: bytes) -> None:
    served.cut_next(10, times=2)
    assert fetch(served, "/blob.bin", "HEAD")[0] == 200  # no body: not a cut, not counted
    assert fetch(served, "/blob.bin")[2:] == (payload[:10], False)
    assert fetch(served, "/blob.bin", headers={"Range": "bytes=500-"})[2:] == (payload[500:510], False)
    assert fetch(served, "/blob.bin")[2:] == (payload, True)


def test_status_knob_answers_k_requests_with_retry_after(served: RangeHTTPServer, payload: bytes) -> None:
    served.fail_next(429, times=2, headers={"Retry-After": "3"})
    for _ in range(2):
        status, headers, _, _ = fetch(served, "/blob.bin")
        assert (status, headers["Retry-After"]) == (429, "3")
    status, headers, body, _ = fetch(served, "/blob.bin")
    assert (status, body, headers["Retry-After"]) == (200, payload, None)
    assert [(r.status, r.fault) for r in served.requests] == [(429, "status"), (429, "status"), (200, None)]


def test_status_knob_can_target_a_path(served: RangeHTTPServer) -> None:
    served.fail_next(500, path_prefix="/api/")
    assert fetch(served, "/blob.bin")[0] == 200
    assert fetch(served, "/api/thing")[0] == 500
    assert fetch(served, "/api/thing")[0] == 404


def test_html_knob_serves_a_page_with_200(served: RangeHTTPServer) -> None:
    served.html_next()
    status, headers, body, _ = fetch(served, "/blob.bin")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert body.startswith(b"<!DOCTYPE html>")


def test_routes_answer_redirect_and_fall_through(served: RangeHTTPServer, payload: bytes) -> None:
    seen = []

    def download(req):
        seen.append(req.authorization)
        version = req.path.rsplit("/", 1)[1]
        return Response.redirect("/blob.bin") if version == "42" else None

    served.add_route("/api/download/", download)
    served.add_route("/api/", lambda req: Response(403, {"Content-Type": "text/plain"}, b"forbidden"))

    status, headers, _, _ = fetch(served, "/api/download/42", headers={"Authorization": "Bearer t"})
    assert (status, headers["Location"]) == (302, "/blob.bin")
    assert fetch(served, "/api/other")[:3:2] == (403, b"forbidden")  # the shorter prefix
    assert fetch(served, "/api/download/7")[:3:2] == (403, b"forbidden")  # declined: next route answers
    assert seen == ["Bearer t", None]


def test_declining_route_falls_through_to_the_file(served: RangeHTTPServer, payload: bytes) -> None:
    served.add_route("/blob", lambda req: None)
    assert fetch(served, "/blob.bin", headers={"Range": "bytes=0-9"})[:3:2] == (206, payload[:10])


def test_route_sees_the_request_body(served: RangeHTTPServer) -> None:
    served.add_route("/echo", lambda req: Response(201, {}, req.body[::-1]))
    status, _, body, _ = fetch(served, "/echo", "POST", body=b"abc")
    assert (status, body) == (201, b"cba")
    assert served.requests[-1].body == b"abc"


def test_broken_route_answers_500(served: RangeHTTPServer) -> None:
    served.add_route("/boom", lambda req: 1 / 0)
    status, _, body, _ = fetch(served, "/boom")
    assert status == 500
    assert b"ZeroDivisionError" in body


def test_http_server_stops_and_frees_its_port(tmp_path: Path) -> None:
    with RangeHTTPServer(tmp_path) as server:
        port = server.port
        assert fetch(server, "/x")[0] == 404
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    with pytest.raises(ConnectionRefusedError):
        conn.request("GET", "/x")


# ---------------------------------------------------------------------------------------------- S3


@pytest.mark.s3
def test_s3_put_get_list_round_trip(s3_server: SeaweedS3, s3_bucket: str) -> None:
    s3 = s3_server.client()
    objects = {f"models/a/{i}.bin": os.urandom(100 + i) for i in range(3)}
    objects["other/readme.txt"] = b"hello"
    for key, body in objects.items():
        s3.put_object(Bucket=s3_bucket, Key=key, Body=body)

    for key, body in objects.items():
        assert s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == body
    listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix="models/")
    assert sorted(o["Key"] for o in listed["Contents"]) == sorted(
        k for k in objects if k.startswith("models/")
    )
    assert {o["Key"]: o["Size"] for o in listed["Contents"]}["models/a/2.bin"] == 102
    assert s3_bucket in [b["Name"] for b in s3.list_buckets()["Buckets"]]


@pytest.mark.s3
def test_s3_fixture_gives_each_test_a_fresh_empty_bucket(s3_server: SeaweedS3, s3_bucket: str) -> None:
    assert s3_server.client().list_objects_v2(Bucket=s3_bucket)["KeyCount"] == 0


@pytest.fixture(scope="module")
def multipart_object(s3_server: SeaweedS3) -> tuple[str, str, bytes]:
    """A ~12 MB object uploaded in three parts (5 MiB, 5 MiB, rest)."""
    bucket = s3_server.make_bucket("multipart-kit")
    data = os.urandom(12 * 1024 * 1024)
    part = 5 * 1024 * 1024
    s3 = s3_server.client()
    upload = s3.create_multipart_upload(Bucket=bucket, Key="big.bin")
    parts = []
    for number, offset in enumerate(range(0, len(data), part), start=1):
        etag = s3.upload_part(
            Bucket=bucket,
            Key="big.bin",
            UploadId=upload["UploadId"],
            PartNumber=number,
            Body=data[offset : offset + part],
        )["ETag"]
        parts.append({"ETag": etag, "PartNumber": number})
    s3.complete_multipart_upload(
        Bucket=bucket, Key="big.bin", UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
    )
    return bucket, "big.bin", data


@pytest.mark.s3
def test_s3_multipart_upload_of_12_mb(s3_server: SeaweedS3, multipart_object) -> None:
    bucket, key, data = multipart_object
    s3 = s3_server.client()
    head = s3.head_object(Bucket=bucket, Key=key)
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-3")  # S3's multipart ETag: md5-of-md5s, dash, part count
    got = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()


@pytest.mark.s3
def test_s3_ranged_get_across_a_part_boundary(s3_server: SeaweedS3, multipart_object) -> None:
    bucket, key, data = multipart_object
    first, last = 5 * 1024 * 1024 - 10, 5 * 1024 * 1024 + 9
    resp = s3_server.client().get_object(Bucket=bucket, Key=key, Range=f"bytes={first}-{last}")
    assert resp["ContentRange"] == f"bytes {first}-{last}/{len(data)}"
    assert resp["Body"].read() == data[first : last + 1]


@pytest.mark.s3
def test_s3_rejects_wrong_credentials(s3_server: SeaweedS3, s3_bucket: str) -> None:
    intruder = s3_server.client(aws_secret_access_key="not-the-secret")
    with pytest.raises(ClientError) as err:
        intruder.list_objects_v2(Bucket=s3_bucket)
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


@pytest.mark.s3
def test_s3_env_configures_a_subprocess(s3_server: SeaweedS3, s3_bucket: str) -> None:
    s3_server.client().put_object(Bucket=s3_bucket, Key="from-parent", Body=b"x")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | s3_server.env()
    script = (
        "import boto3, json, sys; s3 = boto3.client('s3');"
        "print(json.dumps([o['Key'] for o in s3.list_objects_v2(Bucket=sys.argv[1])['Contents']]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, s3_bucket], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == ["from-parent"]


@pytest.mark.s3
def test_s3_server_process_is_gone_after_stop() -> None:
    server = SeaweedS3().start()
    pid, workdir, endpoint = server.pid, server.workdir, server.endpoint_url
    assert pid is not None and workdir is not None
    assert pid_alive(pid)
    assert os.getpgid(pid) == pid  # its own process group
    server.stop()
    assert not pid_alive(pid)
    assert not workdir.exists()
    server.stop()  # idempotent
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.endpoint_url
    port = int(endpoint.rsplit(":", 1)[1])
    with pytest.raises(ConnectionRefusedError):
        http.client.HTTPConnection("127.0.0.1", port, timeout=2).request("GET", "/")


@pytest.mark.s3
def test_s3_server_dies_with_a_crashed_parent(tmp_path: Path) -> None:
    # The parent starts a server, reports it, then dies by SIGKILL (no atexit, no finally).
    script = (
        "import json, os, signal; from testkit.servers import SeaweedS3;"
        "s = SeaweedS3().start();"
        "print(json.dumps([s.pid, str(s.workdir), s.ports]), flush=True);"
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == -9, out.stderr
    pid, workdir, ports = json.loads(out.stdout)
    try:
        deadline = time.monotonic() + 10
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(pid), f"weed pid {pid} outlived its killed parent"
    finally:
        if pid_alive(pid):
            os.kill(pid, 9)
        # What a crashed session does leave behind: its temp dir and weed's gRPC sockets in /tmp.
        shutil.rmtree(workdir, ignore_errors=True)
        for name, port in ports.items():
            Path(f"/tmp/seaweedfs-{name}-grpc-{port + 10000}.sock").unlink(missing_ok=True)


@pytest.mark.s3
def test_s3_start_failure_shows_the_log_tail() -> None:
    server = SeaweedS3(extra_args=("-no-such-flag=1",), startup_timeout=10)
    with pytest.raises(SeaweedStartError, match="no-such-flag") as err:
        server.start()
    assert "exited with code" in str(err.value)
    assert server.process is None and server.workdir is None


def test_seaweed_takes_writes_in_many_buckets_whatever_the_free_disk() -> None:
    # A test run makes a bucket per test: weed's default volume cap (free disk / 128 MB, about 8 volumes per
    # bucket) refused writes from the 18th bucket on a disk with 19 GB free.
    with SeaweedS3() as s3:
        client = s3.client()
        for index in range(30):
            bucket = s3.make_bucket(f"many-{index}")
            client.put_object(Bucket=bucket, Key="k", Body=b"x")
