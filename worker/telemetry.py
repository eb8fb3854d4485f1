"""What the worker tells its operators about its jobs: one record per job and process counters (event names
and fields: docs/operations.md "Worker logs"; the start report is worker/startup.py's).

Operators of a serverless endpoint see a worker only through its logs, so each of these is one structured
event (fuseline.core.logs): `job.done`/`job.failed` per job, `worker.counters` every FUSELINE_COUNTERS_EVERY
jobs and at exit. Nothing here imports torch at module level: pipelines.py and generate.py report into it
from hot paths.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import re
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from fuseline.core.logs import log_event

log = logging.getLogger("fuseline.worker")

Handler = Callable[[Any], dict[str, Any]]

DEFAULT_COUNTERS_EVERY = 50
# Counters a caller may add to; a name outside this list is a bug (a typo would count into nothing).
COUNTER_NAMES = (
    "jobs_done",
    "jobs_failed",
    "image_check_retries",
    "oom_retries",
    "fallbacks",
    "cache_hits",
    "cache_misses",
    "cache_evictions",
    "sync_bytes",
    "sync_failures",
)
# Retry kinds a job record lists, each with the counter it adds to.
RETRY_COUNTERS = {"image_check": "image_check_retries", "oom": "oom_retries"}
_ERROR_CODE_RE = re.compile(r"^\[([A-Z_]+)\] ")
# Failed jobs' error text in a record is cut here: a log line, not a transcript.
_MAX_ERROR_CHARS = 500


# ---------------------------------------------------------------------------------------------- counters


class Counters:
    """Process-wide counts (thread-safe): jobs by outcome and error code, retries, fallbacks, pipeline
    cache traffic, sync bytes and failures."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(COUNTER_NAMES, 0)
        self._errors: Counter[str] = Counter()

    def add(self, name: str, amount: int = 1) -> None:
        if name not in self._values:
            raise KeyError(f"unknown counter {name!r}; known: {', '.join(COUNTER_NAMES)}")
        with self._lock:
            self._values[name] += amount

    def record_job(self, error_code: str | None, degraded: bool) -> int:
        """Count one finished job; returns the number of jobs counted so far (done + failed)."""
        with self._lock:
            self._values["jobs_failed" if error_code else "jobs_done"] += 1
            if error_code:
                self._errors[error_code] += 1
            if degraded:
                self._values["fallbacks"] += 1
            return self._values["jobs_done"] + self._values["jobs_failed"]

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {**self._values, "errors": dict(sorted(self._errors.items()))}


COUNTERS = Counters()


def log_counters(reason: str, logger: logging.Logger = log) -> None:
    log_event(logger, "worker.counters", f"counters ({reason})", reason=reason, **COUNTERS.snapshot())


_shutdown_installed = threading.Lock()
_shutdown_done: list[bool] = []


def install_shutdown_report(logger: logging.Logger = log) -> None:
    """Log `worker.counters` once when the process exits normally (idempotent).

    runpod 1.12 stops cleanly on SIGTERM/SIGINT (its JobScaler drains and returns; the local API's uvicorn
    does the same), so atexit sees every ordinary stop. Before runpod installs its handlers (start-up
    sync, loading), SIGTERM would kill the process without atexit: until then it exits through SystemExit.
    A failed RunPod fitness check ends with os._exit and logs no counters (no job ran)."""
    with _shutdown_installed:
        if _shutdown_done:
            return
        _shutdown_done.append(True)
    atexit.register(log_counters, "shutdown", logger)
    if threading.current_thread() is threading.main_thread():
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


# ------------------------------------------------------------------------------------------ job records


