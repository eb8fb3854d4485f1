"""Serving jobs: the worker's settings, its pipeline cache, and the job flow from raw input to the output
dict (input checks, the job's mode and its pictures, template defaults, generation with one out-of-memory
retry, encoding or upload, the report of what was done).

The RunPod entry point around it is worker/handler.py; the start-up it runs once is worker/startup.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from fuseline.core.logs import log_event
from worker import startup
from worker.addons import addons_applied, resolve_addons
from worker.describe import check_action, describe, is_action
from worker.device import default_device, free_memory, is_out_of_memory
from worker.errors import OutOfMemory
from worker.fallback import (
    degraded_warning,
    load_serving,
    merged_became_available,
    resolve_template,
    template_weight_bytes,
)
from worker.image_job import load_image_job
from worker.inputs import GenerationInput, check_refiner_request, parse_input, resolve_parameters
from worker.modes import check_mode_served
from worker.pipelines import LoadedTemplate, PipelineCache
from worker.settings import WorkerSettings
from worker.speed import check_speed_options
from worker.telemetry import note_parameters, note_retry

log = logging.getLogger("fuseline.worker")

# Share of the card's memory the cached pipelines may hold (the rest is for activations and the VAE).
VRAM_SHARE = 0.75


class Worker:
    """Settings, the pipeline cache, and the job flow from raw input to the output dict."""

    # SyncReport.summary() of the start-up sync (None: no FUSELINE_RELEASE), for the worker.start event.
    sync_summary: dict[str, Any] | None = None

    def __init__(self, settings: WorkerSettings, device: str | None = None):
        self.settings = settings
        # Templates served as the volume holds them because their start-up sync failed.
        self.sync_unsynced: list[str] = []
        self.device = device or default_device(settings.device)
        # An option the device cannot run fails the start, before any template is loaded.
        check_speed_options(settings.speed, self.device)
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
            on_evict=lambda _entry: free_memory(),
            is_stale=lambda entry: merged_became_available(settings, entry),
        )

    def startup(self) -> list[str]:
        """The start-up (worker/startup.py): sync, preload checks, the default template loaded and warmed;
        returns the problems found."""
        return startup.prepare(self)

    def sync_volume(self) -> list[str]:
        """The start-up's sync of the volume from FUSELINE_RELEASE (worker/startup.py)."""
        return startup.sync_volume(self)

    def template_id(self, request: GenerationInput) -> str:
        template_id = request.template or self.settings.default_template
        assert template_id is not None  # parse_input refuses a request without one
        return template_id

    def run(self, raw_input: Any, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        if is_action(raw_input):
            check_action(raw_input)  # "describe", the one action: files only, no pipeline, no generation
            return describe(self.settings, self.cache.loaded())
        job_started = time.perf_counter()
        # Imported at the first job: generate and images import torch, which `import worker.handler`
        # (and the start-up's configuration checks) should not pay for.
        from worker.generate import generate
        from worker.images import encode_image, to_base64

        request = parse_input(raw_input, self.settings)
        template_id = self.template_id(request)
        # Resolved once from the folder's manifest, before any loading: a retry reuses the same seed.
        folder = resolve_template(self.settings, template_id)  # the merged folder, else the fallback's
        # A mode the checkpoint cannot serve is refused before any picture is fetched.
        check_mode_served(template_id, folder.manifest.checkpoint.kind, request.mode)
        check_refiner_request(request, template_id, folder.manifest.refiner)
        # Add-on LoRAs the job asks for, checked against the template's before anything loads or is fetched.
        addons = resolve_addons(self.settings, template_id, request.loras)
        started = time.perf_counter()
        image_job = load_image_job(request, self.settings)  # None for txt2img
        inputs_ms = (time.perf_counter() - started) * 1000 if image_job is not None else None
        params = resolve_parameters(
            request,
            template_id,
            folder.defaults,
            self.settings,
            image_size=image_job.size if image_job is not None else None,
            refiner=folder.manifest.refiner,
        )
        if image_job is not None:
            image_job = image_job.planned(params)
        if addons:
            params = params.model_copy(update={"loras": [addon.public() for addon in addons]})
        note_parameters(params)

        def attempt() -> tuple[LoadedTemplate, bool, Any]:
            entry, loaded_now = self.cache.get(template_id)
            with addons_applied(self.settings, entry, addons):
                return entry, loaded_now, generate(entry, params, progress, image_job)

        try:
            entry, loaded_now, result = attempt()
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            # Free every other pipeline and cached allocation, then try once more.
            dropped = self.cache.evict_all_except(template_id)
            free_memory()
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
                if is_out_of_memory(retry_exc):
                    size = f"{params.width}x{params.height}"
                    if params.hires is not None:
                        size += f" (hires {params.hires.width}x{params.hires.height})"
                    raise OutOfMemory(
                        f"template {template_id!r} at {size}, "
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
            images = ImageUploader.for_output(self.settings, params.output.s3).upload(
                encoded, fmt, result.seeds
            )
            upload_ms = (time.perf_counter() - started) * 1000
        else:
            images = [
                {"data": to_base64(data), "format": fmt, "seed": seed}
                for data, seed in zip(encoded, result.seeds, strict=True)
            ]
        manifest = entry.folder.manifest
        if image_job is not None:
            result.warnings[:0] = image_job.warnings()
        if entry.folder.degraded_reason is not None:
            result.warnings.append(degraded_warning(template_id, entry.folder.degraded_reason))
        report: dict[str, Any] = {
            "size": list(result.images[0].size),
            "effective_steps": result.effective_steps,
            **(image_job.report() if image_job is not None else {}),
        }
        if result.hires is not None:
            report["hires"] = result.hires
        timings = {
            **({"inputs": round(inputs_ms, 1)} if inputs_ms is not None else {}),
            "load": round(entry.load_ms if loaded_now else 0.0, 1),
            "inference": round(result.inference_ms, 1),
            **({"hires": round(result.hires_ms, 1)} if result.hires_ms is not None else {}),
            "decode": round(result.decode_ms, 1),
            "encode": round(encode_ms, 1),
            "total": round((time.perf_counter() - job_started) * 1000, 1),
            **({"upload": round(upload_ms, 1)} if upload_ms is not None else {}),
        }
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
                # Add-on LoRAs applied to this job on top of the template, as loaded.
                "addons": [
                    {
                        "name": a.addon.name,
                        "source": a.addon.manifest.source,
                        "sha256": a.addon.manifest.sha256,
                        "scale": a.scale,
                    }
                    for a in addons
                ],
            },
            "parameters": params.public(),
            # What was done: the mode, the output size, the steps run, the inputs' handling, the hires pass.
            "mode": params.mode,
            "report": report,
            "timings_ms": timings,
            # True: served by the runtime-LoRA fallback, not the merged model (see the warning).
            "degraded": entry.degraded,
            "warnings": result.warnings,
        }
