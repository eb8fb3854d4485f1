"""HTTP(S) download of one file: resumable (Range + If-Range), sha256-checked while streaming, retried with
backoff, renamed into place only when it matches.

Hand-written resume loop on top of `requests` rather than urllib3's `Retry`: Retry re-sends a request
from scratch, so after a connection dropped at 4 GB of 6 GB it would start again at byte 0, and it knows
nothing about our hash state or the partial file. Here each attempt asks for `bytes=<size of .part>-`,
feeds the arriving bytes into the same hashlib object that already hashed the prefix, and treats a 200
answer to a Range request (server ignored it, or the file changed: If-Range) as "start over".

Redirects are left to requests, which drops the Authorization header when a redirect leaves the host
(`Session.should_strip_auth`: another hostname, port or scheme); tests/stages/test_sources_civitai.py
checks that against two servers.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import os
import random
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from fuseline.core.redact import redact
from stages.settings import BuildSettings
from stages.sources.errors import SourceError

log = logging.getLogger("fuseline.sources")

USER_AGENT = "fuseline/0.1 (+https://github.com/fuseline)"
# Small enough that a dropped connection loses little (urllib3 discards a partly read chunk), big
# enough that per-chunk overhead stays far below disk and network speed.
CHUNK = 1 << 18
# Statuses worth another try: rate limits, timeouts and server-side failures.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524})
# Bodies that mean "this is a web page, not the file you asked for" (login walls, error pages).
_PAGE_CONTENT_TYPES = ("text/html", "application/json", "application/xhtml+xml", "text/xml")
_HEAD_SNIFF = 64


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try. `total_seconds` bounds the whole download's waiting between attempts: a
    Retry-After or backoff that would end past it fails at once with the last error."""

    total_seconds: float = 600.0
    max_attempts: int = 20
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    connect_timeout: float = 15.0
    read_timeout: float = 60.0

    @classmethod
    def from_settings(cls, settings: BuildSettings | None = None, **overrides: Any) -> RetryPolicy:
        """Defaults, with FUSELINE_DOWNLOAD_RETRY_SECONDS / FUSELINE_DOWNLOAD_ATTEMPTS from the build settings
        (read from the environment when none are given)."""
        settings = settings or BuildSettings.from_env()
        values: dict[str, Any] = {
            "total_seconds": settings.download_retry_seconds,
            "max_attempts": settings.download_attempts,
        }
        values.update(overrides)
        return cls(**values)

    def backoff(self, failures: int) -> float:
        """Exponential backoff with jitter (half fixed, half random), so many workers retrying the same
        server do not hit it in lockstep."""
        ceiling = min(self.backoff_max, self.backoff_base * (2 ** max(failures - 1, 0)))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


@dataclass(frozen=True)
class DownloadResult:
    path: Path
    sha256: str
    size: int
    attempts: int
    resumed_from: list[int] = field(default_factory=list)  # offsets at which a Range request resumed
    final_url: str = ""  # redacted


def new_session() -> requests.Session:
    session = requests.Session()
    session.headers["User-Agent"] = USER_AGENT
    return session


def part_path(dest: Path) -> Path:
    """The temporary file beside `dest`. Its name is fixed (not per process), so a rerun after a crash
    resumes where the last run stopped."""
    return dest.with_name(f".{dest.name}.part")


