"""The worker's start: sync the volume from the release (when configured), check the templates to preload,
load (and, with FUSELINE_SPEED=compile, warm up) the default one, run the self-check that keeps a broken
worker from taking jobs, and log the `worker.start` report (docs/operations.md, "Worker logs").

Functions over the worker's parts (`StartingWorker`: its settings, device, pipeline cache), so that the
serving code (worker/serving.py) calls into the start-up and never the other way round.
"""

from __future__ import annotations

import base64
import importlib.metadata
import io
import logging
import platform
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from fuseline.core.logs import log_event
from fuseline.core.safetensors_io import SafetensorsError, read_header
from worker.device import unrecoverable_device_error
from worker.errors import ModelInvalid, WorkerError
from worker.fallback import degraded_warning, resolve_template
from worker.folders import WEIGHTED_COMPONENTS, available_templates
from worker.image_inputs import ImageInputLimits, SizeBounds, load_image_input
from worker.image_job import ImageJob
from worker.inputs import GenerationParameters, OutputOptions, parse_input, resolve_parameters
from worker.masks import DEFAULT_FULL_RES_PADDING, DEFAULT_MASK_BLUR, load_mask_input
from worker.pipelines import LoadedTemplate, PipelineCache
from worker.settings import WorkerSettings
from worker.sync.recipes import ready_templates
from worker.sync.templates import sync_templates
from worker.telemetry import COUNTERS

log = logging.getLogger("fuseline.worker")

# The self-check's generation: one step at the smallest size SDXL's UNet accepts (latents 8x8), so it
# costs well under a second on a GPU while running every component of the pipeline once.
SELF_CHECK_SIZE = 64
SELF_CHECK_PROMPT = "a red apple on a wooden table"


class StartingWorker(Protocol):
    """What the start-up needs of a worker (worker.serving.Worker is one)."""

    settings: WorkerSettings
    device: str
    cache: PipelineCache
    # SyncReport.summary() of the start-up sync (None: no FUSELINE_RELEASE), for the worker.start event.
    sync_summary: dict[str, Any] | None
    # Templates served as the volume holds them because their sync failed (SyncReport.unsynced).
    sync_unsynced: list[str]


def prepare(worker: StartingWorker) -> list[str]:
    """Sync the volume from the release (when configured), check the templates to preload and warm the
    default one; returns the problems found."""
    settings = worker.settings
    problems = sync_volume(worker)
    templates = settings.preload if settings.preload is not None else available_templates(settings)
    for template_id in templates:
        try:
            folder = resolve_template(settings, template_id)
            if folder.degraded_reason is not None:
                message = degraded_warning(template_id, folder.degraded_reason)
                log_event(log, "template.degraded", message, level=logging.WARNING, template=template_id)
            else:
                log_event(log, "template.ok", f"template {template_id}: folder ok", template=template_id)
        except WorkerError as exc:
            problems.append(str(exc))
            log_event(log, "template.invalid", str(exc), level=logging.ERROR, template=template_id)
    if settings.default_template:
        try:
            entry, _ = worker.cache.get(settings.default_template)
            log_event(
                log,
                "template.loaded",
                f"default template {entry.template_id} loaded",
                template=entry.template_id,
                load_ms=round(entry.load_ms, 1),
            )
            if "compile" in settings.speed.options and not entry.degraded:
                problems += warm_up(worker, entry)
        except Exception as exc:
            # A CUDA error is no folder's fault (pipelines._load lets it through): it is a problem
            # here, and the self-check that follows fails on the same GPU.
            if isinstance(exc, WorkerError):
                problems.append(str(exc))
            elif unrecoverable_device_error(exc) is not None:
                first_line = (str(exc).strip().splitlines() or ["no message"])[0]
                problems.append(f"template {settings.default_template!r}: {type(exc).__name__}: {first_line}")
            else:
                raise
            log_event(
                log,
                "template.load_failed",
                f"default template not loaded: {exc}",
                level=logging.ERROR,
                template=settings.default_template,
            )
    return problems


def warm_up(worker: StartingWorker, entry: LoadedTemplate) -> list[str]:
    """One 1-step generation at the template's default size, so that torch.compile (FUSELINE_SPEED=compile)
    compiles the UNet for the size most jobs ask for before the first job, not during it (the self-check's
    64 px image compiles for 64 px only). Returns the problem, if any."""
    from worker.generate import generate  # imports torch: only when a worker really starts

    template_id = entry.template_id
    started = time.perf_counter()
    try:
        request = parse_input(
            {"template": template_id, "prompt": SELF_CHECK_PROMPT, "steps": 1}, worker.settings
        )
        params = resolve_parameters(
            request,
            template_id,
            entry.folder.defaults,
            worker.settings,
            refiner=entry.folder.manifest.refiner,
        )
        params, image_job = _job_for_checkpoint(entry, params)
        generate(entry, params, image_job=image_job)
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


