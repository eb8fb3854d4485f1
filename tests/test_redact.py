"""fuseline.redact: secrets out of text, log records and tracebacks."""

from __future__ import annotations

import io
import logging

import pytest

from fuseline.redact import MASK, RedactingFilter, install_redaction, redact, register_secret

KEY = "civ_9f8e7d6c5b4a39281706f5e4d3c2b1a0"


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
        ("token hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345 leaked", "hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345"),
        ("secret wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY in a message", "wJalrXUtnFEMI/K7MDENG"),
        (f"plain {KEY} in a sentence", KEY),
    ],
)
def test_secrets_are_masked(text, secret):
    out = redact(text)
    assert secret not in out and MASK in out


def test_ordinary_text_is_left_alone():
    text = "GET https://example.com/models/a.safetensors?download=true&type=Model 200 (3.2 MiB/s)"
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
