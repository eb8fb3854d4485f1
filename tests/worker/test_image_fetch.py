"""Fetching input images by URL and from S3, against real servers on loopback.

How "an allowed host" is made without DNS or a public address: the fetcher's `allowed_networks` (the
operator setting for an internal image host) allows 127.0.0.2/32 only, and a server binds 127.0.0.2
(Linux routes all of 127.0.0.0/8 to loopback). 127.0.0.1 stays forbidden, so a redirect from the allowed
server to a server on 127.0.0.1 must be refused. Host names are given to the fetcher through its
`resolver` parameter (a dict lookup here); the fetcher itself, its sockets and the servers are real.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testkit.servers import RangeHTTPServer, RecordedRequest, Response
from tests.worker.image_samples import encoded
from worker.errors import ImageFetchFailed, ImageInvalid
from worker.image_fetch import address_refusal, describe_url, fetch_s3_object, fetch_url

ALLOWED_HOST = "127.0.0.2"
ALLOWED = (ipaddress.ip_network(f"{ALLOWED_HOST}/32"),)
PNG = encoded(__import__("PIL.Image", fromlist=["Image"]).new("RGB", (8, 8), (200, 10, 10)), "PNG")


def fetch(url: str, **overrides) -> bytes:
    options = {
        "max_bytes": 10_000,
        "timeout_s": 5.0,
        "max_redirects": 5,
        "allowed_networks": ALLOWED,
    } | overrides
    return fetch_url(url, **options).data


@pytest.fixture
def allowed_server(http_server: Callable[..., RangeHTTPServer], tmp_path: Path) -> Iterator[RangeHTTPServer]:
    root = tmp_path / "allowed"
    root.mkdir()
    (root / "a.png").write_bytes(PNG)
    yield http_server(root, host=ALLOWED_HOST)


@pytest.fixture
def loopback_server(http_server: Callable[..., RangeHTTPServer], tmp_path: Path) -> RangeHTTPServer:
    root = tmp_path / "loopback"
    root.mkdir()
    (root / "a.png").write_bytes(PNG)
    return http_server(root)


# ------------------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.1.2.3", "loopback"),
        ("::1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("169.254.169.254", "link-local"),  # the cloud metadata service
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd00::2", "private"),
        ("100.64.0.1", "not globally routable"),  # carrier-grade NAT
        ("::ffff:127.0.0.1", "loopback (IPv4 127.0.0.1 inside IPv6)"),
        ("::ffff:10.0.0.1", "private (IPv4 10.0.0.1 inside IPv6)"),
        ("64:ff9b::a9fe:a9fe", "link-local (IPv4 169.254.169.254 inside IPv6)"),  # NAT64
        ("2002:7f00:1::", "loopback (IPv4 127.0.0.1 inside IPv6)"),  # 6to4
    ],
)
def test_non_public_addresses_are_named(address: str, kind: str) -> None:
    assert address_refusal(ipaddress.ip_address(address)) == kind


@pytest.mark.parametrize("address", ["8.8.8.8", "2001:4860:4860::8888", "::ffff:8.8.8.8", "64:ff9b::808:808"])
def test_public_addresses_pass(address: str) -> None:
    assert address_refusal(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/a.png",
        "https://[::1]/a.png",
        "https://[::ffff:127.0.0.1]/a.png",
        "https://169.254.169.254/latest/meta-data/",
        "https://10.0.0.1/a.png",
        "https://[fe80::1]/a.png",
        "https://0.0.0.0/a.png",
        "https://localhost/a.png",  # through the system resolver
    ],
)
def test_non_public_urls_are_refused_before_connecting(url: str) -> None:
    with pytest.raises(
        ImageFetchFailed, match=r"refused to fetch from a .* address.*FUSELINE_ALLOW_PRIVATE_URLS"
    ):
        fetch_url(url, max_bytes=1000, timeout_s=5, max_redirects=5)


def test_loopback_server_is_refused_by_default_and_served_when_private_urls_are_allowed(
    loopback_server: RangeHTTPServer,
) -> None:
    with pytest.raises(ImageFetchFailed, match="loopback address"):
        fetch(loopback_server.url("a.png"))
    assert loopback_server.requests == []  # refused before any connection
    assert fetch(loopback_server.url("a.png"), allow_private=True) == PNG


def test_plain_http_to_a_public_address_is_refused_without_connecting() -> None:
    with pytest.raises(ImageFetchFailed, match=r"plain http:// is not fetched; use an https:// URL"):
        fetch_url("http://8.8.8.8/a.png", max_bytes=1000, timeout_s=5, max_redirects=5)


def test_a_name_with_one_private_address_among_public_ones_is_refused() -> None:
    def resolver(host: str, port: int) -> list[str]:
        return ["8.8.8.8", "127.0.0.1"]

    with pytest.raises(ImageFetchFailed, match=r"images\.test resolves to 127\.0\.0\.1"):
        fetch_url(
            "https://images.test/a.png", max_bytes=1000, timeout_s=5, max_redirects=5, resolver=resolver
        )


def test_credentials_in_the_url_are_refused() -> None:
    with pytest.raises(ImageFetchFailed, match="user:password@") as info:
        fetch_url("https://bob:hunter2secret@8.8.8.8/a.png", max_bytes=1000, timeout_s=5, max_redirects=5)
    assert "hunter2secret" not in str(info.value)


# ------------------------------------------------------------------------ allowed host, redirects


def test_the_connection_goes_to_the_checked_address(allowed_server: RangeHTTPServer) -> None:
    """The name resolves once per hop, through the resolver that was checked; the socket connects to that
    address (a second lookup by the HTTP library would ask the system, which has no `images.test`)."""
    calls: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        calls.append(host)
        return [ALLOWED_HOST]

    url = f"http://images.test:{allowed_server.port}/a.png"
    assert fetch(url, resolver=resolver) == PNG
    assert calls == ["images.test"]
    [request] = allowed_server.requests
    assert request.headers["host"] == f"images.test:{allowed_server.port}"
    assert request.headers["accept-encoding"] == "identity"


def test_spaces_in_the_path_and_international_host_names_are_encoded(
    allowed_server: RangeHTTPServer, tmp_path: Path
) -> None:
    (tmp_path / "allowed" / "a b ü.png").write_bytes(PNG)
    asked: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        asked.append(host)
        return [ALLOWED_HOST]

    assert fetch(f"http://bücher.test:{allowed_server.port}/a b ü.png", resolver=resolver) == PNG
    assert asked == ["xn--bcher-kva.test"]
    [request] = allowed_server.requests
    assert request.path == "/a%20b%20%C3%BC.png"
    assert request.headers["host"] == f"xn--bcher-kva.test:{allowed_server.port}"


@pytest.fixture(scope="module")
def test_ca():
    import trustme

    return trustme.CA()


def https_server(http_server, tmp_path: Path, ca, name: str) -> RangeHTTPServer:
    """An HTTPS server on the allowed address whose certificate (from `ca`) names `name`."""
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)
    root = tmp_path / f"tls-{name}"
    root.mkdir()
    (root / "a.png").write_bytes(PNG)
    return http_server(root, host=ALLOWED_HOST, ssl_context=context)


def test_https_checks_the_certificate_for_the_host_name_on_the_pinned_address(
    http_server, tmp_path: Path, test_ca
) -> None:
    """The socket goes to the checked IP; TLS still sends the name (SNI) and verifies the certificate
    against it: a certificate for another name is refused, and so is an unknown authority."""
    ca_file = tmp_path / "ca.pem"
    test_ca.cert_pem.write_to_path(str(ca_file))
    good = https_server(http_server, tmp_path, test_ca, "images.test")
    other = https_server(http_server, tmp_path, test_ca, "other.test")

    def resolver(host: str, port: int) -> list[str]:
        return [ALLOWED_HOST]

    assert fetch(f"https://images.test:{good.port}/a.png", resolver=resolver, ca_certs=str(ca_file)) == PNG
    [request] = good.requests
    assert request.headers["host"] == f"images.test:{good.port}"
    with pytest.raises(
        ImageFetchFailed,
        match=r"cannot connect \(CertificateError: hostname 'images.test' doesn't match 'other.test'\)",
    ):
        fetch(f"https://images.test:{other.port}/a.png", resolver=resolver, ca_certs=str(ca_file))
    with pytest.raises(ImageFetchFailed, match=r"cannot connect \(.*CERTIFICATE_VERIFY_FAILED"):
        fetch(f"https://images.test:{good.port}/a.png", resolver=resolver)  # certifi does not know the CA


def test_redirect_from_an_allowed_host_to_loopback_is_refused(
    allowed_server: RangeHTTPServer, loopback_server: RangeHTTPServer
) -> None:
    allowed_server.add_route("/to-ip", lambda r: Response.redirect(loopback_server.url("a.png")))
    allowed_server.add_route(
        "/to-name", lambda r: Response.redirect(f"http://localhost:{loopback_server.port}/a.png", 307)
    )
    with pytest.raises(
        ImageFetchFailed, match=r"http://127\.0\.0\.1:\d+/a\.png: refused .* loopback address"
    ):
        fetch(allowed_server.url("to-ip"))
    with pytest.raises(ImageFetchFailed, match=r"localhost resolves to 127\.0\.0\.1"):
        fetch(allowed_server.url("to-name"))
    assert [r.path for r in allowed_server.requests] == ["/to-ip", "/to-name"]
    assert loopback_server.requests == []  # never reached


def test_every_hop_is_resolved_and_checked_again(
    allowed_server: RangeHTTPServer, loopback_server: RangeHTTPServer
) -> None:
    """DNS rebinding across a redirect: the same name answers the allowed address first and loopback on
    the next lookup; the second hop is checked and refused."""
    answers = iter([[ALLOWED_HOST], ["127.0.0.1"]])
    port = allowed_server.port
    allowed_server.add_route("/hop", lambda r: Response.redirect(f"http://images.test:{port}/a.png"))
    with pytest.raises(ImageFetchFailed, match=r"images\.test resolves to 127\.0\.0\.1"):
        fetch(f"http://images.test:{port}/hop", resolver=lambda host, p: next(answers))
    assert [r.path for r in allowed_server.requests] == ["/hop"]
    assert loopback_server.requests == []


def test_redirects_are_followed_within_the_bound(allowed_server: RangeHTTPServer) -> None:
    def chain(request: RecordedRequest) -> Response:
        step = int(request.path.rsplit("/", 1)[1])
        return Response.redirect(
            allowed_server.url(f"r/{step + 1}") if step < 3 else allowed_server.url("a.png")
        )

    allowed_server.add_route("/r/", chain)
    result = fetch_url(
        allowed_server.url("r/1"), max_bytes=10_000, timeout_s=5, max_redirects=3, allowed_networks=ALLOWED
    )
    assert (result.data, result.redirects) == (PNG, 3)
    with pytest.raises(ImageFetchFailed, match=r"more than 2 redirects"):
        fetch(allowed_server.url("r/1"), max_redirects=2)


def test_a_redirect_loop_is_named(allowed_server: RangeHTTPServer) -> None:
    allowed_server.add_route("/loop-a", lambda r: Response.redirect(allowed_server.url("loop-b")))
    allowed_server.add_route("/loop-b", lambda r: Response.redirect("/loop-a", 301))
    with pytest.raises(
        ImageFetchFailed, match=r"redirect loop \(HTTP 301 back to http://127\.0\.0\.2:\d+/loop-a\)"
    ):
        fetch(allowed_server.url("loop-a"))
    assert len(allowed_server.requests) == 2


# ----------------------------------------------------------------------- statuses, sizes, deadline


def test_http_errors_carry_the_status_and_hide_the_query(allowed_server: RangeHTTPServer) -> None:
    allowed_server.fail_next(403, body=b"<Error>SignatureDoesNotMatch</Error>")
    url = allowed_server.url("a.png") + "?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=deadbeefcafe"
    with pytest.raises(ImageFetchFailed) as info:
        fetch(url)
    message = str(info.value)
    assert message.startswith("[IMAGE_FETCH_FAILED] image http://127.0.0.2:")
    assert "/a.png?(query hidden): HTTP 403 Forbidden" in message
    assert "deadbeefcafe" not in message and "AKIAEXAMPLE" not in message
    with pytest.raises(ImageFetchFailed, match="HTTP 404 Not Found"):
        fetch(allowed_server.url("missing.png"))


def test_describe_url_hides_query_and_userinfo() -> None:
    shown = describe_url("https://u:p4ssw0rd@bucket.s3.example.com:8443/k/a.png?X-Amz-Signature=abc#frag")
    assert shown == "https://bucket.s3.example.com:8443/k/a.png?(query hidden)"


def test_a_content_length_over_the_cap_is_refused_before_the_body(allowed_server: RangeHTTPServer) -> None:
    allowed_server.add_route("/big", lambda r: Response(200, {"Content-Type": "image/png"}, b"\0" * 5000))
    with pytest.raises(ImageInvalid, match=r"the image is 5000 bytes, over the 1000-byte input limit"):
        fetch(allowed_server.url("big"), max_bytes=1000)


def test_a_chunked_body_without_length_is_cut_at_the_cap(allowed_server: RangeHTTPServer) -> None:
    sent = []

    def endless() -> Iterator[bytes]:
        while True:  # no length, no end: only the client's cap stops it
            sent.append(1)
            yield b"\0" * 1000

    allowed_server.add_route(
        "/endless", lambda r: Response(200, {"Content-Type": "image/png"}, chunks=endless())
    )
    with pytest.raises(
        ImageInvalid, match=r"passed the 5000-byte input limit \(no or wrong Content-Length\)"
    ):
        fetch(allowed_server.url("endless"), max_bytes=5000)


def test_a_chunked_body_within_the_cap_is_read(allowed_server: RangeHTTPServer) -> None:
    allowed_server.add_route("/chunked", lambda r: Response(200, chunks=iter([PNG[:10], PNG[10:]])))
    assert fetch(allowed_server.url("chunked")) == PNG


def test_a_body_that_trickles_past_the_deadline_fails(allowed_server: RangeHTTPServer) -> None:
    def trickle() -> Iterator[bytes]:
        for _ in range(100):  # a byte every 0.2 s: each read is quick, the whole is not
            yield b"x"
            time.sleep(0.2)

    allowed_server.add_route("/slow", lambda r: Response(200, chunks=trickle()))
    start = time.monotonic()
    with pytest.raises(ImageFetchFailed, match=r"no complete answer within the 1 s fetch timeout"):
        fetch(allowed_server.url("slow"), timeout_s=1.0)
    assert time.monotonic() - start < 2.0


def test_a_server_that_never_answers_fails_at_the_deadline(allowed_server: RangeHTTPServer) -> None:
    def silent(request: RecordedRequest) -> Response:
        time.sleep(3)
        return Response(200, body=PNG)

    allowed_server.add_route("/silent", silent)
    start = time.monotonic()
    with pytest.raises(ImageFetchFailed, match=r"within the 1 s fetch timeout"):
        fetch(allowed_server.url("silent"), timeout_s=1.0)
    assert time.monotonic() - start < 2.0


def test_a_dropped_connection_is_a_fetch_failure(allowed_server: RangeHTTPServer) -> None:
    allowed_server.cut_next(10)
    with pytest.raises(ImageFetchFailed, match=r"transfer failed \(.*IncompleteRead"):
        fetch(allowed_server.url("a.png"))


def test_a_compressed_body_is_refused(allowed_server: RangeHTTPServer) -> None:
    allowed_server.add_route("/gz", lambda r: Response(200, {"Content-Encoding": "gzip"}, b"\x1f\x8b rest"))
    with pytest.raises(ImageFetchFailed, match="gzip-encoded body"):
        fetch(allowed_server.url("gz"))


def test_nothing_listening_is_a_fetch_failure(allowed_server: RangeHTTPServer) -> None:
    port = allowed_server.port
    allowed_server.stop()
    with pytest.raises(ImageFetchFailed, match=r"cannot connect \(.*(refused|NewConnectionError)"):
        fetch(f"http://{ALLOWED_HOST}:{port}/a.png")


# --------------------------------------------------------------------------------------------- S3


@pytest.fixture
def worker_s3_env(s3_server, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's environment pointing at the test S3 server (the worker's own credentials)."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)


@pytest.mark.s3
def test_s3_objects_are_read_with_the_workers_credentials(s3_server, s3_bucket: str, worker_s3_env) -> None:
    s3_server.client().put_object(Bucket=s3_bucket, Key="in/a.png", Body=PNG, ContentType="image/png")
    result = fetch_s3_object(f"s3://{s3_bucket}/in/a.png", max_bytes=10_000)
    assert (result.data, result.content_type) == (PNG, "image/png")


@pytest.mark.s3
def test_s3_failures_name_the_code_and_status(
    s3_server, s3_bucket: str, worker_s3_env, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="big.png", Body=b"\0" * 3000)
    with pytest.raises(
        ImageFetchFailed, match=r"s3://.*/nope\.png: S3 NoSuchKey \(HTTP 404\): no such object"
    ):
        fetch_s3_object(f"s3://{s3_bucket}/nope.png", max_bytes=10_000)
    with pytest.raises(ImageInvalid, match=r"the object is 3000 bytes, over the 1000-byte input limit"):
        fetch_s3_object(f"s3://{s3_bucket}/big.png", max_bytes=1000)
    with pytest.raises(ImageFetchFailed, match=r"bucket 'other' is not one this worker reads images from"):
        fetch_s3_object("s3://other/a.png", max_bytes=1000, allowed_buckets=frozenset({s3_bucket}))
    with pytest.raises(ImageFetchFailed, match=r"s3://<bucket>/<key>"):
        fetch_s3_object(f"s3://{s3_bucket}", max_bytes=1000)
    secret = "wrong-secret-" + "x" * 20
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    with pytest.raises(ImageFetchFailed, match=r"\(HTTP 403\).*may not read it") as info:
        fetch_s3_object(f"s3://{s3_bucket}/big.png", max_bytes=10_000)
    assert secret not in str(info.value)
