"""Catalog source strings (`civitai:`, `hf:`, `https://`, `s3://`, `file:`): their syntax and their parts."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from fuseline.core.errors import FuselineError
from fuseline.core.redact import SECRET_QUERY_PARAMS, redact
from fuseline.core.safetensors_io import PICKLE_SUFFIXES

SHA256_PATTERN = r"^[0-9a-fA-F]{64}$"


# The syntax of a source string, for editors that read the JSON Schema. `parse_source` is the authority
# (it explains what is wrong); tests check that both accept the same strings.
def _any_case(word: str) -> str:
    # JSON Schema regexes take no flags, so case-insensitivity is spelled out per letter.
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in word)


# An https URL with credentials in it would be copied into dvc.lock, fuseline.json and the release manifest.
_SECRET_QUERY = r"\?(?:[^#\s]*[&;])?(?:" + "|".join(_any_case(p) for p in SECRET_QUERY_PARAMS) + ")="
SOURCE_PATTERN = (
    # No control character anywhere (parse_source refuses what str.isprintable does; C0/C1 controls are
    # what a Python `re` pattern can name of those).
    r"^(?![^\x00-\x1f\x7f-\x9f]*[\x00-\x1f\x7f-\x9f])"
    r"(civitai:[0-9]+"
    r"|hf:[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(?:/(?!\.\.?[/@])[^/@\s]+)*@[0-9a-f]{40}"
    # A host: not empty, so not starting with the port's colon (https://:80 names no host), and no
    # brackets (an IPv6 literal host is refused: parse_source).
    r"|https://(?![^\s?#]*" + _SECRET_QUERY + r")[^/\s?#@:\[\]][^/\s?#@\[\]]*(?:[/?#][^\s]*)?"
    r"|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/(?![^\s?]*" + _SECRET_QUERY + r")[^\s]+"
    r"|file:(?!//)\S(?:[^\x00-\x1f]*\S)?)$"
)

_HF_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HF_REVISION = re.compile(r"^[0-9a-f]{40}$")
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
SOURCE_FORMS = (
    "civitai:<modelVersionId>, hf:<org>/<repo>[/<file>]@<40-hex revision>, https://<host>/<path>, "
    "s3://<bucket>/<key> or file:<path>"
)


@dataclass(frozen=True)
class ParsedSource:
    """A source string taken apart. Which fields are set depends on `scheme`:
    civitai: version_id; hf: repo, path (None for the whole repo), revision; https: url;
    s3: bucket, key; file: path (as written, relative to the catalog's folder unless absolute)."""

    scheme: Literal["civitai", "hf", "https", "s3", "file"]
    raw: str
    version_id: str | None = None
    repo: str | None = None
    path: str | None = None
    revision: str | None = None
    url: str | None = None
    bucket: str | None = None
    key: str | None = None

    @property
    def filename(self) -> str | None:
        """The last path component of the file the source names, when the source string shows one
        (a Civitai version id does not: its file name is known only after asking Civitai)."""
        if self.scheme == "hf":
            return self.path.rsplit("/", 1)[-1] if self.path else None
        if self.scheme == "https":
            tail = urlsplit(self.url or "").path.rsplit("/", 1)[-1]
            return tail or None
        if self.scheme == "s3":
            return (self.key or "").rsplit("/", 1)[-1] or None
        if self.scheme == "file":
            return (self.path or "").rstrip("/").rsplit("/", 1)[-1] or None
        return None

    @property
    def is_pickle(self) -> bool:
        """True when the named file has a pickle-based format's extension (PICKLE_SUFFIXES)."""
        name = (self.filename or "").lower()
        return name.endswith(PICKLE_SUFFIXES)


class SourceStringError(FuselineError, ValueError):
    """A source string that cannot be used: `problem` says what is wrong, `hint` how to write it. Both are
    redacted here: a refused source may be refused precisely for the secret in it, and is still shown."""

    code = "SOURCE_INVALID"

    def __init__(self, problem: str, hint: str):
        self.problem = redact(problem)
        self.hint = redact(hint)
        super().__init__(f"{self.problem}; {self.hint}")

    def __str__(self) -> str:
        return self.message


_NO_SECRETS = (
    "the source is copied into dvc.lock, fuseline.json and the release manifest, so it must hold no "
    "credentials: use civitai:<modelVersionId> (the key comes from CIVITAI_API_KEY) or copy the file "
    "to a bucket and use s3://<bucket>/<key> (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
)
_S3_NO_SECRETS = (
    "the source is copied into dvc.lock, fuseline.json and the release manifest, so it must hold no "
    "credentials: write s3://<bucket>/<key> and give the keys as AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), never in the source"
)


def _secret_parameters(query: str) -> list[str]:
    """The query parameters of `query` whose names carry credentials (SECRET_QUERY_PARAMS)."""
    return [
        name
        for name, sep, _ in (p.partition("=") for p in re.split(r"[&;]", query))
        if sep and name.lower() in SECRET_QUERY_PARAMS
    ]


_HF_PIN_HINT = (
    "pin it to a commit: hf:<org>/<repo>[/<file>]@<40-hex commit sha>, the sha from the repo's "
    "'Files and versions' -> 'History' page (a branch or tag such as main moves)"
)


def parse_source(text: str) -> ParsedSource:
    """Parse a source string (`civitai:`, `hf:`, `https://`, `s3://`, `file:`). Raises SourceStringError (a
    ValueError) saying what is wrong and what a valid one looks like."""
    if not isinstance(text, str):
        raise SourceStringError(
            f"a source must be a string, got {type(text).__name__}", f"write one of {SOURCE_FORMS}"
        )
    if not text or text != text.strip():
        raise SourceStringError(
            f"source {text!r} is empty or has surrounding whitespace", f"write one of {SOURCE_FORMS}"
        )
    if not text.isprintable():
        raise SourceStringError(
            f"source {text!r} contains control characters", f"write one of {SOURCE_FORMS}"
        )
    if text.startswith("civitai:"):
        version_id = text[len("civitai:") :]
        if not version_id.isascii() or not version_id.isdigit():
            raise SourceStringError(
                f"civitai source {text!r} needs a numeric model version id",
                "write civitai:<modelVersionId>, the number after ?modelVersionId= in the Civitai page URL",
            )
        return ParsedSource("civitai", text, version_id=version_id)
    if text.startswith("hf:"):
        body = text[len("hf:") :]
        if "@" not in body:
            raise SourceStringError(f"hf source {text!r} is not pinned to a revision", _HF_PIN_HINT)
        location, revision = body.rsplit("@", 1)
        if not _HF_REVISION.match(revision):
            raise SourceStringError(
                f"hf source {text!r} is pinned to {revision!r}, which is not a 40-hex commit sha",
                _HF_PIN_HINT,
            )
        parts = location.split("/")
        if len(parts) < 2 or not all(_HF_NAME.match(p) for p in parts[:2]):
            raise SourceStringError(
                f"hf source {text!r} does not name a repository",
                "write hf:<org>/<repo>[/<file in repo>]@<revision>",
            )
        path_parts = parts[2:]
        if any(p in ("", ".", "..") or "@" in p or any(c.isspace() for c in p) for p in path_parts):
            raise SourceStringError(
                f"hf source {text!r} has an empty, '.', '..' or unusual component in its file path",
                "write the path inside the repository, e.g. hf:org/repo/vae/model.safetensors@<revision>",
            )
        return ParsedSource(
            "hf", text, repo="/".join(parts[:2]), path="/".join(path_parts) or None, revision=revision
        )
    if text.startswith("https://"):
        netloc = re.split(r"[/?#]", text[len("https://") :], maxsplit=1)[0]
        if "[" in netloc or "]" in netloc:
            # urlsplit would raise a bare ValueError on a malformed one; no model host needs the form.
            raise SourceStringError(
                f"https source {text!r} has a bracketed (IPv6 literal) host, which is not supported",
                "write https://<host name>/<path>",
            )
        try:
            parts = urlsplit(text)
        except ValueError as exc:
            raise SourceStringError(
                f"https source {text!r} is not a valid URL ({exc})", "write https://<host>/<path>"
            ) from None
        if not parts.hostname or any(c.isspace() for c in text):
            raise SourceStringError(
                f"https source {text!r} is not a valid URL", "write https://<host>/<path>"
            )
        if "@" in parts.netloc:
            # Named without the password: this message is printed and logged.
            raise SourceStringError(
                f"https source for host {parts.hostname!r} has a user:password@ part", _NO_SECRETS
            )
        secret = _secret_parameters(parts.query)
        if secret:
            raise SourceStringError(
                f"https source {parts.scheme}://{parts.netloc}{parts.path} has a secret-looking query "
                f"parameter {secret[0]!r}",
                _NO_SECRETS,
            )
        return ParsedSource("https", text, url=text)
    if text.startswith("s3://"):
        bucket, _, key = text[len("s3://") :].partition("/")
        if "@" in bucket:
            # Named without what comes before the "@": this message is printed and logged.
            raise SourceStringError(
                f"s3 source for bucket {bucket.rsplit('@', 1)[1]!r} has a user:password@ part",
                _S3_NO_SECRETS,
            )
        secret = _secret_parameters(key.partition("?")[2])
        if secret:
            raise SourceStringError(
                f"s3 source s3://{bucket}/{key.partition('?')[0]} has a secret-looking query parameter "
                f"{secret[0]!r} (a presigned URL is not an s3 source)",
                _S3_NO_SECRETS,
            )
        if not _S3_BUCKET.match(bucket) or not key or any(c.isspace() for c in key):
            raise SourceStringError(
                f"s3 source {text!r} does not name a bucket and an object key",
                "write s3://<bucket>/<key> (bucket: 3-63 lowercase letters, digits, dots, hyphens)",
            )
        return ParsedSource("s3", text, bucket=bucket, key=key)
    if text.startswith("file:"):
        path = text[len("file:") :]
        if path.startswith("//"):
            raise SourceStringError(
                f"file source {text!r} is written as a file:// URL",
                "write file:<path> (relative to the catalog's folder) or file:/absolute/path",
            )
        if not path:
            raise SourceStringError(f"file source {text!r} names no path", "write file:<path>")
        if path != path.strip():
            raise SourceStringError(f"file source {text!r} has whitespace after file:", "write file:<path>")
        return ParsedSource("file", text, path=path)
    scheme = text.split(":", 1)[0] if ":" in text else ""
    if scheme == "http":
        raise SourceStringError(
            f"source {text!r} uses plain http", "use https:// so the download cannot be tampered with"
        )
    named = f"unknown source scheme {scheme!r}" if scheme else "no source scheme"
    raise SourceStringError(f"{named} in {text!r}", f"write one of {SOURCE_FORMS}")
