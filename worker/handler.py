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

from fuseline.core.logs import log_event, setup_logging
from worker.errors import CudaError, InvalidInput, OutOfMemory, WorkerError, unrecoverable_device_error
from worker.fallback import (
    degraded_warning,
    load_serving,
    merged_became_available,
    resolve_template,
    template_weight_bytes,
)
from worker.inputs import GenerationInput, parse_input, resolve_parameters
from worker.pipelines import (
    LoadedTemplate,
    PipelineCache,
    available_templates,
    default_device,
)
from worker.settings import WorkerSettings, load_settings
from worker.telemetry import (
    COUNTERS,
    SELF_CHECK_PROMPT,
    install_shutdown_report,
    log_start,
    note_parameters,
    note_retry,
    recorded,
    self_check,
)

log = logging.getLogger("fuseline.worker")

# Seconds between two progress updates of one job: each update is an HTTP request to RunPod.
PROGRESS_INTERVAL_S = 2.0
# Share of the card's memory the cached pipelines may hold (the rest is for activations and the VAE).
VRAM_SHARE = 0.75
# Exit status of a worker whose start self-check failed outside RunPod's job loop (2: bad configuration).
SELF_CHECK_FAILED = 3


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError)


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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


class Worker:
    """Settings, the pipeline cache, and the job flow from raw input to the output dict."""

    # SyncReport.summary() of the start-up sync (None: no FUSELINE_RELEASE), for the worker.start event.
    sync_summary: dict[str, Any] | None = None

    def __init__(self, settings: WorkerSettings, device: str | None = None):
        self.settings = settings
        self.device = device or default_device(settings)
        on_cuda = self.device.startswith("cuda")
        max_bytes = settings.vram_budget_bytes
        if on_cuda and max_bytes is None:
            import torch

            max_bytes = int(torch.cuda.get_device_properties(self.device).total_memory * VRAM_SHARE)
        bytes_per_value = 2 if on_cuda else 4
        self.cache = PipelineCache(
            # The merged folder, else the runtime-LoRA fallback (worker/fallback.py); a cached fallback is
            # dropped at the next job once a valid merged folder is there (is_stale).
            loader=lambda template_id: load_serving(settings, template_id, self.device),
            max_count=settings.max_pipelines,
            max_bytes=max_bytes if on_cuda else None,
            estimate=lambda t: template_weight_bytes(settings, t, bytes_per_value),
            on_evict=lambda _entry: _free_memory(),
            is_stale=lambda entry: merged_became_available(settings, entry),
        )

    def startup(self) -> list[str]:
        """Sync the volume from the release (when configured), check the templates to preload and warm
        the default one; returns the problems found."""
        problems = self.sync_volume()
        templates = (
            self.settings.preload if self.settings.preload is not None else available_templates(self.settings)
        )
        for template_id in templates:
            try:
                folder = resolve_template(self.settings, template_id)
                if folder.degraded_reason is not None:
                    message = degraded_warning(template_id, folder.degraded_reason)
                    log_event(log, "template.degraded", message, level=logging.WARNING, template=template_id)
                else:
                    log_event(log, "template.ok", f"template {template_id}: folder ok", template=template_id)
            except WorkerError as exc:
                problems.append(str(exc))
                log_event(log, "template.invalid", str(exc), level=logging.ERROR, template=template_id)
        if self.settings.default_template:
            try:
                entry, _ = self.cache.get(self.settings.default_template)
                log_event(
                    log,
                    "template.loaded",
                    f"default template {entry.template_id} loaded",
                    template=entry.template_id,
                    load_ms=round(entry.load_ms, 1),
                )
                if "compile" in self.settings.speed.options and not entry.degraded:
                    problems += self.warm_up(entry)
            except Exception as exc:
                # A CUDA error is no folder's fault (pipelines._load lets it through): it is a problem
                # here, and the self-check that follows fails on the same GPU.
                if isinstance(exc, WorkerError):
                    problems.append(str(exc))
                elif unrecoverable_device_error(exc) is not None:
                    first_line = (str(exc).strip().splitlines() or ["no message"])[0]
                    problems.append(
                        f"template {self.settings.default_template!r}: {type(exc).__name__}: {first_line}"
                    )
                else:
                    raise
                log_event(
                    log,
                    "template.load_failed",
                    f"default template not loaded: {exc}",
                    level=logging.ERROR,
                    template=self.settings.default_template,
                )
        return problems

    def warm_up(self, entry: LoadedTemplate) -> list[str]:
        """One 1-step generation at the template's default size, so that torch.compile (FUSELINE_SPEED=
        compile) compiles the UNet for the size most jobs ask for before the first job, not during it (the
        self-check's 64 px image compiles for 64 px only). Returns the problem, if any."""
        from worker.generate import generate

        template_id = entry.template_id
        started = time.perf_counter()
        try:
            request = parse_input(
                {"template": template_id, "prompt": SELF_CHECK_PROMPT, "steps": 1}, self.settings
            )
            params = resolve_parameters(request, template_id, entry.folder.defaults, self.settings)
            generate(entry, params)
        except Exception as exc:
            if not isinstance(exc, WorkerError) and unrecoverable_device_error(exc) is None:
                exc = WorkerError(f"{type(exc).__name__}: {exc}")
            message = f"template {template_id}: compile warm-up failed: {exc}"
            log_event(log, "template.warm_up_failed", message, level=logging.ERROR, template=template_id)
            return [message]
        log_event(
            log,
            "template.warmed",
            f"template {template_id} compiled at {params.width}x{params.height}",
            template=template_id,
            width=params.width,
            height=params.height,
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return []

    def sync_volume(self) -> list[str]:
        """Bring the preload templates (default: all of the release) to the release's version.

        A failure is a problem, not a crash: with the remote down, the templates already on the volume
        stay served (the sync reports them "kept")."""
        if not self.settings.release:
            return []
        from worker.sync import sync_templates

        report = sync_templates(self.settings.release, self.settings.volume, self.settings.preload)
        self.sync_summary = summary = report.summary()
        COUNTERS.add("sync_bytes", summary["bytes"])
        COUNTERS.add("sync_failures", summary["failures"])
        level = logging.INFO if report.ok else logging.WARNING
        log_event(log, "sync.done", "\n".join(report.lines()), level=level, **summary)
        problems = [report.error] if report.error else []
        problems += [f"template {t.template}: {t.error}" for t in report.templates if t.error]
        return problems

    def template_id(self, request: GenerationInput) -> str:
        template_id = request.template or self.settings.default_template
        assert template_id is not None  # parse_input refuses a request without one
        return template_id

    def run(self, raw_input: Any, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        job_started = time.perf_counter()
        from worker.generate import generate
        from worker.images import encode_image, to_base64

        request = parse_input(raw_input, self.settings)
        template_id = self.template_id(request)
        # Resolved once from the folder's manifest, before any loading: a retry reuses the same seed.
        folder = resolve_template(self.settings, template_id)  # the merged folder, else the fallback's
        params = resolve_parameters(request, template_id, folder.defaults, self.settings)
        note_parameters(params)

        def attempt() -> tuple[LoadedTemplate, bool, Any]:
            entry, loaded_now = self.cache.get(template_id)
            return entry, loaded_now, generate(entry, params, progress)

        try:
            entry, loaded_now, result = attempt()
        except Exception as exc:
            if not _is_out_of_memory(exc):
                raise
            # Free every other pipeline and cached allocation, then try once more.
            dropped = self.cache.evict_all_except(template_id)
            _free_memory()
            note_retry("oom")
            log_event(
                log,
                "job.oom_retry",
                f"out of memory; evicted {dropped or 'nothing'} and retrying once",
                level=logging.WARNING,
                template=template_id,
                evicted=dropped,
            )
            try:
                entry, loaded_now, result = attempt()
            except Exception as retry_exc:
                if _is_out_of_memory(retry_exc):
                    raise OutOfMemory(
                        f"template {template_id!r} at {params.width}x{params.height}, "
                        f"{params.num_images} image(s): out of GPU memory also after freeing cached "
                        "pipelines; ask for fewer or smaller images"
                    ) from None
                raise
            result.warnings.append("ran out of GPU memory once; freed cached pipelines and retried")

        started = time.perf_counter()
        fmt, quality = params.output.format, params.output.quality
        encoded = [encode_image(image, fmt, quality) for image in result.images]
        encode_ms = (time.perf_counter() - started) * 1000
        upload_ms: float | None = None
        if params.output.return_ == "s3":
            from worker.upload import ImageUploader

            started = time.perf_counter()
            images = ImageUploader.from_settings(self.settings).upload(encoded, fmt, result.seeds)
            upload_ms = (time.perf_counter() - started) * 1000
        else:
            images = [
                {"data": to_base64(data), "format": fmt, "seed": seed}
                for data, seed in zip(encoded, result.seeds, strict=True)
            ]
        manifest = entry.folder.manifest
        if entry.folder.degraded_reason is not None:
            result.warnings.append(degraded_warning(template_id, entry.folder.degraded_reason))
        return {
            "images": images,
            "template": {
                "id": template_id,
                "model_hash": manifest.spec_hash,
                "checkpoint": manifest.checkpoint.model_dump(mode="json"),
                "loras": [
                    {"source": lora.source, "sha256": lora.sha256, "scale": lora.scale}
                    for lora in manifest.loras
                ],
            },
            "parameters": params.public(),
            "timings_ms": {
                "load": round(entry.load_ms if loaded_now else 0.0, 1),
                "inference": round(result.inference_ms, 1),
                "decode": round(result.decode_ms, 1),
                "encode": round(encode_ms, 1),
                "total": round((time.perf_counter() - job_started) * 1000, 1),
                **({"upload": round(upload_ms, 1)} if upload_ms is not None else {}),
            },
            # True: served by the runtime-LoRA fallback, not the merged model (see the warning).
            "degraded": entry.degraded,
            "warnings": result.warnings,
        }


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
    except WorkerError as exc:
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
    except WorkerError as exc:
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
