"""One logging setup for the stages, the CLI and the worker: JSON lines off a terminal, text on one.

Operators of a serverless endpoint read workers only through their logs, and build logs end up in CI
artifacts: both are machine-read, so each record off a terminal is one JSON object per line:

    {"ts": "2026-11-27T23:59:01.123Z", "level": "info", "logger": "fuseline.worker",
     "event": "job.done", "message": "...", "template": "anime", "job_id": "...", "inference_ms": 812.4}

`event` is a stable name (`<area>.<what>`, listed in docs/operations.md "Logs"); records logged without
one get `"event": "log"`. Extra fields come from `log_event(logger, "event.name", message, **fields)`.
Every string (message, fields, traceback) goes through fuseline.core.redact before it is written, so a secret
that reaches a log call still never reaches the log.

Variables: FUSELINE_LOG_LEVEL (DEBUG/INFO/WARNING/ERROR, default INFO) and FUSELINE_LOG_FORMAT
(`json` or `text`; default: text on a terminal, json otherwise). The standard library's logging is enough
here (structlog would add a dependency for what is one Formatter).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

from fuseline.core.errors import ConfigInvalid
from fuseline.core.redact import redact

# Attribute of a LogRecord carrying the event name and its fields (set through `extra=`).
_FIELDS_ATTR = "fuseline_fields"
_EVENT_ATTR = "fuseline_event"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Libraries whose INFO records are routine chatter ("Found credentials in environment variables.", one line
# per connection): kept to WARNING unless FUSELINE_LOG_LEVEL=DEBUG asks for everything.
QUIET_LIBRARIES = ("botocore", "boto3", "s3transfer", "urllib3", "aiobotocore", "httpx")


def log_event(
    logger: logging.Logger, event: str, message: str = "", /, *, level: int = logging.INFO, **fields: Any
) -> None:
    """Log one structured event: `event` is its stable name, `fields` its data (JSON-serialisable;
    durations in ms named `*_ms`). `message` is the human sentence (default: the event name)."""
    if logger.isEnabledFor(level):
        logger.log(
            level, "%s", message or event, extra={_EVENT_ATTR: event, _FIELDS_ATTR: fields}, stacklevel=2
        )


def event_fields(record: logging.LogRecord) -> tuple[str, dict[str, Any]]:
    """The event name and fields of a record (("log", {}) for a plain logging call)."""
    return getattr(record, _EVENT_ATTR, "log"), dict(getattr(record, _FIELDS_ATTR, {}) or {})


def _redacted(value: Any) -> Any:
    """`value` with every string inside it redacted (dicts, lists and tuples walked)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {str(k): _redacted(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redacted(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/Infinity; a strict parser would reject the whole line
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact(str(value))  # paths, enums, exceptions: their text


def _format_exception(record: logging.LogRecord) -> str | None:
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    return record.exc_text or None


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line, every string redacted."""

    def format(self, record: logging.LogRecord) -> str:
        event, fields = event_fields(record)
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, Any] = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": event,
            "message": record.getMessage(),
        }
        for key, value in fields.items():
            out.setdefault(key, value)  # a field never overwrites the envelope
        exc = _format_exception(record)
        if exc:
            out["exception"] = exc
        return json.dumps(_redacted(out), ensure_ascii=False, allow_nan=False, default=str)


class TextFormatter(logging.Formatter):
    """`time level logger: message key=value ...`, redacted: for people at a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        _, fields = event_fields(record)
        if fields:
            line += " " + " ".join(f"{k}={_short(v)}" for k, v in fields.items())
        return redact(line)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, default=str, separators=(",", ":"))
    return str(value)


class _FuselineHandler(logging.StreamHandler):
    """Marks the handler setup_logging installed, so calling it again replaces it instead of adding one."""


class _StderrHandler(_FuselineHandler):
    """Writes to whatever sys.stderr is at the time of each record (as logging.lastResort does), not the
    object it was when set up: a test runner or CLI harness that swaps and closes sys.stderr (click's
    CliRunner) would otherwise leave a handler writing into a closed buffer."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> IO[str]:  # type: ignore[override]
        return sys.stderr


def resolve_format(env: Mapping[str, str], stream: IO[str]) -> str:
    raw = env.get("FUSELINE_LOG_FORMAT", "").strip().lower()
    if raw in ("json", "text"):
        return raw
    if raw:
        raise ConfigInvalid(f"FUSELINE_LOG_FORMAT={raw!r} must be 'json' or 'text' (or unset: auto)")
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


def resolve_level(env: Mapping[str, str]) -> int:
    raw = env.get("FUSELINE_LOG_LEVEL", "").strip().upper() or "INFO"
    if raw not in LEVELS:
        raise ConfigInvalid(f"FUSELINE_LOG_LEVEL={raw!r} must be one of {', '.join(LEVELS)}")
    return getattr(logging, raw)


def setup_logging(
    stream: IO[str] | None = None, *, env: Mapping[str, str] | None = None, fmt: str | None = None
) -> logging.Handler:
    """Install fuseline's handler on the root logger (replacing one installed before) and return it.

    A malformed FUSELINE_LOG_* variable is CONFIG_INVALID like any other, but reported as a warning event
    (`log.config_invalid`) with the default used instead of stopping the process: logging is set up before
    anything else, and a typo in a logging variable must not stop a build or a worker."""
    env = os.environ if env is None else env
    follow_stderr = stream is None
    stream = sys.stderr if stream is None else stream
    problems = []
    try:
        level = resolve_level(env)
    except ConfigInvalid as exc:
        problems.append(str(exc))
        level = logging.INFO
    try:
        chosen = fmt or resolve_format(env, stream)
    except ConfigInvalid as exc:
        problems.append(str(exc))
        chosen = "json"
    handler = _StderrHandler() if follow_stderr else _FuselineHandler(stream)
    handler.setFormatter(JsonFormatter() if chosen == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _FuselineHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.NOTSET if level <= logging.DEBUG else logging.WARNING)
    adopt_torch_logs()
    for problem in problems:
        log_event(logging.getLogger("fuseline"), "log.config_invalid", problem, level=logging.WARNING)
    return handler


def adopt_torch_logs() -> None:
    """Send torch's own records through fuseline's handler like every other library's: at import, torch
    (torch._logging) gives the `torch` logger a handler of its own, writing glog-style lines
    (`W1202 08:58:15 ... _pytree.py:630] ...`), and stops their propagation, so they would break the JSON
    lines. Call again after anything that imports torch for the first time; it imports nothing."""
    torch_logger = logging.getLogger("torch")
    for own in list(torch_logger.handlers):
        torch_logger.removeHandler(own)
    torch_logger.propagate = True
