"""Loading a template's merged folder into a diffusers pipeline, and an LRU cache of loaded pipelines.

Pipelines load from a checked folder (worker/folders.py) with local_files_only, fp16 on CUDA and fp32 on
CPU (several fp16 ops are slow or missing on CPU). torch and diffusers are imported by the loader only.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fuseline.core.serving import CHECKPOINT_KIND_BY_IN_CHANNELS
from worker.device import default_device, unrecoverable_device_error
from worker.embeddings import EmbeddingFile, load_embeddings
from worker.errors import ModelInvalid
from worker.folders import WEIGHTED_COMPONENTS, TemplateFolder, check_template_folder
from worker.settings import WorkerSettings
from worker.speed import apply_speed_options
from worker.sync.volume import Lease, Volume
from worker.telemetry import COUNTERS, count_in_job


@dataclass
class LoadedTemplate:
    folder: TemplateFolder
    pipe: Any  # StableDiffusionXLPipeline
    scheduler_config: dict[str, Any]
    nbytes: int
    load_ms: float
    # The reader lease on the version folder loaded from, held while the pipeline is cached (released
    # by PipelineCache on eviction): diffusers may open files lazily, so sync must not delete it.
    lease: Lease | None = None
    # Fallback entries only: the merged folder's state when it was refused (worker.fallback.merged_marker).
    merged_marker: tuple | None = None
    # The img2img/inpaint pipelines built from `pipe`'s own components (worker.mode_pipelines), by mode:
    # they live and die with this entry and hold no weights of their own.
    mode_pipes: dict[str, Any] = field(default_factory=dict)
    # The template's own runtime adapters (fallback entries: its LoRAs) as (adapter name, weight): what
    # set_adapters restores after a job's add-ons (worker/addons.py). Empty for a merged model.
    base_adapters: tuple[tuple[str, float], ...] = ()
    # Add-on adapters loaded into this pipeline, least recently used first: adapter name -> add-on name.
    addon_adapters: OrderedDict[str, str] = field(default_factory=OrderedDict)

    @property
    def template_id(self) -> str:
        return self.folder.template_id

    @property
    def degraded(self) -> bool:
        return self.folder.degraded_reason is not None

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None


def load_template(settings: WorkerSettings, template_id: str, device: str | None = None) -> LoadedTemplate:
    """Check the folder and load its pipeline on `device` (fp16 on CUDA, fp32 elsewhere)."""
    lease = None
    link = settings.models_dir / template_id
    if link.is_symlink() and link.is_dir():
        # A synced version: lease it so sync's garbage collection spares it while loading and while the
        # pipeline is cached; load from the version folder itself, not the link a sync may switch.
        lease = Lease(Volume(settings.volume), template_id)
        try:
            path: Path | None = lease.acquire()
        except (OSError, RuntimeError) as exc:
            raise ModelInvalid(f"template {template_id!r}: cannot lease {link}: {exc}") from None
    else:
        path = None  # a plain folder (placed by hand): sync never deletes it
    try:
        loaded = _load(settings, template_id, check_template_folder(settings, template_id, path), device)
    except BaseException:
        if lease is not None:
            lease.release()
        raise
    loaded.lease = lease
    return loaded


def _load(
    settings: WorkerSettings, template_id: str, folder: TemplateFolder, device: str | None
) -> LoadedTemplate:
    import torch
    from diffusers import StableDiffusionXLPipeline

    device = device or default_device(settings.device)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    started = time.perf_counter()
    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(
            folder.path, variant="fp16", dtype=dtype, local_files_only=True
        )
    except torch.OutOfMemoryError:
        raise  # not the folder's fault: the caller frees memory and retries
    except Exception as exc:  # any failure to load (missing, truncated, mismatched files) is the folder's
        if unrecoverable_device_error(exc) is not None:
            # ...except a CUDA error: the GPU's fault, and no other folder (nor the fallback) would load
            # on it; the handler answers CUDA_ERROR and asks RunPod for a new worker.
            raise
        raise ModelInvalid(
            f"template {template_id!r}: diffusers could not load {folder.path} as an fp16 SDXL folder: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    scheduler_prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    if scheduler_prediction != folder.manifest.prediction_type:
        raise ModelInvalid(
            f"{folder.path}: scheduler/scheduler_config.json has prediction_type {scheduler_prediction!r} "
            f"but fuseline.json says {folder.manifest.prediction_type!r}; rebuild the export"
        )
    in_channels = pipe.unet.config.in_channels
    unet_kind = CHECKPOINT_KIND_BY_IN_CHANNELS.get(in_channels, f"unknown ({in_channels} channels)")
    if unet_kind != folder.manifest.checkpoint.kind:
        raise ModelInvalid(
            f"{folder.path}: unet/config.json has in_channels {in_channels} but fuseline.json's "
            f"checkpoint.kind is {folder.manifest.checkpoint.kind!r} (a 9-channel UNet is an inpainting "
            "checkpoint, 'inpaint'; a 4-channel one is ordinary, no kind); rebuild the export"
        )
    load_embeddings(pipe, template_id, folder_embeddings(folder))
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    apply_speed_options(pipe, settings.speed)
    return LoadedTemplate(
        folder=folder,
        pipe=pipe,
        scheduler_config=dict(pipe.scheduler.config),
        nbytes=pipeline_weight_bytes(pipe),
        load_ms=(time.perf_counter() - started) * 1000,
    )


def folder_embeddings(folder: TemplateFolder) -> list[EmbeddingFile]:
    """The embedding files a merged folder's manifest names (inside the folder)."""
    return [EmbeddingFile(e.token, folder.path / e.file, e.source) for e in folder.manifest.embeddings or ()]


