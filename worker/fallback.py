"""Runtime-LoRA fallback: serve a template from its base checkpoint plus its LoRA files, loaded at run time
with diffusers, when its merged model folder is missing or refused (see docs/operations.md,
"Runtime-LoRA fallback").

What it needs on the volume, none of it inside the merged folder (worker/sync/recipes.py: the recipe sync
writes from the release entry, first thing, or a person by hand; the base checkpoint as a diffusers SDXL
folder under sources/checkpoints/; each LoRA file under sources/loras/, named by its content hash).

A merged folder that passes its checks is always preferred; the fallback answers only when it does not,
and its jobs carry `"degraded": true` and a warning. Heavy imports (torch, diffusers, peft) happen inside
the loader only: importing the handler must not pull them in (tests/worker/test_boundaries.py).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fuseline.core.catalog.model import ID_PATTERN, Defaults
from fuseline.core.errors import ConfigInvalid
from fuseline.core.logs import log_event
from fuseline.core.manifest import CheckpointRef, LoraRef, ModelManifest, VaeRef
from fuseline.core.safetensors_io import DTYPE_BYTES, SafetensorsError, read_header
from worker.adapters import check_lora_file, load_adapter, peft_name
from worker.device import default_device, unrecoverable_device_error
from worker.embeddings import EmbeddingFile, load_embeddings
from worker.errors import ModelInvalid, UnknownTemplate, WorkerError
from worker.folders import WEIGHTED_COMPONENTS, TemplateFolder, check_template_folder, folder_weight_bytes
from worker.pipelines import LoadedTemplate, load_template, pipeline_weight_bytes
from worker.settings import WorkerSettings, load_settings
from worker.sync.recipes import (
    RECIPES_DIR,
    Recipe,
    RecipeInvalid,
    checkpoint_dir,
    checkpoint_dir_name,
    embedding_path,
    lora_path,
    missing_sources,
)
from worker.sync.recipes import read_recipe as read_recipe_file

log = logging.getLogger("fuseline.worker.fallback")

DOCS = 'docs/operations.md, "Runtime-LoRA fallback"'


def degraded_warning(template_id: str, reason: str) -> str:
    return (
        f"degraded: the merged model of template {template_id!r} was unavailable ({reason}); its LoRAs "
        "were applied at run time to the base checkpoint instead (slower, and images may differ slightly "
        "from the merged model's)"
    )


def read_recipe(settings: WorkerSettings, template_id: str) -> Recipe | None:
    """The template's recipe on this worker's volume (checked against FUSELINE_SPEC_HASHES), None when there
    is none; ModelInvalid when it is unusable."""
    try:
        return read_recipe_file(settings.volume, template_id, settings.expected_spec_hashes.get(template_id))
    except RecipeInvalid as exc:
        raise ModelInvalid(exc.message) from None


def adapter_name(index: int, source: str) -> str:
    """A PEFT adapter name for the template's `index`-th LoRA (adapters.peft_name), unique by the index
    prefix."""
    return f"lora{index}_{peft_name(source)}"[:64]


# ----------------------------------------------------------------------------------------- resolving


def _fallback_folder(
    settings: WorkerSettings, template_id: str, recipe: Recipe, reason: str
) -> TemplateFolder:
    """A TemplateFolder for the base checkpoint, its manifest made from the recipe: the job output reports
    the recipe's checkpoint, LoRAs and spec hash exactly as it does a merged folder's."""
    manifest = ModelManifest(
        template=template_id,
        checkpoint=CheckpointRef(id=checkpoint_dir_name(recipe.checkpoint), source=recipe.checkpoint),
        loras=[
            LoraRef(source=x.source, sha256=x.sha256, scale=x.scale, placed_keys={}) for x in recipe.loras
        ],
        vae=VaeRef(source="checkpoint"),  # the base folder's own vae/
        prediction_type=recipe.prediction_type,
        spec_hash=recipe.spec_hash,
        fuseline_version="runtime-lora",
        defaults=recipe.defaults,
    )
    # The fallback serves the base checkpoint alone: without the template's refiner (docs/templates.md).
    defaults = (recipe.defaults or Defaults()).model_copy(update={"refiner": None})
    return TemplateFolder(
        template_id,
        checkpoint_dir(settings.volume, recipe.checkpoint),
        manifest,
        defaults,
        degraded_reason=reason,
    )


def _with_note(error: WorkerError, note: str) -> WorkerError:
    return type(error)(f"{error.message}; runtime-LoRA fallback: {note}")


def resolve_template(settings: WorkerSettings, template_id: str) -> TemplateFolder:
    """The merged folder when it passes its checks; otherwise the fallback's (`degraded_reason` set) when
    the recipe and every file it names are on the volume; otherwise the merged folder's own error, with
    what the fallback lacks. Cheap (no hashing): run for every job, before the pipeline cache."""
    try:
        return check_template_folder(settings, template_id)
    except (UnknownTemplate, ModelInvalid) as merged_error:
        return _resolve_fallback(settings, template_id, merged_error)


def _resolve_fallback(
    settings: WorkerSettings, template_id: str, merged_error: WorkerError
) -> TemplateFolder:
    if not re.match(ID_PATTERN, template_id):
        raise merged_error
    try:
        recipe = read_recipe(settings, template_id)
    except ModelInvalid as exc:
        raise ModelInvalid(f"{merged_error.message}; runtime-LoRA fallback: {exc.message}") from None
    if recipe is None:
        raise merged_error  # no recipe: exactly the behaviour without a fallback
    missing = missing_sources(settings.volume, recipe)
    if missing:
        raise _with_note(merged_error, f"the volume lacks {'; '.join(missing)} (see {DOCS})") from None
    return _fallback_folder(settings, template_id, recipe, merged_error.message)


def load_serving(settings: WorkerSettings, template_id: str, device: str | None = None) -> LoadedTemplate:
    """The pipeline cache's loader: the merged folder, or (when it is missing or refused, also at load
    time: truncated weights) the base checkpoint with the LoRAs applied at run time."""
    # Before the merged load is tried: a merged folder a sync installs while the (slow) fallback loads then
    # differs from this marker, and the fallback entry is found stale at the next job.
    marker = merged_marker(settings, template_id)
    try:
        return load_template(settings, template_id, device)
    except (UnknownTemplate, ModelInvalid) as merged_error:
        folder = _resolve_fallback(settings, template_id, merged_error)
        log_event(
            log,
            "template.fallback",
            f"template {template_id}: merged model unavailable ({merged_error}); loading runtime LoRAs",
            level=logging.WARNING,
            template=template_id,
            reason=str(merged_error),
        )
        return load_runtime_loras(settings, folder, device, marker)


def template_weight_bytes(settings: WorkerSettings, template_id: str, bytes_per_value: int) -> int:
    """The cache's size estimate: the merged folder's weights, or else the fallback base folder's."""
    merged = settings.models_dir / template_id
    if merged.is_dir():
        return folder_weight_bytes(merged, bytes_per_value)
    try:
        recipe = read_recipe(settings, template_id)
    except ModelInvalid:
        return 0
    if recipe is None:
        return 0
    total = 0
    for component in WEIGHTED_COMPONENTS:
        for path in (checkpoint_dir(settings.volume, recipe.checkpoint) / component).glob("*.safetensors"):
            stored = _stored_bytes_per_value(path)
            total += path.stat().st_size * bytes_per_value // stored
    return total


