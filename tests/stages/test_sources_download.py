"""The HTTP download engine against a real local range server: resume, sha256, retries, web pages."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import pytest

from stages.sources.download import RetryPolicy, download, looks_like_page, parse_retry_after, part_path
from stages.sources.errors import SourceError
from testkit.civitai import safetensors_bytes
from testkit.servers import Response

FAST = RetryPolicy(total_seconds=5, backoff_base=0.05, backoff_max=0.2, connect_timeout=2, read_timeout=5)
SIZE = 3_000_000


@pytest.fixture
def served(tmp_path, http_server):
    """A 3 MB safetensors file on a range server: (server, url, bytes, sha256)."""
    root = tmp_path / "www"
    root.mkdir()
    data = safetensors_bytes(SIZE, seed=1)
    (root / "model.safetensors").write_bytes(data)
    srv = http_server(root)
    return srv, srv.url("model.safetensors"), data, hashlib.sha256(data).hexdigest()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_cut_transfer_resumes_with_range_instead_of_restarting(served, tmp_path):
    srv, url, data, sha = served
    srv.cut_next(1_500_000)
    dest = tmp_path / "out" / "model.safetensors"

    result = download(url, dest, sha256=sha, policy=FAST)

    assert dest.read_bytes() == data and result.sha256 == sha
    reqs = srv.requests
    assert [r.status for r in reqs] == [200, 206]
    assert reqs[0].fault == "cut" and reqs[0].range is None
    # Resumed where the kept bytes end (at most one partly read chunk below the cut), not at 0.
    offset = result.resumed_from[0]
    assert 1_000_000 < offset <= 1_500_000
    assert reqs[1].range == f"bytes={offset}-"
    assert reqs[1].headers.get("if-range")  # the ETag from the first answer
    # Byte offsets must mean file bytes: no gzip between us and the file.
    assert all(r.headers.get("accept-encoding") == "identity" for r in reqs)
    # Bytes served: the cut prefix plus the rest, far from two full copies.
    assert 1_500_000 + (SIZE - offset) < 2 * len(data) - 500_000
    assert _leftovers(dest.parent) == ["model.safetensors"]


def test_partial_file_from_an_earlier_run_is_resumed(served, tmp_path):
    srv, url, data, sha = served
    dest = tmp_path / "out" / "model.safetensors"
    srv.cut_next(1_000_000, times=3)
    with pytest.raises(SourceError) as info:  # the budget allows only two attempts: both cut
        download(url, dest, sha256=sha, policy=RetryPolicy(max_attempts=2, backoff_base=0.01))
    assert info.value.code == "DOWNLOAD_FAILED"
    kept = part_path(dest).stat().st_size
    assert kept > 0 and not dest.exists()  # the partial file stays for the next run
    srv.clear_faults()
    srv.clear_requests()

    download(url, dest, sha256=sha, policy=FAST)

    assert dest.read_bytes() == data
    assert [r.range for r in srv.requests] == [f"bytes={kept}-"]


def test_changed_file_behind_if_range_restarts_from_zero(served, tmp_path):
    srv, url, _, _ = served
    dest = tmp_path / "out" / "model.safetensors"
    srv.cut_next(1_000_000)
    with pytest.raises(SourceError):
        download(url, dest, policy=RetryPolicy(max_attempts=1))
    # The upload changes between runs: new bytes, new ETag; If-Range makes the server send it whole.
    new = safetensors_bytes(SIZE, seed=2)
    (srv.root / "model.safetensors").write_bytes(new)
    srv.clear_requests()

    result = download(url, dest, policy=FAST)  # unpinned: only the validator can tell

    assert dest.read_bytes() == new and result.resumed_from == []
    assert result.sha256 == hashlib.sha256(new).hexdigest()
    assert srv.requests[0].range is not None and srv.requests[0].status == 200


def test_wrong_sha256_fails_and_leaves_nothing(served, tmp_path):
    _, url, _, sha = served
    dest = tmp_path / "out" / "model.safetensors"
    wrong = "0" * 64
    with pytest.raises(SourceError) as info:
        download(url, dest, sha256=wrong, policy=FAST)
    assert info.value.code == "SHA256_MISMATCH"
    assert sha in str(info.value) and wrong in str(info.value)
    assert _leftovers(dest.parent) == []


def test_429_with_retry_after_then_success(served, tmp_path):
    srv, url, data, sha = served
    srv.fail_next(429, headers={"Retry-After": "1"})
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)

    started = time.monotonic()
    download(url, tmp_path / "m.safetensors", sha256=sha, policy=FAST, sleep=sleep)
    assert waits == [1.0]  # Retry-After wins over the (much shorter) backoff
    assert time.monotonic() - started >= 1.0
    assert [r.status for r in srv.requests] == [429, 200]
    assert (tmp_path / "m.safetensors").read_bytes() == data


def test_500s_until_the_budget_ends_fail_with_a_clear_message(served, tmp_path):
    srv, url, _, sha = served
    srv.fail_next(500, times=100)
    policy = RetryPolicy(total_seconds=1.0, backoff_base=0.1, backoff_max=0.4)
    started = time.monotonic()
    out = tmp_path / "out"
    with pytest.raises(SourceError) as info:
        download(url, out / "m.safetensors", sha256=sha, policy=policy)
    assert time.monotonic() - started < 3
    message = str(info.value)
    assert info.value.code == "DOWNLOAD_FAILED"
    assert "HTTP 500" in message and "attempt" in message and "FUSELINE_DOWNLOAD_RETRY_SECONDS" in message
    assert len(srv.requests) >= 2
    assert _leftovers(out) == []


def test_retry_after_beyond_the_budget_fails_at_once(served, tmp_path):
    srv, url, _, sha = served
    srv.fail_next(503, headers={"Retry-After": "3600"})
    started = time.monotonic()
    with pytest.raises(SourceError, match="HTTP 503"):
        download(url, tmp_path / "m.safetensors", sha256=sha, policy=FAST)
    assert time.monotonic() - started < 1


def test_html_page_with_status_200_is_rejected(served, tmp_path):
    srv, url, _, sha = served
    srv.html_next()
    out = tmp_path / "out"
    with pytest.raises(SourceError) as info:
        download(url, out / "m.safetensors", sha256=sha, policy=FAST, auth_hint="set SOME_KEY")
    assert info.value.code == "NOT_A_MODEL_FILE"
    assert "text/html" in str(info.value) and "set SOME_KEY" in str(info.value)
    assert _leftovers(out) == []


def test_html_body_labelled_octet_stream_is_caught_by_sniffing(tmp_path, http_server):
    root = tmp_path / "www"
    root.mkdir()
    (root / "model.safetensors").write_bytes(b"\n  <!DOCTYPE html><html><body>Sign in</body></html>" * 5)
    srv = http_server(root)
    with pytest.raises(SourceError) as info:
        download(srv.url("model.safetensors"), tmp_path / "out" / "m.safetensors", policy=FAST)
    assert info.value.code == "NOT_A_MODEL_FILE"
    assert _leftovers(tmp_path / "out") == []


def test_401_names_the_variable_to_set(served, tmp_path):
    srv, url, _, _ = served
    srv.fail_next(401, body=b'{"error":"Unauthorized"}', headers={"Content-Type": "application/json"})
    with pytest.raises(SourceError) as info:
        download(url, tmp_path / "m", policy=FAST, auth_hint="set CIVITAI_API_KEY to a key")
    assert info.value.code == "AUTH_REQUIRED" and "CIVITAI_API_KEY" in str(info.value)
    assert len(srv.requests) == 1  # not retried


def test_404_is_not_retried(served, tmp_path):
    srv, _, _, _ = served
    with pytest.raises(SourceError) as info:
        download(srv.url("missing.safetensors"), tmp_path / "m", policy=FAST)
    assert info.value.code == "NOT_FOUND" and len(srv.requests) == 1


def test_connection_refused_is_retried_until_the_budget_ends(tmp_path):
    from testkit.servers import free_port

    url = f"http://127.0.0.1:{free_port()}/m.safetensors"
    with pytest.raises(SourceError) as info:
        download(url, tmp_path / "m", policy=RetryPolicy(total_seconds=0.5, backoff_base=0.05))
    assert info.value.code == "DOWNLOAD_FAILED" and "ConnectionError" in str(info.value)


def test_progress_lines_in_a_non_tty_log(served, tmp_path, caplog):
    _, url, _, sha = served
    with caplog.at_level(logging.INFO, logger="fuseline.sources"):
        download(url, tmp_path / "m.safetensors", sha256=sha, policy=FAST, progress=True, progress_interval=0)
    lines = [r.getMessage() for r in caplog.records if "MiB/s" in r.getMessage()]
    assert lines and "(100%)" in lines[-1]


def test_page_sniffing_tells_safetensors_from_pages():
    assert looks_like_page(b"<!DOCTYPE html><html>")
    assert looks_like_page(b'  {"error": "Unauthorized", "message": "log in"}')
    assert not looks_like_page(safetensors_bytes(64)[:64])
    # A safetensors header of length 0x227b starts with the bytes '{"' too: not a page.
    assert not looks_like_page((0x227B).to_bytes(8, "little") + b'{"a":1}')
    assert not looks_like_page(b"\x80\x04\x95" + b"\x00" * 20)  # a pickle


def test_retry_after_header_forms():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480 - 10) == pytest.approx(10)


def test_authorization_is_dropped_on_a_redirect_to_another_port(tmp_path, http_server):
    """Same hostname, other port: requests' should_strip_auth treats it as another origin."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    data = safetensors_bytes(10_000, seed=4)
    (tmp_path / "b" / "m.safetensors").write_bytes(data)
    origin, storage = http_server(tmp_path / "a"), http_server(tmp_path / "b")
    origin.add_route("/dl", lambda req: Response.redirect(storage.url("m.safetensors"), status=302))
    download(
        origin.url("dl"),
        tmp_path / "out" / "m",
        headers={"Authorization": "Bearer abcdef123456"},
        policy=FAST,
    )
    assert origin.requests[0].authorization == "Bearer abcdef123456"
    assert storage.requests[0].authorization is None


