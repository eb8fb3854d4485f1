"""Fetching a job's input image bytes from an `https://` URL or an `s3://` object, safely.

URLs: every address a host name resolves to is checked (after DNS, on the first request and on every
redirect) against loopback, private, link-local, multicast, reserved and unspecified ranges, IPv4 and IPv6,
with IPv4 addresses embedded in IPv6 (IPv4-mapped, NAT64, 6to4) checked as the IPv4 address they carry.
The connection then goes to the address that was checked: the socket connects to that IP and the host
name travels only in the Host header and in TLS (SNI and certificate check), so a DNS answer that changes
between the check and the connect (DNS rebinding) cannot redirect the request. Redirects are followed
here, one checked hop at a time, up to a bound. One deadline covers the whole fetch (DNS, connects, TLS,
headers, body, every redirect): a watchdog shuts the socket down when it passes, so a server that
trickles bytes cannot hold the job. The body is read with a byte cap; a larger Content-Length is refused
before any of the body is read.

Why urllib3's connection class and not `requests`: requests (through urllib3's pools) resolves the host
name itself when it connects, after any check we could make; pinning the address needs the connection
object, with which urllib3 connects to an IP we give it while verifying TLS for the host name.

Errors are ImageFetchFailed (network, policy, HTTP status, S3) or ImageInvalid (a body over the byte
cap). Messages show a URL as scheme, host and path only: query strings (presigned URL signatures) never
appear, and every message goes through fuseline.core.redact.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

from fuseline.core.redact import redact
from worker.errors import ImageFetchFailed, ImageInvalid

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# (host name, port) -> the IP addresses it resolves to, as strings.
Resolver = Callable[[str, int], Sequence[str]]

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Bytes per read while streaming a body.
_CHUNK = 64 * 1024
_USER_AGENT = "fuseline-worker (image input)"
# RFC 3986 reserved and unreserved characters, and "%" (already percent-encoded text stays as it is).
_URL_SAFE = "/?@!$&'()*+,;=-._~:%"
# NAT64's well-known prefix (RFC 6052): 64:ff9b::a.b.c.d reaches the IPv4 address a.b.c.d.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


@dataclass(frozen=True)
class FetchedBytes:
    """A fetched body. `content_type` is what the server declared; the bytes decide the format."""

    data: bytes
    content_type: str | None
    redirects: int = 0


def describe_url(url: str) -> str:
    """`url` as messages may show it: scheme, host, port and path; a query string becomes `?(query
    hidden)` (presigned URLs carry their signature there) and user:password@ is dropped."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "(unparsable URL)"
    if ":" in host:
        host = f"[{host}]"
    shown = f"{parts.scheme}://{host}{f':{port}' if port is not None else ''}{parts.path or '/'}"
    if len(shown) > 200:
        shown = shown[:200] + "…"
    if parts.query:
        shown += "?(query hidden)"
    return redact(shown)


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (IPv4-mapped ::ffff:a.b.c.d, NAT64 64:ff9b::a.b.c.d,
    6to4 2002:aabb:ccdd::), else None: a connect to those reaches the IPv4 host."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def address_refusal(ip: IPAddress) -> str | None:
    """What kind of non-public address `ip` is ("loopback", "private", …), or None for a public unicast one.

    Written out instead of `not ip.is_global` alone so the message can name the kind (and because
    is_global counts multicast as global)."""
    embedded = _embedded_ipv4(ip)
    if embedded is not None:
        kind = address_refusal(embedded)
        return f"{kind} (IPv4 {embedded} inside IPv6)" if kind else None
    checks = (
        ("loopback", ip.is_loopback),
        ("unspecified", ip.is_unspecified),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("reserved", ip.is_reserved),
        ("private", ip.is_private),
        ("not globally routable", not ip.is_global),
    )
    return next((kind for kind, hit in checks if hit), None)


def system_resolver(host: str, port: int) -> list[str]:
    """The addresses the system resolver gives for `host` (both families), in its order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class _Deadline:
    """One time budget for a whole fetch."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.end - time.monotonic()

    @property
    def passed(self) -> bool:
        return self.remaining() <= 0


def _resolve_within(resolver: Resolver, host: str, port: int, deadline: _Deadline, where: str) -> list[str]:
    """Run `resolver` in a thread so a DNS server that does not answer costs the deadline, not more
    (getaddrinfo has no timeout of its own). A lookup still running when it passes is left to finish."""
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(list(resolver(host, port)))
        except BaseException as err:  # handed to the caller below
            result.append(err)

    thread = threading.Thread(target=run, name="image-fetch-dns", daemon=True)
    thread.start()
    thread.join(max(deadline.remaining(), 0))
    if not result:
        raise ImageFetchFailed(
            f"{where}: looking up {host!r} took longer than the {deadline.seconds:g} s fetch timeout"
        )
    if isinstance(result[0], BaseException):
        raise ImageFetchFailed(f"{where}: cannot resolve host {host!r} ({result[0]})")
    if not result[0]:
        raise ImageFetchFailed(f"{where}: host {host!r} resolves to no address")
    return result[0]