def _stored_bytes_per_value(path: Path) -> int:
    """Bytes per value of the first tensor in a safetensors header (2 when unreadable)."""
    try:
        tensors = read_header(path).tensors
    except (OSError, SafetensorsError):
        return 2
    first = next(iter(tensors.values()), None)
    return DTYPE_BYTES.get(first.dtype, 2) if first is not None else 2


# ------------------------------------------------------------------------------------------- loading


def verify_lora_file(path: Path, lora: LoraRef) -> None:
    """Refuse a pickle, and a file whose content is not the recipe's sha256 (a wrong or damaged LoRA)."""
    check_lora_file(
        path,
        lora.source,
        lora.sha256,
        f"its name and the recipe promise; the file is damaged or not this LoRA: copy the right file there "
        f"({DOCS})",
    )


def recipe_embeddings(settings: WorkerSettings, folder: TemplateFolder) -> list[EmbeddingFile]:
    """The recipe's embedding files under sources/embeddings/, each checked against its sha256."""
    recipe = read_recipe(settings, folder.template_id)
    files = []
    for embedding in (recipe.embeddings if recipe is not None else None) or ():
        path = embedding_path(settings.volume, embedding.sha256)
        fix = f"its name and the recipe promise; copy the right file there ({DOCS})"
        check_lora_file(path, embedding.source, embedding.sha256, fix, what="embedding")
        files.append(EmbeddingFile(embedding.token, path, embedding.source))
    return files


