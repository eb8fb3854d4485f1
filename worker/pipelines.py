"""Loading a template's merged folder into a diffusers pipeline, and an LRU cache of loaded pipelines.

Pipelines load from a checked folder (worker/folders.py) with local_files_only, fp16 on CUDA and fp32 on
CPU (several fp16 ops are slow or missing on CPU). torch and diffusers are imported by the loader only.
"""

from __future__ import annotations

import filecmp
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fuseline.core.manifest import MANIFEST_NAME, ManifestError, RefinerManifest
from fuseline.core.serving import CHECKPOINT_KIND_BY_IN_CHANNELS
from worker.device import default_device, unrecoverable_device_error
from worker.embeddings import EmbeddingFile, load_embeddings
from worker.errors import ModelInvalid
from worker.folders import WEIGHTED_COMPONENTS, TemplateFolder, check_template_folder
from worker.settings import WorkerSettings
from worker.speed import apply_speed_options
from worker.sync.volume import REFINERS, Lease, Volume
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
    # The template's SDXL refiner (StableDiffusionXLImg2ImgPipeline sharing `pipe`'s VAE, and its
    # text_encoder_2 when the files are the same), its scheduler config and its version folder's lease.
    refiner: Any | None = None
    refiner_scheduler_config: dict[str, Any] | None = None
    refiner_lease: Lease | None = None

    @property
    def template_id(self) -> str:
        return self.folder.template_id

    @property
    def degraded(self) -> bool:
        return self.folder.degraded_reason is not None

    def release(self) -> None:
        for lease in (self.lease, self.refiner_lease):
            if lease is not None:
                lease.release()
        self.lease = self.refiner_lease = None


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
        loaded.lease = lease
        if loaded.folder.manifest.refiner is not None:
            _load_refiner(settings, loaded, loaded.folder.manifest.refiner)
    except BaseException:
        if lease is not None:
            lease.release()
        raise
    return loaded


def same_files(first: Path, second: Path) -> bool:
    """Whether two component folders hold the same weight files, byte for byte (on a synced volume the
    same inode: the store hard-links each object into every folder that has it)."""
    names = sorted(p.name for p in first.glob("*.safetensors"))
    if not names or names != sorted(p.name for p in second.glob("*.safetensors")):
        return False
    for name in names:
        a, b = first / name, second / name
        if os.path.samefile(a, b):
            continue
        if a.stat().st_size != b.stat().st_size or not filecmp.cmp(a, b, shallow=False):
            return False
    return True


def _load_refiner(settings: WorkerSettings, loaded: LoadedTemplate, refiner_id: str) -> None:
    """Load the template's refiner from `<volume>/refiners/<id>` (leased when synced) beside its pipeline,
    sharing the template's VAE always and its text_encoder_2 when the files are identical."""
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline

    template_id = loaded.template_id
    link = settings.volume / REFINERS / refiner_id
    lease = None
    if link.is_symlink() and link.is_dir():
        lease = Lease(Volume(settings.volume, REFINERS), refiner_id)
        try:
            path = lease.acquire()
        except (OSError, RuntimeError) as exc:
            raise ModelInvalid(f"template {template_id!r}: cannot lease refiner {link}: {exc}") from None
    elif link.is_dir():
        path = link
    else:
        raise ModelInvalid(
            f"template {template_id!r} names refiner {refiner_id!r}, but {link} is not on the volume; sync "
            "the release again (it syncs each template's refiner), or remove the refiner from the template"
        )
    try:
        try:
            manifest = RefinerManifest.read(path)
        except ManifestError as exc:
            raise ModelInvalid(f"template {template_id!r}: refiner {refiner_id!r}: {exc}") from None
        if manifest.refiner != refiner_id:
            raise ModelInvalid(
                f"{path / MANIFEST_NAME}: names refiner {manifest.refiner!r}, not {refiner_id!r}; re-sync it"
            )
        pipe = loaded.pipe
        shared: dict[str, Any] = {"vae": pipe.vae}
        if same_files(path / "text_encoder_2", loaded.folder.path / "text_encoder_2"):
            shared.update(text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2)
        try:
            refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
                path, variant="fp16", dtype=pipe.unet.dtype, local_files_only=True, **shared
            )
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:
            if unrecoverable_device_error(exc) is not None:
                raise
            raise ModelInvalid(
                f"template {template_id!r}: diffusers could not load refiner {path} as an fp16 SDXL refiner: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        refiner.to(pipe.device)
        refiner.set_progress_bar_config(disable=True)
    except BaseException:
        if lease is not None:
            lease.release()
        raise
    loaded.refiner = refiner
    loaded.refiner_scheduler_config = dict(refiner.scheduler.config)
    loaded.refiner_lease = lease
    loaded.nbytes = pipeline_weight_bytes(pipe, refiner)


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


def pipeline_weight_bytes(*pipes: Any) -> int:
    """Bytes of the loaded weights that count toward the cache budget (a module two pipelines share,
    such as a refiner's VAE, once)."""
    seen: dict[int, int] = {}
    for pipe in pipes:
        for name in WEIGHTED_COMPONENTS:
            module = getattr(pipe, name, None)
            for p in module.parameters() if module is not None else ():
                seen[id(p)] = p.numel() * p.element_size()
    return sum(seen.values())


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