def _part_meta_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.part.json")


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class _Retry(Exception):
    """An attempt failed in a way worth retrying."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _Progress:
    """A tqdm bar on a terminal; in CI logs (not a tty) a plain line every `interval` seconds."""

    def __init__(self, label: str, total: int | None, initial: int, enabled: bool | None, interval: float):
        self.label, self.total, self.done = label, total, initial
        self.interval = interval
        self._bar = None
        self._last = time.monotonic()
        self._start_bytes, self._start = initial, time.monotonic()
        tty = sys.stderr.isatty()
        # Default on: a bar on a terminal, otherwise plain lines every `interval` s (CI logs).
        self.enabled = True if enabled is None else enabled
        if self.enabled and tty:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                file=sys.stderr, leave=False,
            )  # fmt: skip

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and time.monotonic() - self._last >= self.interval:
            self._last = time.monotonic()
            log.info("%s", self.line())

    def line(self) -> str:
        rate = (self.done - self._start_bytes) / max(time.monotonic() - self._start, 1e-6)
        of = f" / {_mib(self.total)}" if self.total else ""
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        return f"{self.label}: {_mib(self.done)}{of}{pct}, {rate / 2**20:.1f} MiB/s"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _mib(n: int | None) -> str:
    return f"{(n or 0) / 2**20:.1f} MiB"


def looks_like_page(head: bytes) -> bool:
    """True when the first bytes are an HTML/XML/JSON document rather than a model file. Safetensors
    starts with an 8-byte little-endian length whose high bytes are zero, so it never passes the
    printable-text test; pickles start with 0x80, zip files with PK\\x03\\x04."""
    text = head.lstrip()[:32]
    if not text:
        return False
    lowered = text.lower()
    if lowered.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")):
        return True
    printable = all(32 <= b < 127 or b in (9, 10, 13) for b in text[:16])
    return printable and text[:1] in (b"{", b"[")


def _page_error(label: str, url: str, content_type: str, head: bytes, auth_hint: str | None) -> SourceError:
    snippet = re.sub(r"\s+", " ", head[:200].decode("utf-8", "replace"))
    hint = auth_hint or "check the URL in a browser; it may need a login or have moved"
    return SourceError(
        "NOT_A_MODEL_FILE",
        f"{label}: {url} answered 200 with a web page (Content-Type {content_type or 'unset'}) "
        f"instead of the file: {snippet!r}. Sites do this for login walls and expired links; {hint}",
    )


def _sha256_of_file(path: Path, limit: int | None = None) -> Any:
    hasher = hashlib.sha256()
    with path.open("rb") as fh:
        remaining = limit
        while True:
            chunk = fh.read(CHUNK if remaining is None else min(CHUNK, remaining))
            if not chunk:
                break
            hasher.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    return hasher


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) from `bytes a-b/total` or `bytes */total`."""
    m = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value or "")
    if not m:
        return None, None
    first = int(m[1]) if m[1] is not None else None
    total = int(m[2]) if m[2] != "*" else None
    return first, total