def test_a_token_in_a_broken_url_does_not_leak(tmp_path):
    with pytest.raises(SourceError) as info:
        download("http://127.0.0.1:99999/x?token=supersecret123", tmp_path / "m", policy=FAST)
    assert "supersecret123" not in str(info.value) and "token=***" in str(info.value)


def _serve_bytes(srv, prefix: str, state: dict, etag: str | None = None) -> None:
    """A route that serves `state["data"]` with Range support, and an ETag only when one is given (and
    then the same one whatever the bytes: a server that does not notice its file changed)."""

    def handler(req):
        data = state["data"]
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        if etag:
            headers["ETag"] = etag
        if req.range:
            first = int(req.range.removeprefix("bytes=").rstrip("-"))
            headers["Content-Range"] = f"bytes {first}-{len(data) - 1}/{len(data)}"
            return Response(206, headers, data[first:])
        return Response(200, headers, data)

    srv.add_route(prefix, handler)


def test_no_validator_means_no_resume_so_a_changed_file_is_not_spliced(tmp_path, http_server):
    (tmp_path / "www").mkdir()
    srv = http_server(tmp_path / "www")
    state = {"data": safetensors_bytes(SIZE, seed=1)}
    _serve_bytes(srv, "/plain/", state)
    url, dest = srv.url("plain/model.safetensors"), tmp_path / "out" / "model.safetensors"
    srv.cut_next(1_000_000)
    with pytest.raises(SourceError):
        download(url, dest, policy=RetryPolicy(max_attempts=1))
    assert part_path(dest).stat().st_size > 0
    state["data"] = new = safetensors_bytes(SIZE, seed=2)  # the upload changes between runs
    srv.clear_requests()

    result = download(url, dest, policy=FAST)  # unpinned, and no ETag/Last-Modified to send as If-Range

    assert dest.read_bytes() == new and result.resumed_from == []
    assert [(r.range, r.status) for r in srv.requests] == [(None, 200)]


