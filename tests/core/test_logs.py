"""fuseline.core.logs: one JSON object per line off a terminal, text on one, secrets redacted everywhere."""

from __future__ import annotations

import io
import json
import logging

import pytest

from fuseline.core.logs import log_event, resolve_format, setup_logging

SECRET = "fake-aws-secret-value-0123456789"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def restore_root():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_with_event_fields_and_redaction(restore_root, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    stream = io.StringIO()
    setup_logging(stream, env={})
    log = logging.getLogger("fuseline.test")
    log_event(log, "job.done", "job finished", template="anime", inference_ms=12.5, url=f"s3://x?k={SECRET}")
    log.info("plain message with %s", SECRET)
    try:
        raise RuntimeError(f"boom {SECRET}")
    except RuntimeError:
        log.exception("failed")
    lines = stream.getvalue().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(records) == 3, lines
    first = records[0]
    assert first["event"] == "job.done" and first["template"] == "anime" and first["inference_ms"] == 12.5
    assert first["level"] == "info" and first["logger"] == "fuseline.test" and first["ts"].endswith("Z")
    assert records[1]["event"] == "log"
    assert "RuntimeError" in records[2]["exception"]
    assert SECRET not in stream.getvalue()


def test_a_field_cannot_overwrite_the_envelope(restore_root):
    stream = io.StringIO()
    setup_logging(stream, env={})
    log_event(logging.getLogger("fuseline.test"), "x.y", level=logging.WARNING, ts="forged", logger="x")
    record = json.loads(stream.getvalue())
    assert record["event"] == "x.y" and record["level"] == "warning"
    assert record["ts"] != "forged" and record["logger"] == "fuseline.test"


def test_text_on_a_terminal_and_level_from_env(restore_root):
    stream = _Tty()
    setup_logging(stream, env={"FUSELINE_LOG_LEVEL": "warning"})
    log = logging.getLogger("fuseline.test")
    log.info("hidden")
    log_event(log, "sync.failed", "sync failed", level=logging.WARNING, template="a")
    out = stream.getvalue()
    assert "hidden" not in out and "sync failed template=a" in out and not out.startswith("{")


def test_setup_twice_keeps_one_handler(restore_root):
    setup_logging(io.StringIO(), env={})
    setup_logging(io.StringIO(), env={})
    from fuseline.core.logs import _FuselineHandler

    assert sum(isinstance(h, _FuselineHandler) for h in logging.getLogger().handlers) == 1


def test_bad_variables_warn_and_fall_back(restore_root):
    stream = io.StringIO()
    setup_logging(stream, env={"FUSELINE_LOG_LEVEL": "loud", "FUSELINE_LOG_FORMAT": "xml"})
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [r["event"] for r in records] == ["log.config_invalid", "log.config_invalid"]
    assert "FUSELINE_LOG_LEVEL" in records[0]["message"] and "FUSELINE_LOG_FORMAT" in records[1]["message"]
    assert logging.getLogger().level == logging.INFO


def test_format_choice():
    assert resolve_format({}, _Tty()) == "text"
    assert resolve_format({}, io.StringIO()) == "json"
    assert resolve_format({"FUSELINE_LOG_FORMAT": "TEXT"}, io.StringIO()) == "text"


def test_non_finite_numbers_become_null(restore_root):
    stream = io.StringIO()
    setup_logging(stream, env={})
    log_event(logging.getLogger("fuseline.test"), "x.nan", loss=float("nan"), peak=float("inf"), ok=1.5)
    record = json.loads(stream.getvalue())
    assert record["loss"] is None and record["peak"] is None and record["ok"] == 1.5


def test_default_handler_follows_sys_stderr(restore_root, monkeypatch):
    """A harness that swaps sys.stderr and closes the old one (click's CliRunner) must not break logging."""
    first = io.StringIO()
    monkeypatch.setattr("sys.stderr", first)
    setup_logging(env={"FUSELINE_LOG_FORMAT": "json"})
    first.close()
    second = io.StringIO()
    monkeypatch.setattr("sys.stderr", second)
    log_event(logging.getLogger("fuseline.test"), "x.after_swap", "still logged")
    assert json.loads(second.getvalue())["event"] == "x.after_swap"


def test_library_chatter_is_kept_to_warnings_unless_debug(restore_root):
    stream = io.StringIO()
    setup_logging(stream, env={})
    botocore = logging.getLogger("botocore.credentials")
    botocore.info("Found credentials in environment variables.")
    botocore.warning("retrying")
    assert [json.loads(line)["message"] for line in stream.getvalue().splitlines()] == ["retrying"]
    stream = io.StringIO()
    setup_logging(stream, env={"FUSELINE_LOG_LEVEL": "DEBUG"})
    botocore.info("Found credentials in environment variables.")
    assert "Found credentials" in stream.getvalue()