def sync_volume(worker: StartingWorker) -> list[str]:
    """Bring the preload templates (default: all of the release) to the release's version.

    A failure is a problem, not a crash: with the remote down, the templates already on the volume stay
    served (the sync reports them "kept")."""
    settings = worker.settings
    if not settings.release:
        return []
    report = sync_templates(settings.release, settings.volume, settings.preload, settings=settings.sync)
    worker.sync_summary = summary = report.summary()
    worker.sync_unsynced = report.unsynced
    COUNTERS.add("sync_bytes", summary["bytes"])
    COUNTERS.add("sync_failures", summary["failures"])
    report.log(logging.getLogger("fuseline.worker.sync"))
    problems = [report.error] if report.error else []
    problems += [f"template {t.template}: {t.error}" for t in report.templates if t.error]
    problems += [f"add-on {a.template}: {a.error}" for a in report.addons if a.error]
    return problems


@dataclass
class SelfCheck:
    ok: bool
    mode: str  # "generate" (default template), "files" (each preloaded folder), "none" (nothing to check)
    templates: list[str]
    ms: float
    error: str | None = None
    # Templates the runtime-LoRA fallback will serve (their merged folder is missing or broken).
    degraded: list[str] = field(default_factory=list)

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": self.ok, "mode": self.mode, "templates": self.templates, "ms": self.ms}
        if self.degraded:
            out["degraded"] = self.degraded
        if self.error:
            out["error"] = self.error
        return out


def check_weight_files(template_id: str, path: Path) -> None:
    """Raise ModelInvalid naming the first component without weights or the first .safetensors file whose
    header is unreadable or promises more bytes than the file holds (truncated, overwritten).

    Reads headers only (a few KB per file): tensor bytes are sync's md5 check's business."""
    fix = f"re-sync it: python -m worker.sync --verify --template {template_id}"
    for component in WEIGHTED_COMPONENTS:
        folder = path / component
        if not folder.is_dir() or not any(folder.glob("*.safetensors")):
            raise ModelInvalid(f"template {template_id!r}: {folder}: no .safetensors weights; {fix}")
    for file in sorted(path.rglob("*.safetensors")):
        try:
            read_header(file)
        except SafetensorsError as exc:
            raise ModelInvalid(
                f"template {template_id!r}: {file}: not a readable safetensors file ({exc.problem}); {fix}"
            ) from None
        except OSError as exc:
            raise ModelInvalid(f"template {template_id!r}: {file}: unreadable ({exc}); {fix}") from None


def _fallback_ready(settings: WorkerSettings, template_id: str) -> bool:
    """Whether the runtime-LoRA fallback can serve `template_id` (its recipe and every file it names are
    on the volume): then a broken merged folder degrades the template instead of failing it."""
    return template_id in ready_templates(settings.volume, dict(settings.expected_spec_hashes))


def self_check(worker: StartingWorker) -> SelfCheck:
    """With a default template: the header of each of its weight files, then one 1-step 64 px generation
    through the serving path (the pipeline called directly: FUSELINE_MIN_SIZE does not apply; the
    runtime-LoRA fallback where it serves the template). Without one: the weight files of each preloaded
    template present on the volume. Never raises; the result says what failed, naming the file where a
    file is at fault."""
    settings = worker.settings
    started = time.perf_counter()

    def result(ok: bool, mode: str, templates: list[str], error: Any = None, **extra: Any) -> SelfCheck:
        ms = round((time.perf_counter() - started) * 1000, 1)
        return SelfCheck(ok, mode, templates, ms, None if error is None else str(error), **extra)

    default = settings.default_template
    if default:
        files_error: WorkerError | None = None
        if (settings.models_dir / default).is_dir():
            try:
                check_weight_files(default, settings.models_dir / default)
            except WorkerError as exc:
                files_error = exc  # fatal unless the fallback serves the template instead
        try:
            entry = _generate_once(worker, default)
        except WorkerError as exc:
            return result(False, "generate", [default], files_error or exc)
        except Exception as exc:  # a bug or a broken library: still a reason not to take jobs
            reason = files_error or f"template {default!r}: {type(exc).__name__}: {exc}"
            return result(False, "generate", [default], reason)
        if files_error is not None and not entry.degraded:
            return result(False, "generate", [default], files_error)
        return result(True, "generate", [default], degraded=[default] if entry.degraded else [])
    present = available_templates(settings)
    wanted = [t for t in (settings.preload or present) if t in present]
    degraded = []
    for template_id in wanted:
        try:
            check_weight_files(template_id, settings.models_dir / template_id)
        except WorkerError as exc:
            if not _fallback_ready(settings, template_id):
                return result(False, "files", wanted, exc, degraded=degraded)
            degraded.append(template_id)
    return result(True, "files" if wanted else "none", wanted, degraded=degraded)


