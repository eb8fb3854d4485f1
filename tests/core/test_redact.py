"""fuseline.core.redact: secrets out of text, log records and tracebacks."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

import pytest

from fuseline.core.redact import MASK, RedactingFilter, install_redaction, redact, register_secret

KEY = "civ_9f8e7d6c5b4a39281706f5e4d3c2b1a0"
FAKE_HF = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz012345"


@pytest.fixture(autouse=True)
def _secrets(monkeypatch):
    monkeypatch.setenv("CIVITAI_API_KEY", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f"GET https://civitai.com/api/download/models/1?token={KEY}&type=Model", KEY),
        ("https://s3.example/b/k?X-Amz-Credential=AKIAX%2F2025&X-Amz-Signature=deadbeef00", "deadbeef00"),
        ("https://s3.example/b/k?X-Amz-Credential=AKIAEXAMPLE123%2F2025&X-Amz-Date=1", "AKIAEXAMPLE123"),
        ("https://x.test/f?token=sometoken123&a=1", "sometoken123"),
        ("headers: {'Authorization': 'Bearer abc.def-ghi', 'Range': 'bytes=0-'}", "abc.def-ghi"),
        ("Authorization: Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA=="),
        ("proxy at https://user:hunter2pass@proxy.test:3128/", "hunter2pass"),
        # A made-up token, assembled so that credential scanners of the repository do not flag the test.
        (f"token {FAKE_HF} leaked", FAKE_HF),
        ("secret wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY in a message", "wJalrXUtnFEMI/K7MDENG"),
        (f"plain {KEY} in a sentence", KEY),
        ('{"token": "tok-0123456789abcdef", "name": "x"}', "tok-0123456789abcdef"),
        ("{'api_key': 'ak-0123456789abcdef'}", "ak-0123456789abcdef"),
        ('{"API_KEY":"ak-0123456789abcdef"}', "ak-0123456789abcdef"),
        ("[default]\naws_secret_access_key = cfgSecret0123/abc+def\nregion = us-east-1", "cfgSecret0123"),
        ("aws_session_token=FwoGZXIvYXdzEJr0123", "FwoGZXIvYXdzEJr0123"),
        ("X-Amz-Security-Token: IQoJb3JpZ2luX2VjEJr0123", "IQoJb3JpZ2luX2VjEJr0123"),
        ("{'x-amz-security-token': 'IQoJb3JpZ2luX2VjEJr0123'}", "IQoJb3JpZ2luX2VjEJr0123"),
        ("Cookie: session=s3ss10nvalue; csrftoken=c5rfvalue\nAccept: */*", "c5rfvalue"),
        ("Cookie: session=s3ss10nvalue; csrftoken=c5rfvalue\nAccept: */*", "s3ss10nvalue"),
        ("{'Set-Cookie': 'sid=s1dvalue123; Path=/'}", "s1dvalue123"),
        ("https://user:p@ssw0rdtail@host.test/x", "ssw0rdtail"),
        ("https://me@corp.example:hunter2pass@host.test/x", "hunter2pass"),
    ],
)
def test_secrets_are_masked(text, secret):
    out = redact(text)
    assert secret not in out and MASK in out


@pytest.mark.parametrize(
    "text",
    [
        "GET https://example.com/models/a.safetensors?download=true&type=Model 200 (3.2 MiB/s)",
        '{"key": "loras/style.safetensors", "max_tokens": 77, "tokenizer": "clip"}',
        "https://host.test:8443/models/v@2/x.safetensors",
        "Accept: */*\nAccept-Encoding: identity",
    ],
)
def test_ordinary_text_is_left_alone(text):
    assert redact(text) == text


def test_env_is_read_at_call_time(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "set-after-import-1234")
    assert "set-after-import-1234" not in redact("x set-after-import-1234 y")


def test_registered_and_extra_secrets():
    register_secret("from-a-file-secret-77")
    assert redact("a from-a-file-secret-77 b") == f"a {MASK} b"
    assert redact("a once-only-secret-88 b", extra_secrets=["once-only-secret-88"]) == f"a {MASK} b"
    assert redact("value 1 stays", extra_secrets=["1"]) == "value 1 stays"  # too short to mask


def test_logging_filter_redacts_message_args_and_traceback():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("test_redact.filter")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("download of %s failed", f"https://h/x?token={KEY}")
        try:
            raise RuntimeError(f"boom with Authorization: Bearer {KEY}")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert KEY not in text
    assert "token=***" in text and "RuntimeError: boom" in text


def test_install_redaction_is_idempotent():
    logger = logging.getLogger("test_redact.install")
    handler = logging.StreamHandler(io.StringIO())
    logger.addHandler(handler)
    try:
        first = install_redaction(logger)
        second = install_redaction(logger)
        assert first is second and handler.filters.count(first) == 1
    finally:
        logger.removeHandler(handler)


def test_fuseline_lock_redacts_what_the_sources_log_on_stderr(tmp_path):
    # A fresh interpreter: the root logger starts with no handlers, as in a real `fuseline lock`.
    script = (
        "import logging\n"
        "from fuseline.cli import app\n"
        "from fuseline.core.redact import register_secret\n"
        "try:\n"
        "    app(['lock', 'missing.json'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "register_secret('a-key-read-from-a-file-123')\n"
        "logging.getLogger('fuseline.sources').warning('retrying with a-key-read-from-a-file-123')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert "no such file" in proc.stdout
    # stderr is a pipe, not a terminal: one JSON object per record (fuseline.core.logs).
    (record,) = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert record["logger"] == "fuseline.sources" and record["message"] == f"retrying with {MASK}"
    assert "a-key-read-from-a-file-123" not in proc.stderr
