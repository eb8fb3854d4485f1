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

from worker.errors import InvalidInput, OutOfMemory, WorkerError
from worker.inputs import GenerationInput, parse_input, resolve_parameters
from worker.pipelines import (
    LoadedTemplate,
    PipelineCache,
    available_templates,
    check_template_folder,
    default_device,
    folder_weight_bytes,
    load_template,
)
from worker.settings import WorkerSettings, load_settings

log = logging.getLogger("fuseline.worker")

# Seconds between two progress updates of one job: each update is an HTTP request to RunPod.
PROGRESS_INTERVAL_S = 2.0
# Share of the card's memory the cached pipelines may hold (the rest is for activations and the VAE).
VRAM_SHARE = 0.75


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
            loader=lambda template_id: load_template(settings, template_id, self.device),
            max_count=settings.max_pipelines,
            max_bytes=max_bytes if on_cuda else None,
            estimate=lambda t: folder_weight_bytes(settings.models_dir / t, bytes_per_value),
            on_evict=lambda _entry: _free_memory(),
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
                check_template_folder(self.settings, template_id)
                log.info("template %s: model folder ok", template_id)
            except WorkerError as exc:
                problems.append(str(exc))
                log.error("template %s: %s", template_id, exc)
        if self.settings.default_template:
            try:
                entry, _ = self.cache.get(self.settings.default_template)
                log.info("default template %s loaded in %.0f ms", entry.template_id, entry.load_ms)
            except WorkerError as exc:
                problems.append(str(exc))
                log.error("default template %s not loaded: %s", self.settings.default_template, exc)
        return problems

    def sync_volume(self) -> list[str]:
        """Bring the preload templates (default: all of the release) to the release's version.

        A failure is a problem, not a crash: with the remote down, the templates already on the volume
        stay served (the sync reports them "kept")."""
        if not self.settings.release:
            return []
        from worker.sync import sync_templates

        report = sync_templates(self.settings.release, self.settings.volume, self.settings.preload)
        for line in report.lines():
            log.info("sync: %s", line)
        problems = [report.error] if report.error else []
        problems += [f"template {t.template}: {t.error}" for t in report.templates if t.error]
        return problems

    def template_id(self, request: GenerationInput) -> str:
        template_id = request.template or self.settings.default_template
        assert template_id is not None  # parse_input refuses a request without one
        return template_id

    def run(self, raw_input: Any, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        from worker.generate import generate
        from worker.images import encode_image, to_base64

        request = parse_input(raw_input, self.settings)
        template_id = self.template_id(request)
        # Resolved once from the folder's manifest, before any loading: a retry reuses the same seed.
        folder = check_template_folder(self.settings, template_id)
        params = resolve_parameters(request, template_id, folder.defaults, self.settings)

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
            log.warning("out of memory; evicted %s and retrying once", dropped or "nothing")
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
        images = [
            {"data": to_base64(encode_image(image, fmt, quality)), "format": fmt, "seed": seed}
            for image, seed in zip(result.images, result.seeds, strict=True)
        ]
        encode_ms = (time.perf_counter() - started) * 1000
        manifest = entry.folder.manifest
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
                "encode": round(encode_ms, 1),
            },
            "warnings": result.warnings,
        }


_worker: Worker | None = None


def get_worker() -> Worker:
    """The process's worker, created from the environment on first use."""
    global _worker
    if _worker is None:
        _worker = Worker(load_settings())
    return _worker


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
        return {"error": str(exc)}
    except Exception as exc:  # a bug: report it with its type instead of crashing the worker
        log.error(
            "job %s failed:\n%s", job.get("id") if isinstance(job, dict) else None, traceback.format_exc()
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
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)-7s| %(name)s: %(message)s", stream=sys.stderr
    )
    # The worker only ever reads local folders; nothing may reach the hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Loading progress bars are noise in RunPod's log view.
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
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
        log.error("%s", exc)
        sys.exit(2)
    problems = worker.startup()
    if problems:
        log.warning("%d template problem(s) at start; jobs for those templates will fail", len(problems))

    import runpod

    job_handler = _writing_handler(ours.output_json) if ours.output_json else handler
    runpod.serverless.start({"handler": job_handler})


if __name__ == "__main__":
    main()
