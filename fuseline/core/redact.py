"""Secret redaction for logs, exceptions and output: API keys, tokens, signed URLs, Authorization headers.

Stdlib only, so the worker, the stages and the CLI can all import it cheaply.

Three layers, applied in order by `redact()`:
1. exact values of secrets we know: the environment variables in `SECRET_ENV_VARS` (read at call time,
   so a key set after import is still caught) and anything passed to `register_secret()`;
2. credentials inside URLs: `?token=…`, `&X-Amz-Signature=…` and similar query parameters, and
   `user:password@` userinfo;
3. key/value- and header-shaped text: `Authorization: Bearer …`, `Bearer …` anywhere, `"token": "…"`,
   `aws_secret_access_key = …`, `X-Amz-Security-Token: …`, `Cookie: …`, and `hf_…` tokens by their shape.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable

__all__ = [
    "MASK",
    "SECRET_ENV_VARS",
    "SECRET_QUERY_PARAMS",
    "RedactingFilter",
    "install_redaction",
    "redact",
    "register_secret",
]

MASK = "***"

# Environment variables whose values are secrets wherever they appear.
SECRET_ENV_VARS: tuple[str, ...] = (
    "CIVITAI_API_KEY",
    "CIVITAI_TOKEN",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "RUNPOD_API_KEY",
    "RUNPOD_AI_API_KEY",
    "FUSELINE_API_KEY",
)

# Values shorter than this are not replaced verbatim: masking "1" or "true" everywhere would shred the
# text and tell an attacker nothing useful anyway. Real keys are far longer.
_MIN_SECRET_LEN = 6

# Query parameters that carry credentials (case-insensitive): Civitai's `token`, S3/GCS presigned-URL
# signatures and credentials, generic api keys.
SECRET_QUERY_PARAMS: tuple[str, ...] = (
    "token",
    "access_token",
    "api_key",
    "apikey",
    "key",
    "sig",
    "signature",
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "x-goog-signature",
    "x-goog-credential",
    "awsaccesskeyid",
    "password",
    "secret",
)
_QUERY_RE = re.compile(
    r"(?P<lead>[?&;](?:"
    + "|".join(re.escape(p) for p in SECRET_QUERY_PARAMS)
    + r")=)(?P<value>[^&#\s'\"<>]+)",
    re.IGNORECASE,
)
# scheme://user:password@host. The password runs to the LAST "@" of the authority (greedy): an unencoded
# "@" in it ("p@ss") must not leave its tail behind.
_USERINFO_RE = re.compile(
    r"(?P<lead>\b[a-z][a-z0-9+.-]*://[^/?#\s:'\"]+:)(?P<value>[^/?#\s'\"]+)(?=@)", re.IGNORECASE
)
# Names that hold a secret when they are a key in JSON/YAML/INI text or a header name:
# `"token": "x"`, `aws_secret_access_key = x`, `X-Amz-Security-Token: x`. Not bare `key` (S3 object keys).
_SECRET_KEY_NAMES = (
    "token",
    "access_token",
    "refresh_token",
    "id_token",
    "auth_token",
    "api_key",
    "apikey",
    "api-key",
    "x-api-key",
    "secret",
    "client_secret",
    "password",
    "passwd",
    "aws_secret_access_key",
    "aws_session_token",
    "secret_access_key",
    "session_token",
    "x-amz-security-token",
    # SigV4's Authorization parts (`Credential=AKID.../scope, Signature=...`), as echoing servers repeat them.
    "credential",
    "signature",
)
_KEY_VALUE_RE = re.compile(
    r"(?P<lead>(?<![\w-])(?P<q>['\"]?)(?:"
    + "|".join(re.escape(n) for n in _SECRET_KEY_NAMES)
    + r")(?P=q)\s*[:=]\s*['\"]?)(?P<value>[^\s'\",}&]+)",
    re.IGNORECASE,
)
# Cookie / Set-Cookie headers: the whole value (several `name=value;` pairs) up to the end of the line.
_COOKIE_RE = re.compile(r"(?P<lead>(?<![\w-])(?:set-)?cookie['\"]?\s*:\s*['\"]?)(?P<value>[^\n'\"]+)", re.I)
# Authorization / Proxy-Authorization headers in any rendering: "Authorization: Bearer x",
# "'Authorization': 'Bearer x'", "authorization=Basic x".
_AUTH_HEADER_RE = re.compile(
    r"(?P<lead>(?:proxy-)?authorization['\"]?\s*[:=]\s*['\"]?)"
    r"(?P<value>aws4-hmac-sha256[^'\"\n]*|(?:(?:bearer|basic|token|digest)\s+)?[^\s'\",}]+)",
    re.IGNORECASE,
)
_BEARER_RE = re.compile(r"(?P<lead>\bbearer\s+)(?P<value>[A-Za-z0-9._~+/=-]{6,})", re.IGNORECASE)
# Hugging Face user access tokens have a recognisable shape even when we never saw the value.
_HF_TOKEN_RE = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")

_extra_secrets: set[str] = set()
_extra_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Mask `value` in every later `redact()` call (for secrets that do not come from SECRET_ENV_VARS,
    e.g. a key read from a file or passed on the command line)."""
    if value and len(value) >= _MIN_SECRET_LEN:
        with _extra_lock:
            _extra_secrets.add(value)


def _known_secrets(extra: Iterable[str] = ()) -> list[str]:
    values = {os.environ.get(name, "") for name in SECRET_ENV_VARS}
    with _extra_lock:
        values |= _extra_secrets
    values |= set(extra)
    # Longest first, so a secret that contains another is masked whole.
    return sorted((v for v in values if v and len(v) >= _MIN_SECRET_LEN), key=len, reverse=True)


def redact(text: object, *, extra_secrets: Iterable[str] = ()) -> str:
    """`text` (anything; str() is applied) with every secret we can recognise replaced by `***`."""
    out = str(text)
    for secret in _known_secrets(extra_secrets):
        out = out.replace(secret, MASK)
    out = _QUERY_RE.sub(lambda m: m["lead"] + MASK, out)
    out = _USERINFO_RE.sub(lambda m: m["lead"] + MASK, out)
    out = _KEY_VALUE_RE.sub(lambda m: m["lead"] + MASK, out)
    out = _COOKIE_RE.sub(lambda m: m["lead"] + MASK, out)
    out = _AUTH_HEADER_RE.sub(lambda m: m["lead"] + MASK, out)
    out = _BEARER_RE.sub(lambda m: m["lead"] + MASK, out)
    out = _HF_TOKEN_RE.sub(MASK, out)
    return out


class RedactingFilter(logging.Filter):
    """A logging filter that renders each record's message (and traceback) and redacts it.

    Attach it to handlers (a filter on a logger does not see records propagated from its children):
    `install_redaction()` does that for the root logger's handlers.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must still be logged, and still redacted
            message = f"{record.msg!r} % {record.args!r}"
        record.msg = redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install_redaction(logger: logging.Logger | None = None) -> RedactingFilter:
    """Add one RedactingFilter to every handler of `logger` (default: root) and return it. Idempotent."""
    target = logger or logging.getLogger()
    flt = next(
        (f for h in target.handlers for f in h.filters if isinstance(f, RedactingFilter)),
        RedactingFilter(),
    )
    for handler in target.handlers:
        if flt not in handler.filters:
            handler.addFilter(flt)
    return flt