@dataclass
class JobRecord:
    """What one job did, filled in as it runs and logged once as `job.done` or `job.failed`."""

    job_id: str | None
    device: str | None
    template: str | None = None
    parameters: dict[str, Any] | None = None
    started: float = 0.0

    def __post_init__(self) -> None:
        self.retries: list[str] = []
        self.started = time.perf_counter()
        if self.on_cuda:
            import torch

            # Peak VRAM of this job alone: the counter otherwise holds the process's peak so far. After a
            # sticky CUDA error every CUDA call raises: the record then goes without the figure.
            with contextlib.suppress(Exception):
                torch.cuda.reset_peak_memory_stats(self.device)

    @property
    def on_cuda(self) -> bool:
        return bool(self.device and self.device.startswith("cuda"))

    def fields(self, result: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """(event name, fields) for the job's `result` (the handler's output or {"error": ...})."""
        error = result.get("error")
        code = None
        if error is not None:
            match = _ERROR_CODE_RE.match(str(error))
            code = match.group(1) if match else "INTERNAL_ERROR"
        params = result.get("parameters") or self.parameters or {}
        template = params.get("template") or self.template
        fields: dict[str, Any] = {"job_id": self.job_id, "template": template}
        mode = result.get("mode") or (self.parameters or {}).get("mode")
        if mode is not None:
            fields["mode"] = mode
        for name in ("width", "height", "steps", "num_images", "seed"):
            if name in params:
                fields[name] = params[name]
        timings = dict(result.get("timings_ms") or {})
        timings.setdefault("total", round((time.perf_counter() - self.started) * 1000, 1))
        fields.update({f"{name}_ms": value for name, value in timings.items()})
        if self.on_cuda:
            import torch

            with contextlib.suppress(Exception):
                fields["peak_vram_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        fields["retries"] = list(self.retries)
        fields["degraded"] = result.get("degraded") or False
        if result.get("refresh_worker"):
            fields["refresh_worker"] = True
        if code is not None:
            fields["error_code"] = code
            fields["error"] = str(error)[:_MAX_ERROR_CHARS]
        return ("job.failed" if code else "job.done"), fields


_current_job: ContextVar[JobRecord | None] = ContextVar("fuseline_job", default=None)


@contextlib.contextmanager
def job_record(job: Any, device: str | None) -> Iterator[JobRecord]:
    """The record of the job running in this context (runpod runs a sync handler inside the job's asyncio
    task, so each concurrent job has its own)."""
    job_id = job.get("id") if isinstance(job, dict) else None
    record = JobRecord(str(job_id) if job_id is not None else None, device)
    raw = job.get("input") if isinstance(job, dict) else None
    if isinstance(raw, dict) and isinstance(raw.get("template"), str):
        record.template = raw["template"]
    token = _current_job.set(record)
    try:
        yield record
    finally:
        _current_job.reset(token)


def note_parameters(params: Any) -> None:
    """Record the job's resolved parameters (a GenerationParameters), so a job failing after resolution
    still reports its size, steps and seed."""
    record = _current_job.get()
    if record is not None:
        record.template = params.template
        record.parameters = {
            name: getattr(params, name)
            for name in ("template", "mode", "width", "height", "steps", "num_images", "seed")
        }


def in_job() -> bool:
    """Whether a job is running in this context (the handler's `recorded` wrapper opened its record)."""
    return _current_job.get() is not None


def count_in_job(name: str, amount: int = 1) -> None:
    """Add to counter `name` only inside a job: the start-up load, warm-up and self-check go through the
    same pipeline cache and generation code, and are reported by `worker.start`, not counted as traffic."""
    if in_job():
        COUNTERS.add(name, amount)


def note_retry(kind: str) -> None:
    """Count a retry (`image_check`: the fp32 VAE decode after NaN/black; `oom`: after freeing memory) and
    list it in the running job's record (outside a job, e.g. the self-check: neither)."""
    counter = RETRY_COUNTERS[kind]  # KeyError for an unknown kind, also outside a job
    record = _current_job.get()
    if record is not None:
        COUNTERS.add(counter)
        record.retries.append(kind)


def finish_job(
    record: JobRecord,
    result: dict[str, Any],
    every: int = DEFAULT_COUNTERS_EVERY,
    logger: logging.Logger = log,
) -> None:
    """Log the job's `job.done`/`job.failed` event, count it, and log `worker.counters` every `every` jobs."""
    event, fields = record.fields(result)
    level = logging.WARNING if event == "job.failed" else logging.INFO
    outcome = f"failed: {fields['error_code']}" if event == "job.failed" else "done"
    log_event(logger, event, f"job {record.job_id} {outcome}", level=level, **fields)
    total = COUNTERS.record_job(fields.get("error_code"), bool(fields["degraded"]))
    if every > 0 and total % every == 0:
        log_counters("periodic", logger)


def recorded(current_worker: Callable[[], Any]) -> Callable[[Handler], Handler]:
    """Decorate the RunPod handler so that every job it runs is recorded (`job.done`/`job.failed`) and
    counted. `current_worker` gives the process's worker when there is one (its device for peak VRAM,
    its settings for FUSELINE_COUNTERS_EVERY)."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def run_recorded(job: Any) -> dict[str, Any]:
            worker = current_worker()
            with job_record(job, getattr(worker, "device", None)) as record:
                result = handler(job)
                worker = current_worker()
                every = worker.settings.counters_every if worker is not None else DEFAULT_COUNTERS_EVERY
                try:
                    finish_job(record, result, every)
                except Exception:  # telemetry must never fail a job that succeeded
                    log.exception("job %s: could not record the job", record.job_id)
                return result

        return run_recorded

    return wrap