def _fp16_variant(base: Path) -> str | None:
    """'fp16' when the base folder's UNet weights are saved as the fp16 variant (an export), else None
    (the convert stage's layout: plain file names in the source dtype)."""
    unet = base / "unet"
    return "fp16" if any(".fp16" in p.name for p in unet.glob("*.safetensors")) else None


def load_runtime_loras(
    settings: WorkerSettings,
    folder: TemplateFolder,
    device: str | None = None,
    refused_marker: tuple | None = None,
) -> LoadedTemplate:
    """Load the base checkpoint folder and apply the recipe's LoRAs as PEFT adapters (not fused).

    `refused_marker`: merged_marker() of the merged folder taken before it was tried and refused (by
    load_serving), kept in the entry so that a merged folder appearing during this load counts as new."""
    import torch

    template_id, base, manifest = folder.template_id, folder.path, folder.manifest
    # Hash before the (slow) pipeline load: a wrong file fails in the time it takes to read it.
    for lora in manifest.loras:
        verify_lora_file(lora_path(settings.volume, lora.sha256), lora)
    embeddings = recipe_embeddings(settings, folder)
    try:
        if manifest.loras:
            import peft  # noqa: F401  (diffusers' load_lora_weights needs its PEFT backend)
    except ImportError:
        raise ModelInvalid(
            f"template {template_id!r}: {folder.degraded_reason}; the runtime-LoRA fallback needs the peft "
            "package, which this worker image lacks (add it to requirements/worker.lock)"
        ) from None
    from diffusers import StableDiffusionXLPipeline

    device = device or default_device(settings.device)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    started = time.perf_counter()
    try:
        # use_safetensors: a folder holding only pickle (.bin) weights is refused, never unpickled.
        pipe = StableDiffusionXLPipeline.from_pretrained(
            base, variant=_fp16_variant(base), dtype=dtype, local_files_only=True, use_safetensors=True
        )
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        if unrecoverable_device_error(exc) is not None:
            raise  # the GPU's fault, not the folder's: the handler answers CUDA_ERROR (refresh_worker)
        raise ModelInvalid(
            f"template {template_id!r} (runtime-LoRA fallback): diffusers could not load the base "
            f"checkpoint {base} as an SDXL folder with safetensors weights: {type(exc).__name__}: {exc}"
        ) from None
    names = [adapter_name(i, lora.source) for i, lora in enumerate(manifest.loras)]
    for name, lora in zip(names, manifest.loras, strict=True):
        load_adapter(pipe, lora_path(settings.volume, lora.sha256), name, lora.source, str(base))
    if names:
        pipe.set_adapters(names, adapter_weights=[lora.scale for lora in manifest.loras])
    load_embeddings(pipe, template_id, embeddings)
    # As the merge does: the catalog's prediction type wins over whatever the base's scheduler says
    # (diffusers cannot detect v-prediction from an SDXL single file).
    scheduler_config = {**pipe.scheduler.config, "prediction_type": manifest.prediction_type}
    pipe.scheduler = type(pipe.scheduler).from_config(scheduler_config)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    # No FUSELINE_SPEED options here: fuse_qkv concatenates to_q/to_k/to_v into one projection and would
    # drop the LoRA layers PEFT put on them.
    return LoadedTemplate(
        folder=folder,
        pipe=pipe,
        scheduler_config=dict(pipe.scheduler.config),
        nbytes=pipeline_weight_bytes(pipe),
        load_ms=(time.perf_counter() - started) * 1000,
        merged_marker=refused_marker,
        # What a job's add-ons are set beside and restored to (worker/addons.py).
        base_adapters=tuple(zip(names, (lora.scale for lora in manifest.loras), strict=True)),
    )