@dataclass(frozen=True)
class _Hop:
    url: str
    scheme: str
    host: str
    port: int
    target: str  # path and query, as sent
    host_header: str


def _parse(url: str, field_name: str) -> _Hop:
    where = f"{field_name} {describe_url(url)}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise ImageFetchFailed(f"{where}: not a valid URL ({err})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ImageFetchFailed(f"{where}: only https:// URLs are fetched (got {scheme or 'no'} scheme)")
    if parts.username is not None or parts.password is not None:
        raise ImageFetchFailed(
            f"{where}: URLs with user:password@ are not fetched; make the image readable by URL alone "
            "(e.g. a presigned URL)"
        )
    host = parts.hostname
    if not host:
        raise ImageFetchFailed(f"{where}: the URL has no host")
    try:
        host = host.encode("idna").decode("ascii")  # an internationalised name as DNS and Host carry it
    except UnicodeError:
        raise ImageFetchFailed(f"{where}: {host!r} is not a valid host name") from None
    default_port = 443 if scheme == "https" else 80
    port = port or default_port
    shown_host = f"[{host}]" if ":" in host else host
    host_header = shown_host if port == default_port else f"{shown_host}:{port}"
    # Characters a URL may not carry raw (spaces, non-ASCII) percent-encoded, as browsers and requests do;
    # what is already encoded stays as it is.
    target = quote(parts.path or "/", safe=_URL_SAFE) + (
        f"?{quote(parts.query, safe=_URL_SAFE)}" if parts.query else ""
    )
    return _Hop(url, scheme, host, port, target, host_header)


def _checked_addresses(
    hop: _Hop,
    *,
    allow_private: bool,
    allowed_networks: Sequence[IPNetwork],
    resolver: Resolver,
    deadline: _Deadline,
    field_name: str,
) -> list[str]:
    """The addresses to connect to for `hop`, each allowed; refuses the hop when any is not (a name
    with one public and one private address is refused: which one a connect picks is not ours to say)."""
    where = f"{field_name} {describe_url(hop.url)}"
    try:
        literal: IPAddress | None = ipaddress.ip_address(hop.host)
    except ValueError:
        literal = None
    names = (
        [str(literal)]
        if literal is not None
        else _resolve_within(resolver, hop.host, hop.port, deadline, where)
    )
    trusted = True  # every address inside an operator-allowed network
    for name in names:
        ip = ipaddress.ip_address(name.split("%", 1)[0])  # an IPv6 zone (fe80::1%eth0) is not part of it
        if any(ip in network for network in allowed_networks):
            continue
        trusted = False
        kind = address_refusal(ip)
        if kind is not None and not allow_private:
            resolved = "" if literal is not None else f" ({hop.host} resolves to {ip})"
            raise ImageFetchFailed(
                f"{where}: refused to fetch from a {kind} address{resolved}; image URLs must point at "
                "public hosts (an operator can allow private ones with FUSELINE_ALLOW_PRIVATE_URLS=1)"
            )
    if hop.scheme == "http" and not (allow_private or trusted):
        raise ImageFetchFailed(f"{where}: plain http:// is not fetched; use an https:// URL")
    return names


def _ca_bundle() -> str | None:
    # The same CA bundle requests uses (certifi, installed with it), so TLS checks do not depend on the
    # image's system store; None falls back to the system's default certificates.
    try:
        import certifi
    except ImportError:
        return None
    return certifi.where()


