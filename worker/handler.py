"""The RunPod serverless handler: `python -m worker.handler` (see docs/operations.md).

`handler(job)` never raises: every failure becomes `{"error": "[CODE] message"}`, a string, because a
non-string error breaks RunPod's local API. Extra flag for local runs: `--output_json PATH` writes the
full job result there (runpod's logger truncates the result it prints to 4096 characters).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fuseline.core.errors import ConfigInvalid
from fuseline.core.logs import adopt_torch_logs, log_event, setup_logging
from worker.device import unrecoverable_device_error
from worker.errors import CudaError, InvalidInput, WorkerError
from worker.serving import Worker
from worker.settings import load_settings
from worker.startup import log_start, self_check
from worker.telemetry import install_shutdown_report, recorded

log = logging.getLogger("fuseline.worker")

# Seconds between two progress updates of one job: each update is an HTTP request to RunPod.
PROGRESS_INTERVAL_S = 2.0
# Exit status of a worker whose start self-check failed outside RunPod's job loop (2: bad configuration).
SELF_CHECK_FAILED = 3


class ProgressThrottle:
    """Calls `send(payload)` at most every `interval` seconds, and always for the last step."""

    def __init__(
        self, send: Callable[[dict], None], interval: float = PROGRESS_INTERVAL_S, clock=time.monotonic
    ):
        self._send = send
        self._interval = interval
        self._clock = clock
        self._last: float | None = None

    def __call__(self, step: int, steps: int) -> None:
        now = self._clock()
        if step < steps and self._last is not None and now - self._last < self._interval:
            return
        self._last = now
        self._send({"step": step, "steps": steps, "percent": round(100 * step / steps)})


def runpod_progress(job: dict) -> Callable[[int, int], None] | None:
    """A throttled progress reporter for a real RunPod job; None for local runs and direct calls.

    RunPod's worker loop sets RUNPOD_WEBHOOK_POST_OUTPUT; without it (local test, local API) there is no
    endpoint to send progress to.
    """
    if not os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT") or not job.get("id"):
        return None
    from runpod.serverless import progress_update

    return ProgressThrottle(lambda payload: progress_update(job, payload))


_worker: Worker | None = None


def get_worker() -> Worker:
    """The process's worker, created from the environment on first use."""
    global _worker
    if _worker is None:
        _worker = Worker(load_settings())
    return _worker


def _replace_worker(job: Any, device_error: BaseException) -> dict[str, Any]:
    """The result for a job that met an unrecoverable CUDA error: the CUDA context is unusable and every
    later job here would fail too. `refresh_worker` makes runpod (rp_job.run_job) answer `stopPod`, so
    RunPod replaces this worker after the job."""
    job_id = job.get("id") if isinstance(job, dict) else None
    log_event(
        log,
        "job.cuda_error",
        f"job {job_id}: unrecoverable CUDA error; asking RunPod to replace this worker",
        level=logging.ERROR,
        job_id=job_id,
        traceback=traceback.format_exc(),
    )
    text = str(device_error).strip()
    error = CudaError(
        f"{type(device_error).__name__}: {text.splitlines()[0] if text else 'no message'}; the GPU cannot "
        "be used after this error, so this worker is being replaced; retry the job"
    )
    return {"error": str(error), "refresh_worker": True}


@recorded(lambda: _worker)
def handler(job: dict) -> dict[str, Any]:
    """RunPod entry: the output dict, or {"error": "[CODE] message"}; never raises."""
    try:
        if not isinstance(job, dict):
            raise InvalidInput(f"job must be an object with 'input'; got {type(job).__name__}")
        if "input" not in job:
            raise InvalidInput("job has no 'input'; send {'input': {'prompt': '...'}}")
        worker = get_worker()
        return worker.run(job["input"], runpod_progress(job))
    except (WorkerError, ConfigInvalid) as exc:  # ConfigInvalid: the settings, read at the first job
        if (device_error := unrecoverable_device_error(exc)) is not None:
            return _replace_worker(job, device_error)
        return {"error": str(exc)}
    except Exception as exc:  # a bug: report it with its type instead of crashing the worker
        if (device_error := unrecoverable_device_error(exc)) is not None:
            return _replace_worker(job, device_error)
        job_id = job.get("id") if isinstance(job, dict) else None
        log_event(
            log,
            "job.internal_error",
            f"job {job_id} failed with an unexpected error",
            level=logging.ERROR,
            job_id=job_id,
            traceback=traceback.format_exc(),
        )
        return {"error": f"[INTERNAL_ERROR] {type(exc).__name__}: {exc}"}


def _writing_handler(path: Path) -> Callable[[dict], dict[str, Any]]:
    def write_result(job: dict) -> dict[str, Any]:
        result = handler(job)
        path.write_text(json.dumps(result))
        return result

    return write_result


def is_production(argv: list[str], env) -> bool:
    """True when runpod will run its real job loop (not --test_input, not the local API server)."""
    local_flags = {"--test_input", "--rp_serve_api"}
    return bool(env.get("RUNPOD_WEBHOOK_GET_JOB")) and not any(
        arg.split("=")[0] in local_flags for arg in argv
    )


def main() -> None:
    # JSON lines off a terminal (RunPod's log view), FUSELINE_LOG_LEVEL / FUSELINE_LOG_FORMAT.
    setup_logging()
    install_shutdown_report()
    # The worker only ever reads local folders; nothing may reach the hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Loading progress bars are noise in RunPod's log view.
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    # Their records (and Python warnings) through our handler too: one JSON line each, redacted.
    for library in (diffusers_logging, transformers_logging):
        library.disable_default_handler()
        library.enable_propagation()
    adopt_torch_logs()  # diffusers imported torch just now
    logging.captureWarnings(True)
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--output_json", type=Path, default=None)
    ours, rest = parser.parse_known_args()
    sys.argv = [sys.argv[0], *rest]
    if is_production(rest, os.environ):
        # runpod otherwise probes the network (8.8.8.8) before taking jobs.
        os.environ.setdefault("RUNPOD_SKIP_AUTO_SYSTEM_CHECKS", "true")
    try:
        worker = get_worker()
    except ConfigInvalid as exc:
        log_event(log, "worker.config_invalid", str(exc), level=logging.ERROR)
        sys.exit(2)
    problems = worker.startup()
    check = self_check(worker)
    log_start(worker, problems, check)

    import runpod

    if not check.ok:
        if not is_production(rest, os.environ):
            sys.exit(SELF_CHECK_FAILED)

        # runpod 1.12's fitness hook (runpod.serverless.register_fitness_check, run before the job loop in
        # production only): the SDK reports the reason to RunPod as an unhealthy worker and exits 1.
        def fuseline_self_check() -> None:
            raise RuntimeError(check.error)

        runpod.serverless.register_fitness_check(fuseline_self_check)

    job_handler = _writing_handler(ours.output_json) if ours.output_json else handler
    runpod.serverless.start({"handler": job_handler})


if __name__ == "__main__":
    main()