class _Transfer:
    """The state of one download across its attempts: the partial file and its validator, the running
    sha256 of the bytes kept, the offsets resumed at, the progress display."""

    def __init__(
        self, dest: Path, expected: str | None, first_url: str, label: str, auth_hint: str | None
    ) -> None:
        self.label, self.auth_hint, self.expected = label, auth_hint, expected
        self.part, self.meta_path = part_path(dest), _part_meta_path(dest)
        # What the partial file belongs to: the pinned hash, or the URL without its (secret) query.
        self.identity = expected or first_url.split("?", 1)[0]
        self.validator = _load_validator(self.part, self.meta_path, self.identity)
        self.hasher: Any = None
        self.hashed = 0
        self.resumed: list[int] = []
        self.bar: _Progress | None = None
        self.final_url = first_url

    def size_on_disk(self) -> int:
        return self.part.stat().st_size if self.part.exists() else 0

    def _start_over(self) -> None:
        _truncate(self.part)
        self.hasher, self.hashed, self.validator = None, 0, None

    def request_headers(self, headers: Mapping[str, str] | None) -> tuple[int, dict[str, str]]:
        """(offset to resume at, headers) for the next attempt; the kept prefix goes through the hash."""
        offset = self.size_on_disk()
        if offset and not self.validator:
            # Without an ETag or Last-Modified there is no If-Range, and a server whose file changed would
            # answer the Range with 206 and the new bytes, spliced after the old prefix.
            log.info("%s: the server gave no ETag/Last-Modified to resume against; starting over", self.label)
            _truncate(self.part)
            offset, self.hasher, self.hashed = 0, None, 0
        if self.hasher is None or self.hashed != offset:
            # Resume: the prefix already on disk goes through the same hash as the new bytes.
            self.hasher, self.hashed = _sha256_of_file(self.part) if offset else hashlib.sha256(), offset
        # identity: Range offsets count the file's bytes, which a gzip-encoded answer would not.
        req_headers = {"Accept-Encoding": "identity", **(headers or {})}
        if offset:
            req_headers["Range"] = f"bytes={offset}-"
            if self.validator:
                req_headers["If-Range"] = self.validator
        return offset, req_headers

    def receive(self, resp: requests.Response, offset: int, progress: bool | None, interval: float) -> None:
        """Take one answer: raise SourceError for a final failure, _Retry for a transient one; otherwise
        write its body after the kept prefix (or from scratch), hashed and fsynced."""
        self.final_url = redact(resp.url)
        total = self._check_status(resp, offset)
        if total is _COMPLETE:
            return
        if resp.status_code == 206:
            self.resumed.append(offset)
            log.info("%s: resuming at %s", self.label, _mib(offset))
        else:
            if offset:
                log.info(
                    "%s: server sent the whole file (Range ignored or file changed); restarting", self.label
                )
            offset = 0
            self.hasher, self.hashed = hashlib.sha256(), 0
            self.validator = _validator(resp.headers)
            _save_validator(self.meta_path, self.identity, self.validator)
        content_type = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type in _PAGE_CONTENT_TYPES:
            head = resp.raw.read(512, decode_content=True)
            raise _page_error(self.label, redact(resp.url), content_type, head, self.auth_hint)
        if self.bar is None:
            self.bar = _Progress(self.label, total, offset, progress, interval)
        else:
            self.bar.total, self.bar.done = total, offset
        self._write_body(resp, offset, content_type)
        if total is not None and self.hashed != total:
            raise _Retry(f"connection ended at byte {self.hashed} of {total}")

    def _check_status(self, resp: requests.Response, offset: int) -> Any:
        """The size the body should reach (None: unknown), _COMPLETE when the partial file already holds
        the whole file; raises for an answer that carries no usable body."""
        status, label = resp.status_code, self.label
        if status in (401, 403):
            reason = "Unauthorized" if status == 401 else "Forbidden"
            raise SourceError(
                "AUTH_REQUIRED" if status == 401 else "FORBIDDEN",
                f"{label}: {redact(resp.url)} answered {status} {reason}"
                f"{_body_note(resp)}; {self.auth_hint or 'this URL needs credentials'}",
            )
        if status in (404, 410):
            raise SourceError(
                "NOT_FOUND",
                f"{label}: {redact(resp.url)} answered {status}: the file is not there; check the source in "
                "templates.json",
            )
        if status in RETRY_STATUSES:
            raise _Retry(
                f"HTTP {status}{_body_note(resp)}", parse_retry_after(resp.headers.get("Retry-After"))
            )
        if status == 416 and offset:
            _, total = _content_range(resp.headers.get("Content-Range"))
            if total == offset:  # the partial file is already complete
                return _COMPLETE
            self._start_over()
            raise _Retry(f"HTTP 416 for bytes={offset}- (server has {total} bytes); starting over")
        if status not in (200, 206):
            raise SourceError(
                "HTTP_ERROR", f"{label}: {redact(resp.url)} answered HTTP {status}{_body_note(resp)}"
            )
        if status == 206:
            first, total = _content_range(resp.headers.get("Content-Range"))
            if first != offset:
                self._start_over()
                raise _Retry(f"server resumed at byte {first}, not {offset}; starting over")
            return total
        return int(resp.headers["Content-Length"]) if resp.headers.get("Content-Length") else None

    def _write_body(self, resp: requests.Response, offset: int, content_type: str) -> None:
        assert self.bar is not None
        with self.part.open("ab" if offset else "wb") as fh:
            # A fresh body's start is sniffed before anything of it is kept: a login wall is not a model.
            head: bytes | None = None if offset else b""
            for chunk in resp.iter_content(CHUNK):
                if head is not None:
                    head += chunk
                    if len(head) < _HEAD_SNIFF:
                        continue
                    if looks_like_page(head):
                        raise _page_error(self.label, redact(resp.url), content_type, head, self.auth_hint)
                    chunk, head = head, None
                self._keep(fh, chunk)
            if head:  # a body shorter than the sniff window
                if looks_like_page(head):
                    raise _page_error(self.label, redact(resp.url), content_type, head, self.auth_hint)
                self._keep(fh, head)
            fh.flush()
            os.fsync(fh.fileno())

    def _keep(self, fh: Any, chunk: bytes) -> None:
        fh.write(chunk)
        self.hasher.update(chunk)
        self.hashed += len(chunk)
        assert self.bar is not None
        self.bar.update(len(chunk))

    def discard(self) -> None:
        _remove(self.part, self.meta_path)


# A partial file that already holds the whole file (the server answered 416 with its size).
_COMPLETE = object()