def _shutdown(conn: Any) -> None:
    sock = getattr(conn, "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _connection(hop: _Hop, address: str, deadline: _Deadline, ca_certs: str | None) -> Any:
    """An unconnected urllib3 connection to `address` that speaks to `hop.host` (Host header, SNI and
    certificate check); connect/read timeouts are what is left of the deadline."""
    from urllib3.connection import HTTPConnection, HTTPSConnection

    timeout = max(deadline.remaining(), 0.001)
    if hop.scheme == "http":
        return HTTPConnection(address, hop.port, timeout=timeout)
    try:
        ipaddress.ip_address(hop.host)
        server_hostname = None  # an IP literal URL: no SNI, the certificate must name the IP
    except ValueError:
        server_hostname = hop.host
    return HTTPSConnection(
        address,
        hop.port,
        timeout=timeout,
        server_hostname=server_hostname,
        assert_hostname=hop.host,
        ca_certs=ca_certs,
    )


@dataclass
class _Open:
    """A sent request: its connection, the response (headers read, body not) and the armed watchdog."""

    conn: Any
    response: Any
    watchdog: threading.Timer

    def close(self) -> None:
        self.watchdog.cancel()
        self.conn.close()


def _send(
    hop: _Hop, addresses: Sequence[str], deadline: _Deadline, ca_certs: str | None, where: str
) -> _Open:
    """GET `hop` from the first checked address that answers. A watchdog shuts the socket down when the
    deadline passes, whatever phase the exchange is in (connect, TLS, headers, body): per-read socket
    timeouts alone let a server that sends a byte now and then go on for ever."""
    from urllib3.exceptions import HTTPError as Urllib3Error

    last: BaseException | None = None
    for address in addresses:
        if deadline.passed:
            break
        conn = _connection(hop, address, deadline, ca_certs)
        watchdog = threading.Timer(max(deadline.remaining(), 0), _shutdown, (conn,))
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.request(
                "GET",
                hop.target,
                headers={
                    "Host": hop.host_header,
                    "User-Agent": _USER_AGENT,
                    "Accept": "image/png, image/jpeg, image/webp",
                    # A compressed body could expand past the byte cap after the check: ask for none.
                    "Accept-Encoding": "identity",
                },
                preload_content=False,
                decode_content=False,
            )
            return _Open(conn, conn.getresponse(), watchdog)
        except (Urllib3Error, OSError, http.client.HTTPException, ValueError) as err:
            watchdog.cancel()
            conn.close()
            last = err
    if deadline.passed:
        raise ImageFetchFailed(f"{where}: no answer within the {deadline.seconds:g} s fetch timeout")
    detail = f"{type(last).__name__}: {last}" if last else "no address to try"
    raise ImageFetchFailed(redact(f"{where}: cannot connect ({detail})"))


def _read_capped(response: Any, max_bytes: int, where: str) -> bytes:
    length = response.headers.get("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > max_bytes:
        raise ImageInvalid(
            f"{where}: the image is {int(length)} bytes, over the {max_bytes}-byte input limit; send a "
            "smaller image (PNG/JPEG/WebP at the size you generate at)"
        )
    data = bytearray()
    for chunk in response.stream(_CHUNK):
        data += chunk
        if len(data) > max_bytes:
            raise ImageInvalid(
                f"{where}: the body passed the {max_bytes}-byte input limit (no or wrong Content-Length); "
                "send a smaller image"
            )
    return bytes(data)


def fetch_url(
    url: str,
    *,
    max_bytes: int,
    timeout_s: float,
    max_redirects: int,
    allow_private: bool = False,
    allowed_networks: Sequence[IPNetwork] = (),
    resolver: Resolver | None = None,
    ca_certs: str | None = None,
    field_name: str = "image",
) -> FetchedBytes:
    """GET `url` under the rules in this module's docstring; the body of the final 200 answer.

    `allow_private`: fetch from any address, and plain http:// too (FUSELINE_ALLOW_PRIVATE_URLS=1; tests).
    `allowed_networks`: address ranges allowed even when private (an operator's internal image host);
    plain http:// is accepted when every address of a host is inside them. `resolver`: how host names
    become addresses (default: the system resolver); tests pass their own to name hosts without DNS.
    `ca_certs`: a PEM file of the certificate authorities HTTPS servers are checked against (default:
    certifi's bundle, as requests uses). `field_name` names the job field in messages."""
    from urllib3.exceptions import HTTPError as Urllib3Error

    resolver = resolver or system_resolver
    deadline = _Deadline(timeout_s)
    ca_certs = ca_certs or _ca_bundle()
    seen: list[str] = []
    hop = _parse(url, field_name)
    while True:
        where = f"{field_name} {describe_url(hop.url)}"
        addresses = _checked_addresses(
            hop,
            allow_private=allow_private,
            allowed_networks=allowed_networks,
            resolver=resolver,
            deadline=deadline,
            field_name=field_name,
        )
        sent = _send(hop, addresses, deadline, ca_certs, where)
        response = sent.response
        try:
            status = response.status
            if status in REDIRECT_STATUSES:
                location = response.headers.get("Location")
                if not location:
                    raise ImageFetchFailed(f"{where}: HTTP {status} redirect without a Location header")
                seen.append(hop.url)
                next_url = urljoin(hop.url, location.strip())
                if next_url in seen:
                    raise ImageFetchFailed(
                        f"{where}: redirect loop (HTTP {status} back to {describe_url(next_url)}); fix the "
                        "image URL"
                    )
                if len(seen) > max_redirects:
                    raise ImageFetchFailed(
                        f"{field_name} {describe_url(url)}: more than {max_redirects} redirects (the last to "
                        f"{describe_url(next_url)}); give the image's final URL"
                    )
                hop = _parse(next_url, field_name)
                continue
            if status != 200:
                reason = response.reason or ""
                raise ImageFetchFailed(f"{where}: HTTP {status} {reason}".rstrip() + "; check the URL")
            encoding = (response.headers.get("Content-Encoding") or "identity").strip().lower()
            if encoding != "identity":
                raise ImageFetchFailed(
                    f"{where}: the server sent a {encoding}-encoded body although asked for none; serve "
                    "the image file as is"
                )
            data = _read_capped(response, max_bytes, where)
            # The watchdog's shutdown can look like a clean end to a body delimited by the connection's
            # close: a body that ends after the deadline is not trusted.
            if deadline.passed:
                raise TimeoutError("deadline passed")
            return FetchedBytes(data, response.headers.get("Content-Type"), redirects=len(seen))
        except (Urllib3Error, OSError, http.client.HTTPException) as err:
            if deadline.passed:
                raise ImageFetchFailed(
                    f"{where}: no complete answer within the {deadline.seconds:g} s fetch timeout"
                ) from None
            raise ImageFetchFailed(
                redact(f"{where}: transfer failed ({type(err).__name__}: {err})")
            ) from None
        finally:
            sent.close()


def fetch_s3_object(
    uri: str,
    *,
    max_bytes: int,
    client: Any | None = None,
    read_timeout_s: int = 30,
    allowed_buckets: frozenset[str] | None = None,
    field_name: str = "image",
) -> FetchedBytes:
    """The object `s3://bucket/key`, read with the worker's own S3 client and credentials.

    `client`: a boto3 S3 client (the worker's shared one); None makes one with
    fuseline.core.s3.make_client, the factory the sync and the image upload use. `allowed_buckets`: when
    set, other buckets are refused before any request. A larger object than `max_bytes` is refused from
    its size, before its body is read."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    where = f"{field_name} {uri}"
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket or not key:
        raise ImageFetchFailed(f"{where}: an S3 image must be written s3://<bucket>/<key>")
    if allowed_buckets is not None and bucket not in allowed_buckets:
        allowed = ", ".join(sorted(allowed_buckets)) or "none"
        raise ImageFetchFailed(
            f"{where}: bucket {bucket!r} is not one this worker reads images from (allowed: {allowed}); "
            "use an https:// URL or base64, or ask the operator to add the bucket to FUSELINE_INPUT_BUCKETS"
        )
    if client is None:
        from fuseline.core.errors import ConfigInvalid
        from fuseline.core.s3 import S3Config, make_client

        try:
            client = make_client(S3Config.from_env(), read_timeout=read_timeout_s)
        except ConfigInvalid as err:
            raise ImageFetchFailed(
                redact(f"{where}: the worker cannot make an S3 client: {err.message}")
            ) from None
    endpoint = client.meta.endpoint_url
    try:
        response = client.get_object(Bucket=bucket, Key=key)
        body = response["Body"]
        try:
            size = int(response.get("ContentLength") or 0)
            if size > max_bytes:
                raise ImageInvalid(
                    f"{where}: the object is {size} bytes, over the {max_bytes}-byte input limit; send a "
                    "smaller image"
                )
            data = body.read(max_bytes + 1)
        finally:
            body.close()
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", "")) or "error"
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchKey", "404", "NotFound"):
            hint = "no such object; check the key"
        elif code == "NoSuchBucket":
            hint = f"bucket {bucket!r} does not exist at {endpoint}"
        elif code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            hint = "the worker's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY may not read it (s3:GetObject)"
        else:
            hint = f"{endpoint} answered {code}"
        raise ImageFetchFailed(redact(f"{where}: S3 {code} (HTTP {status}): {hint}")) from None
    except NoCredentialsError:
        raise ImageFetchFailed(
            f"{where}: the worker has no AWS credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "on the endpoint, or send the image by URL or base64"
        ) from None
    except BotoCoreError as err:
        raise ImageFetchFailed(
            redact(f"{where}: S3 endpoint {endpoint} unreachable ({err}); check AWS_ENDPOINT_URL")
        ) from None
    if len(data) > max_bytes:
        raise ImageInvalid(
            f"{where}: the object passed the {max_bytes}-byte input limit; send a smaller image"
        )
    return FetchedBytes(data, response.get("ContentType"))