def _job_for_checkpoint(
    entry: LoadedTemplate, params: GenerationParameters
) -> tuple[GenerationParameters, ImageJob | None]:
    """`params` (a txt2img job) as the template's checkpoint serves it: unchanged for an ordinary one; for
    an inpainting checkpoint (inpaint jobs only) an inpaint job repainting the centre of a grey picture
    of the same size, whose picture and mask go through the job's own image readers (as data: URLs)."""
    from worker.mode_pipelines import checkpoint_kind

    if checkpoint_kind(entry.pipe) != "inpaint":
        return params, None
    size = (params.width, params.height)
    mask = Image.new("L", size, 0)
    mask.paste(255, (size[0] // 4, size[1] // 4, size[0] - size[0] // 4, size[1] - size[1] // 4))
    bounds = SizeBounds(min_side=min(size), max_side=max(size), max_pixels=size[0] * size[1])
    limits = ImageInputLimits()
    image = load_image_input(
        _data_url(Image.new("RGB", size, (128, 128, 128))), limits, bounds, width=size[0], height=size[1]
    )
    job = ImageJob(image, load_mask_input(_data_url(mask), limits, like=image))
    params = params.model_copy(
        update={
            "mode": "inpaint",
            "strength": 1.0,
            "mask_blur": DEFAULT_MASK_BLUR,
            "inpaint_full_res": False,
            "inpaint_full_res_padding": DEFAULT_FULL_RES_PADDING,
        }
    )
    return params, job.planned(params)


def _data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _generate_once(worker: StartingWorker, template_id: str) -> LoadedTemplate:
    from worker.generate import generate  # imports torch: only when a worker really starts

    entry, _ = worker.cache.get(template_id)
    params = GenerationParameters(
        template=template_id,
        prompt=SELF_CHECK_PROMPT,
        negative_prompt="",
        width=SELF_CHECK_SIZE,
        height=SELF_CHECK_SIZE,
        steps=1,
        guidance_scale=entry.folder.defaults.guidance_scale,
        seed=0,
        num_images=1,
        scheduler="default",
        output=OutputOptions(),
    )
    params, image_job = _job_for_checkpoint(entry, params)
    generate(entry, params, image_job=image_job)  # raises ImageInvalid on NaN/Inf or a black frame
    return entry


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvidia_driver() -> str | None:
    """The kernel driver's version ("550.54.15"), from the file the NVIDIA driver exposes on Linux."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    match = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", text)
    return match.group(1) if match else None


def environment(device: str) -> dict[str, Any]:
    """Versions, CUDA and the GPU's memory (or "cpu"), for the start report."""
    import torch

    out: dict[str, Any] = {
        "versions": {
            "python": platform.python_version(),
            **{name: _version(name) for name in ("torch", "diffusers", "transformers", "runpod", "fuseline")},
        },
        "device": device,
        "cuda": {"version": torch.version.cuda, "driver": _nvidia_driver()},
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(device)
        out["gpu"] = {
            "name": torch.cuda.get_device_name(device),
            "free_bytes": int(free),
            "total_bytes": int(total),
        }
    else:
        out["gpu"] = "cpu"
    return out


def start_fields(worker: StartingWorker, problems: list[str], check: SelfCheck) -> dict[str, Any]:
    settings = worker.settings
    try:
        free = shutil.disk_usage(settings.volume).free
    except OSError:
        free = None
    sync = worker.sync_summary
    return {
        **environment(worker.device),
        "volume": {"path": str(settings.volume), "free_bytes": free},
        "templates_present": available_templates(settings),
        "default_template": settings.default_template,
        "templates_synced": sorted(sync["templates"]) if sync else [],
        "templates_unsynced": sorted(worker.sync_unsynced),
        "sync": sync,
        "problems": problems,
        "self_check": check.fields(),
    }


def log_start(
    worker: StartingWorker, problems: list[str], check: SelfCheck, logger: logging.Logger = log
) -> dict[str, Any]:
    """Log the `worker.start` event (error level when the self-check failed) and return its fields."""
    fields = start_fields(worker, problems, check)
    if check.ok:
        level, message = (logging.WARNING if problems else logging.INFO), "worker started"
        sync_error = (fields["sync"] or {}).get("error")
        if sync_error:
            # The release could not be read (remote down, release file unreadable): say what is served.
            unsynced = fields["templates_unsynced"]
            message += f" without its release ({sync_error}); serving what the volume holds: " + (
                ", ".join(unsynced) if unsynced else "no template"
            )
        elif problems:
            message += f" with {len(problems)} template problem(s); jobs for those templates will fail"
    else:
        level, message = logging.ERROR, f"self-check failed, not taking jobs: {check.error}"
    log_event(logger, "worker.start", message, level=level, **fields)
    return fields