def download(
    url: str | Callable[[], str],
    dest: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    headers: Mapping[str, str] | None = None,
    auth_hint: str | None = None,
    label: str | None = None,
    policy: RetryPolicy | None = None,
    session: requests.Session | None = None,
    progress: bool | None = None,
    progress_interval: float = 10.0,
    sleep: Callable[[float], None] = time.sleep,
    _from_scratch: bool = False,
) -> DownloadResult:
    """Download `url` to `dest` through `.<name>.part` beside it; rename into place only if the bytes'
    sha256 equals `sha256` (when given). A wrong hash removes the partial file and raises; after a
    resumed transfer it first downloads the whole file once more (the resumed prefix may be stale).

    `url` may be a callable returning a fresh URL per attempt (presigned S3 URLs expire). `auth_hint`
    is appended to 401/403 and login-wall errors ("set CIVITAI_API_KEY ..."). `headers` may carry an
    Authorization header; requests drops it on a redirect to another host.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    policy = policy or RetryPolicy.from_settings()
    label = label or dest.name
    make_url = url if callable(url) else (lambda: url)

    def url_of() -> str:
        # A presigning callable (boto3) can fail on its own: no credentials, a bad key or region.
        try:
            return make_url()
        except SourceError:
            raise
        except Exception as exc:
            raise SourceError(
                "URL_FAILED",
                f"{label}: could not build the download URL: {type(exc).__name__}: {exc}; check the "
                "source and its credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL)",
            ) from None

    first_url = redact(url_of())
    own_session = session is None
    session = session or new_session()
    expected = sha256.lower() if sha256 else None
    transfer = _Transfer(dest, expected, first_url, label, auth_hint)
    attempts = failures = 0
    deadline = time.monotonic() + policy.total_seconds
    started = time.monotonic()
    try:
        while True:
            attempts += 1
            offset, req_headers = transfer.request_headers(headers)
            try:
                attempt_url = url_of()
                timeout = (policy.connect_timeout, policy.read_timeout)
                with session.get(attempt_url, headers=req_headers, stream=True, timeout=timeout) as resp:
                    transfer.receive(resp, offset, progress, progress_interval)
                break
            except _Retry as exc:
                reason, retry_after = exc.reason, exc.retry_after
            except (
                requests.ConnectionError,
                requests.Timeout,
                requests.exceptions.ChunkedEncodingError,
            ) as exc:
                reason, retry_after = f"{type(exc).__name__}: {redact(exc)}", None
            except requests.RequestException as exc:  # invalid URL, too many redirects, ...: not transient
                raise SourceError("HTTP_ERROR", f"{label}: {type(exc).__name__}: {exc}") from None
            # One failed attempt: wait and go again, unless the budget is spent.
            failures = 1 if transfer.size_on_disk() > offset else failures + 1  # progress resets the backoff
            delay = retry_after if retry_after is not None else policy.backoff(failures)
            elapsed = time.monotonic() - started
            if attempts >= policy.max_attempts or time.monotonic() + delay > deadline:
                raise SourceError(
                    "DOWNLOAD_FAILED",
                    f"{label}: gave up on {first_url} after {attempts} attempt(s) in {elapsed:.1f} s "
                    f"(retry budget {policy.total_seconds:.0f} s, next wait would be {delay:.1f} s); "
                    f"last error: {reason}. Try again later, or raise FUSELINE_DOWNLOAD_RETRY_SECONDS",
                )
            log.warning(
                "%s: attempt %d failed (%s); retrying in %.1f s", label, attempts, redact(reason), delay
            )
            sleep(delay)
    except BaseException:
        # A hard failure (not a retryable one) never leaves a partial file that belongs to a bad answer.
        # Keep a partial file only for interruption (Ctrl-C, kill), so the next run resumes.
        # Also keep it when the retry budget ran out: the next run resumes instead of starting over.
        exc = sys.exc_info()[1]
        keep = isinstance(exc, KeyboardInterrupt | SystemExit) or (
            isinstance(exc, SourceError) and exc.code == "DOWNLOAD_FAILED"
        )
        if not keep:
            transfer.discard()
        raise
    finally:
        if transfer.bar is not None:
            transfer.bar.close()
        if own_session:
            session.close()

    digest = transfer.hasher.hexdigest()
    if expected and digest != expected:
        transfer.discard()
        if transfer.resumed and not _from_scratch:
            # The kept prefix may come from an older upload that a reused validator did not reveal.
            log.warning("%s: sha256 mismatch after resuming; downloading the whole file again", label)
            return download(
                url,
                dest,
                sha256=sha256,
                headers=headers,
                auth_hint=auth_hint,
                label=label,
                policy=policy,
                session=None if own_session else session,
                progress=progress,
                progress_interval=progress_interval,
                sleep=sleep,
                _from_scratch=True,
            )
        raise SourceError(
            "SHA256_MISMATCH",
            f"{label}: downloaded {transfer.hashed} bytes from {first_url} with sha256 {digest}, but the "
            f"catalog pins {expected}; the file was removed. Either the upload changed or the pin is wrong: "
            "check the source, then fix sha256 in templates.json (fuseline lock fills it from Civitai/HF "
            "metadata)",
        )
    os.replace(transfer.part, dest)
    _remove(transfer.meta_path)
    bar = transfer.bar
    if bar is not None and not bar._bar and bar.enabled:
        log.info("%s", bar.line())
    return DownloadResult(dest, digest, transfer.hashed, attempts, transfer.resumed, transfer.final_url)


def _body_note(resp: requests.Response) -> str:
    """A short, redacted excerpt of an error body (Civitai explains 401s in JSON)."""
    try:
        text = resp.raw.read(300, decode_content=True).decode("utf-8", "replace")
    except Exception:
        return ""
    text = re.sub(r"\s+", " ", text).strip()
    return f" ({redact(text)})" if text else ""


def _validator(headers: Mapping[str, str]) -> str | None:
    """What to send as If-Range: a strong ETag, else Last-Modified (RFC 9110 forbids weak ETags there)."""
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("Last-Modified")


def _load_validator(part: Path, meta_path: Path, identity: str) -> str | None:
    """The If-Range validator saved with a partial file, if the partial file is for the same thing;
    a partial file of something else is thrown away."""
    if not part.exists():
        _remove(meta_path)
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        meta = {}
    if meta.get("for") != identity:
        _remove(part, meta_path)
        return None
    return meta.get("validator")


def _save_validator(meta_path: Path, identity: str, validator: str | None) -> None:
    meta_path.write_text(json.dumps({"for": identity, "validator": validator}))


def _truncate(path: Path) -> None:
    if path.exists():
        path.unlink()


def _remove(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def request_json(
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    label: str,
    policy: RetryPolicy | None = None,
    session: requests.Session | None = None,
    auth_hint: str | None = None,
    not_found: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Any:
    """GET a JSON API resource with the same retry rules as downloads (429/5xx/connection errors)."""
    policy = policy or RetryPolicy.from_settings()
    own = session is None
    session = session or new_session()
    started = time.monotonic()
    attempts = failures = 0
    try:
        while True:
            attempts += 1
            try:
                resp = session.get(
                    url, headers=dict(headers or {}), timeout=(policy.connect_timeout, policy.read_timeout)
                )
                if resp.status_code in RETRY_STATUSES:
                    raise _Retry(
                        f"HTTP {resp.status_code}", parse_retry_after(resp.headers.get("Retry-After"))
                    )
                if resp.status_code in (401, 403):
                    raise SourceError(
                        "AUTH_REQUIRED",
                        f"{label}: {url} answered {resp.status_code}; {auth_hint or 'needs credentials'}",
                    )
                if resp.status_code == 404:
                    raise SourceError(
                        "NOT_FOUND", f"{label}: {url} answered 404; {not_found or 'check the source'}"
                    )
                if resp.status_code != 200:
                    raise SourceError(
                        "HTTP_ERROR", f"{label}: {url} answered HTTP {resp.status_code}: {resp.text[:200]}"
                    )
                try:
                    return resp.json()
                except ValueError:
                    raise SourceError(
                        "BAD_RESPONSE", f"{label}: {url} answered 200 but not JSON: {resp.text[:200]!r}"
                    ) from None
            except _Retry as exc:
                reason, retry_after = exc.reason, exc.retry_after
            except (requests.ConnectionError, requests.Timeout) as exc:
                reason, retry_after = f"{type(exc).__name__}: {redact(exc)}", None
            except requests.RequestException as exc:
                raise SourceError("HTTP_ERROR", f"{label}: {type(exc).__name__}: {exc}") from None
            failures += 1
            delay = retry_after if retry_after is not None else policy.backoff(failures)
            if attempts >= policy.max_attempts or time.monotonic() - started + delay > policy.total_seconds:
                raise SourceError(
                    "REQUEST_FAILED",
                    f"{label}: gave up on {url} after {attempts} attempt(s); last error: {reason}. "
                    "Try again later, or raise FUSELINE_DOWNLOAD_RETRY_SECONDS",
                )
            log.warning("%s: attempt %d failed (%s); retrying in %.1f s", label, attempts, reason, delay)
            sleep(delay)
    finally:
        if own:
            session.close()