# --------------------------------------------------------------------------------- preferring merged


def merged_marker(settings: WorkerSettings, template_id: str) -> tuple | None:
    """What the merged folder looks like now (its resolved path and manifest's mtime/size), None when it
    has no manifest: recorded by a fallback entry, so the cache can tell a new merged folder from the one
    that was refused (and does not reload a still-broken folder on every job)."""
    link = settings.models_dir / template_id
    with contextlib.suppress(OSError):
        st = (link / "fuseline.json").stat()
        return (str(link.resolve()), st.st_mtime_ns, st.st_size, st.st_ino)
    return None


def merged_became_available(settings: WorkerSettings, entry: LoadedTemplate) -> bool:
    """For PipelineCache's `is_stale`: a fallback entry is stale once a merged folder other than the one
    refused when it loaded passes its checks (the next job then evicts it and loads the merged model)."""
    if not entry.degraded:
        return False
    marker = merged_marker(settings, entry.template_id)
    if marker is None or marker == entry.merged_marker:
        return False
    try:
        check_template_folder(settings, entry.template_id)
    except WorkerError:
        return False
    return True


# ---------------------------------------------------------------------------------------------- CLI


@dataclass(frozen=True)
class FallbackStatus:
    template: str
    recipe: Path
    ready: bool
    needs: list[str]


def fallback_status(settings: WorkerSettings) -> list[FallbackStatus]:
    """For each recipe on the volume: whether the fallback could serve it, and what it lacks."""
    out = []
    for path in sorted((settings.volume / RECIPES_DIR).glob("*.json")):
        template = path.stem
        try:
            recipe = read_recipe(settings, template)
        except ModelInvalid as exc:
            out.append(FallbackStatus(template, path, False, [exc.message]))
            continue
        assert recipe is not None
        expected = [
            f"{checkpoint_dir(settings.volume, recipe.checkpoint)}/",
            *(str(lora_path(settings.volume, x.sha256)) for x in recipe.loras),
            *(str(embedding_path(settings.volume, x.sha256)) for x in recipe.embeddings or ()),
        ]
        missing = missing_sources(settings.volume, recipe)
        out.append(FallbackStatus(template, path, not missing, missing or expected))
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m worker.fallback [--volume V]`: where each template's fallback files go, and what is
    missing (exit 0 when every recipe is ready)."""
    parser = argparse.ArgumentParser(prog="python -m worker.fallback", description=main.__doc__)
    parser.add_argument("--volume", default=None, help="default: FUSELINE_VOLUME or /runpod-volume")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ConfigInvalid as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.volume:
        settings = settings.model_copy(update={"volume": Path(args.volume)})
    statuses = fallback_status(settings)
    if not statuses:
        print(f"no recipes in {settings.volume / RECIPES_DIR}: run the sync (FUSELINE_RELEASE) first")
        return 2
    for status in statuses:
        print(f"{status.template}: {'ready' if status.ready else 'NOT ready, missing:'}")
        for line in status.needs:
            print(f"  {line}")
    return 0 if all(s.ready for s in statuses) else 2


if __name__ == "__main__":
    sys.exit(main())