def test_sha256_mismatch_after_a_resume_downloads_once_more_from_zero(tmp_path, http_server):
    (tmp_path / "www").mkdir()
    srv = http_server(tmp_path / "www")
    state = {"data": safetensors_bytes(SIZE, seed=1)}
    _serve_bytes(srv, "/cdn/", state, etag='"v1"')
    url, dest = srv.url("cdn/model.safetensors"), tmp_path / "out" / "model.safetensors"
    new = safetensors_bytes(SIZE, seed=2)
    sha = hashlib.sha256(new).hexdigest()
    srv.cut_next(1_000_000)
    with pytest.raises(SourceError):
        download(url, dest, sha256=sha, policy=RetryPolicy(max_attempts=1))
    state["data"] = new  # changed behind the same ETag: the resumed file is old prefix + new tail
    srv.clear_requests()

    result = download(url, dest, sha256=sha, policy=FAST)

    assert dest.read_bytes() == new and result.sha256 == sha
    assert [r.status for r in srv.requests] == [206, 200]
    assert srv.requests[0].range and srv.requests[1].range is None
    # A wrong pin still fails after the one fresh try, leaving nothing behind.
    srv.clear_requests()
    dest.unlink()
    srv.cut_next(1_000_000)
    with pytest.raises(SourceError):
        download(url, dest, sha256="0" * 64, policy=RetryPolicy(max_attempts=1))
    with pytest.raises(SourceError) as info:
        download(url, dest, sha256="0" * 64, policy=FAST)
    assert info.value.code == "SHA256_MISMATCH"
    assert [r.status for r in srv.requests] == [200, 206, 200]
    assert _leftovers(dest.parent) == []


def test_a_failing_url_callable_is_a_source_error(tmp_path):
    def presign() -> str:
        from botocore.exceptions import NoCredentialsError

        raise NoCredentialsError()

    dest = tmp_path / "out" / "model.safetensors"
    with pytest.raises(SourceError) as info:
        download(presign, dest, policy=FAST, label="s3://bucket/model.safetensors")
    assert info.value.code == "URL_FAILED"
    assert "s3://bucket/model.safetensors: could not build the download URL: NoCredentialsError" in str(
        info.value
    )
    assert _leftovers(dest.parent) == []