def pipeline_weight_bytes(pipe: Any) -> int:
    """Bytes of the loaded weights that count toward the cache budget."""
    return sum(
        p.numel() * p.element_size()
        for name in WEIGHTED_COMPONENTS
        if getattr(pipe, name, None) is not None
        for p in getattr(pipe, name).parameters()
    )


class PipelineCache:
    """Loaded templates, least recently used evicted first, within a count and (optionally) a byte budget.

    `estimate` gives a template's size before loading, so room is made before the new weights arrive
    (on a GPU, loading first and evicting after would run out of memory). `is_stale(entry)`, asked on
    every hit, drops an entry that should be loaded again (a runtime-LoRA fallback once the merged
    folder is there: worker.fallback.merged_became_available).
    """

    def __init__(
        self,
        loader: Callable[[str], LoadedTemplate],
        max_count: int,
        max_bytes: int | None = None,
        estimate: Callable[[str], int] | None = None,
        on_evict: Callable[[LoadedTemplate], None] | None = None,
        is_stale: Callable[[LoadedTemplate], bool] | None = None,
    ):
        self._loader = loader
        self._is_stale = is_stale
        self._entries: OrderedDict[str, LoadedTemplate] = OrderedDict()
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._estimate = estimate or (lambda _id: 0)
        self._on_evict = on_evict

    def __contains__(self, template_id: str) -> bool:
        return template_id in self._entries

    def loaded(self) -> list[str]:
        """Template ids in the cache, least recently used first."""
        return list(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def get(self, template_id: str) -> tuple[LoadedTemplate, bool]:
        """(the loaded template, whether this call loaded it)."""
        entry = self._entries.get(template_id)
        if entry is not None and self._is_stale is not None and self._is_stale(entry):
            # Evicted before the replacement loads, so its memory is free for it.
            self.evict(template_id)
            entry = None
        # Hits and misses count for jobs only (the start-up load and self-check are not traffic), and a
        # miss once its load succeeded: a template that fails to load fails each job, counted under
        # jobs_failed and its error code, not as one miss per job.
        if entry is not None:
            self._entries.move_to_end(template_id)
            count_in_job("cache_hits")
            return entry, False
        self._make_room(self._estimate(template_id))
        entry = self._loader(template_id)
        self._entries[template_id] = entry
        count_in_job("cache_misses")
        return entry, True

    def _make_room(self, incoming: int) -> None:
        while self._entries and (
            len(self._entries) >= self.max_count
            or (self.max_bytes is not None and self.nbytes + incoming > self.max_bytes)
        ):
            self.evict_oldest()

    def evict(self, template_id: str) -> bool:
        """Drop `template_id`'s entry (its next get loads it again); False when it was not cached."""
        entry = self._entries.pop(template_id, None)
        if entry is None:
            return False
        COUNTERS.add("cache_evictions")
        entry.release()
        if self._on_evict:
            self._on_evict(entry)
        return True

    def evict_oldest(self) -> str | None:
        if not self._entries:
            return None
        template_id, entry = self._entries.popitem(last=False)
        COUNTERS.add("cache_evictions")
        entry.release()
        if self._on_evict:
            self._on_evict(entry)
        return template_id

    def evict_all_except(self, keep: str | None = None) -> list[str]:
        """Drop every entry but `keep` (used to free memory before an out-of-memory retry)."""
        dropped = [t for t in self._entries if t != keep]
        for template_id in dropped:
            entry = self._entries.pop(template_id)
            COUNTERS.add("cache_evictions")
            entry.release()
            if self._on_evict:
                self._on_evict(entry)
        return dropped
