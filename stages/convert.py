"""CONVERT: turn one catalog checkpoint into a diffusers SDXL folder (`--out`), fully offline.

Single-file (SGM/A1111 layout) checkpoints go through diffusers' `from_single_file` with a local `config=`
folder (without it diffusers reaches for the hub); diffusers folders are re-saved into the same normal
layout (safetensors, no variant). Weights keep the source dtype: upcasting fp16 to fp32 doubles the bytes
DVC hashes and stores and adds no precision. What the file is gets decided from its header first, so an
SD 1.5 model or a LoRA is refused with a message saying so instead of failing deep inside diffusers.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from fuseline.core.catalog.model import Catalog, Checkpoint, Source
from fuseline.core.catalog.sources import parse_source
from fuseline.core.files import atomic_dir
from fuseline.core.safetensors_io import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    SafetensorsError,
    TensorEntry,
    read_header,
)
from stages.checkpoint_kind import CheckpointKind, classify_keys, declares_v_prediction, dominant_dtype
from stages.errors import StageError
from stages.local_files import check_pickle_allowed, check_sha256, materialize, project_archive
from stages.receipts import read_receipt
from stages.runtime import load_project_catalog, run_stage
from stages.settings import BuildSettings
from stages.sources.download import RetryPolicy

log = logging.getLogger("fuseline.stages.convert")

# SDXL base 1.0's diffusers configs and tokenizers, kept in the repo so conversion never goes online.
DEFAULT_CONFIG_DIR = Path(__file__).resolve().parent.parent / "fuseline" / "configs" / "sdxl-base"
SDXL_PIPELINE = "StableDiffusionXLPipeline"
# What a diffusers folder is, from model_index.json's _class_name (anything else: "not SDXL").
PIPELINE_NAMES = {
    "StableDiffusionPipeline": "a Stable Diffusion 1.x/2.x diffusers folder",
    "StableDiffusionXLImg2ImgPipeline": "an SDXL refiner diffusers folder",
    "StableDiffusion3Pipeline": "a Stable Diffusion 3 diffusers folder",
    "FluxPipeline": "a Flux diffusers folder",
    "StableDiffusionXLInpaintPipeline": "an SDXL inpainting diffusers folder",
}
DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float32"}


def config_dir_for(
    catalog: Catalog,
    checkpoint: Checkpoint,
    where: str,
    receipt: dict[str, Any] | None = None,
    *,
    default: Path = DEFAULT_CONFIG_DIR,
    settings: BuildSettings | None = None,
) -> Path:
    """The local diffusers config folder used to convert this checkpoint (its `config`, else `default`:
    SDXL base's)."""
    if checkpoint.config is None:
        return default
    settings = settings or BuildSettings.from_env()
    path = materialize(
        catalog,
        Source(source=checkpoint.config),
        f"{where}.config",
        receipt=receipt,
        is_config=True,
        cache_dir=settings.download_cache,
        policy=RetryPolicy.from_settings(settings),
        archive=project_archive(catalog, settings),
    )
    if not (path / "model_index.json").is_file():
        raise StageError(
            "CONFIG_INVALID",
            f"{where}.config: {path} has no model_index.json; it must be a diffusers-layout folder "
            "(model_index.json, unet/vae/text_encoder*/scheduler configs, tokenizer/ and tokenizer_2/)",
        )
    return path


def torch_dtype_for(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def inspect_single_file(path: Path) -> tuple[CheckpointKind, str, bool]:
    """(kind, dominant dtype, has v_pred marker) of a single-file checkpoint, without loading its weights
    (safetensors) or with a weights-only, memory-mapped load (pickle, already consented to)."""
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        try:
            tensors = read_header(path).tensors
        except SafetensorsError as exc:
            raise StageError("CHECKPOINT_CORRUPT", exc.message) from None
    elif path.suffix.lower() in PICKLE_SUFFIXES:
        tensors = _pickle_tensor_infos(path)
    else:
        raise StageError(
            "CHECKPOINT_FORMAT",
            f"{path}: unknown file type {path.suffix!r}; expected .safetensors (or a diffusers folder)",
        )
    if not tensors:
        raise StageError("CHECKPOINT_CORRUPT", f"{path}: holds no tensors")
    dtype = dominant_dtype(tensors)
    if dtype is None:
        raise StageError("CHECKPOINT_CORRUPT", f"{path}: no floating-point tensors")
    float_dtypes = sorted({t.dtype for t in tensors.values() if t.dtype in DTYPES})
    if len(float_dtypes) > 1:
        # from_single_file loads every component in one dtype; the export is fp16 either way.
        log.warning(
            "%s mixes %s tensors; converting all of them to %s", path, "/".join(float_dtypes), DTYPES[dtype]
        )
    return classify_keys(list(tensors)), dtype, declares_v_prediction(tensors)


def _pickle_tensor_infos(path: Path) -> dict[str, TensorEntry]:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for a bad pickle; all mean the same to the user.
        raise StageError(
            "CHECKPOINT_CORRUPT", f"{path}: cannot be read as a torch checkpoint: {exc}"
        ) from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else {}
    names = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}
    return {
        k: TensorEntry(names.get(v.dtype, str(v.dtype)), tuple(v.shape))
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
    }


def _refuse_if_not_sdxl(path: Path, kind: CheckpointKind) -> None:
    if not kind.is_sdxl:
        raise StageError("NOT_SDXL", f"{path} is {kind.name}, not an SDXL checkpoint: {kind.advice}")


def _check_prediction(path: Path, has_v_pred_marker: bool, prediction: str, where: str) -> None:
    if has_v_pred_marker and prediction != "v_prediction":
        raise StageError(
            "PREDICTION_MISMATCH",
            f"{path} carries a `v_pred` marker (a v-prediction model) but {where}.prediction is "
            f'{prediction!r}; set "prediction": "v_prediction" or images will come out wrong',
        )


def _folder_dtype_and_variant(folder: Path) -> tuple[str, str | None]:
    """The UNet's stored dtype, and the variant its weights use (None for plain file names)."""
    unet = folder / "unet"
    # Variant files are `<stem>.fp16.safetensors`, or `<stem>.fp16-00001-of-00002.safetensors` when sharded.
    weights = sorted(unet.glob("diffusion_pytorch_model*.safetensors"))
    plain = [p for p in weights if ".fp16" not in p.name]
    fp16 = [p for p in weights if ".fp16" in p.name]
    chosen, variant = (plain, None) if plain else (fp16, "fp16")
    if not chosen:
        return "F32", None  # pickle-only folder (consented to): diffusers stores fp32 .bin by default
    try:
        tensors = read_header(chosen[0]).tensors
    except SafetensorsError as exc:
        raise StageError("CHECKPOINT_CORRUPT", exc.message) from None
    dtype = dominant_dtype(tensors)
    if dtype is None:
        raise StageError("CHECKPOINT_CORRUPT", f"{chosen[0]}: no floating-point tensors")
    return dtype, variant


def _load_diffusers_folder(folder: Path, allow_pickle: bool):
    from diffusers import StableDiffusionXLPipeline

    index = json.loads((folder / "model_index.json").read_text())
    class_name = index.get("_class_name")
    if class_name != SDXL_PIPELINE:
        what = PIPELINE_NAMES.get(class_name, f"a {class_name} folder")
        raise StageError("NOT_SDXL", f"{folder} is {what}, not an SDXL base pipeline ({SDXL_PIPELINE})")
    dtype, variant = _folder_dtype_and_variant(folder)
    return StableDiffusionXLPipeline.from_pretrained(
        folder,
        dtype=torch_dtype_for(dtype),
        variant=variant,
        use_safetensors=None if allow_pickle else True,
        local_files_only=True,
    ), dtype


def _load_single_file(path: Path, config_dir: Path, dtype: str):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_single_file(
        str(path),
        config=str(config_dir),
        local_files_only=True,
        dtype=torch_dtype_for(dtype),
    )


def _check_loaded(pipe: Any, source: Path, config_dir: Path) -> None:
    """Catch the silent failures of single-file loading: weights left on the meta device (a config that
    does not fit the checkpoint) come out as NaN images much later."""
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name)
        for param_name, param in list(module.named_parameters()) + list(module.named_buffers()):
            if param.device.type == "meta":
                raise StageError(
                    "CONFIG_MISMATCH",
                    f"{source}: {name}.{param_name} was not filled from the checkpoint; the config folder "
                    f"{config_dir} does not describe this model (set the checkpoint's `config`)",
                )


def _set_prediction(pipe: Any, prediction: str) -> None:
    """diffusers cannot tell v-prediction from the SDXL single file, so the catalog's value is written."""
    if pipe.scheduler.config.get("prediction_type") != prediction:
        pipe.scheduler = pipe.scheduler.__class__.from_config(
            pipe.scheduler.config, prediction_type=prediction
        )


def strip_local_paths(out: Path) -> None:
    """Drop `_name_or_path` (the absolute source path) from saved configs: the output must not depend on
    where the project is checked out, or DVC hashes and the run-cache differ between machines."""
    for cfg in sorted(out.rglob("*.json")):
        if cfg.name.endswith(".index.json"):
            continue
        data = json.loads(cfg.read_text())
        if isinstance(data, dict) and "_name_or_path" in data:
            del data["_name_or_path"]
            cfg.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def convert_checkpoint(
    source: Path,
    out: Path,
    *,
    config_dir: Path = DEFAULT_CONFIG_DIR,
    prediction: str = "epsilon",
    sha256: str | None = None,
    allow_pickle: bool = False,
    where: str = "checkpoint",
) -> dict[str, Any]:
    """Write the diffusers SDXL folder for `source` (single file or diffusers folder) into `out`.

    Returns a summary (kind of source, dtype, timings) for the log.
    """
    started = time.perf_counter()
    check_pickle_allowed(source, allow_pickle, where)
    if source.is_dir():
        if not (source / "model_index.json").is_file():
            raise StageError(
                "CHECKPOINT_FORMAT",
                f"{where}: {source} is a folder without model_index.json; point the source at a single-file "
                ".safetensors checkpoint or at a diffusers SDXL folder",
            )
        check_sha256(source, sha256, where)
        pipe, dtype = _load_diffusers_folder(source, allow_pickle)
        layout = "diffusers"
    else:
        check_sha256(source, sha256, where)
        kind, dtype, v_pred_marker = inspect_single_file(source)
        _refuse_if_not_sdxl(source, kind)
        _check_prediction(source, v_pred_marker, prediction, where)
        pipe = _load_single_file(source, config_dir, dtype)
        layout = "single-file"
    _check_loaded(pipe, source, config_dir)
    _set_prediction(pipe, prediction)
    loaded = time.perf_counter()
    pipe.save_pretrained(out, safe_serialization=True)
    strip_local_paths(out)
    summary = {
        "layout": layout,
        "dtype": DTYPES[dtype],
        "prediction": prediction,
        "load_s": round(loaded - started, 2),
        "save_s": round(time.perf_counter() - loaded, 2),
    }
    log.info("converted %s (%s, %s) -> %s: %s", source, layout, DTYPES[dtype], out, summary)
    return summary


def main(
    checkpoint_id: str, *, out: Path, receipt: Path | None = None, sdxl_config: Path = DEFAULT_CONFIG_DIR
) -> None:
    """The stage: write checkpoint `checkpoint_id` as a diffusers folder at `out`. `receipt`: the
    fetch-checkpoint stage's receipt (absent: the catalog's pins only); `sdxl_config`: the SDXL base
    configs used when the checkpoint names no `config` of its own."""
    settings = BuildSettings.from_env()
    catalog = load_project_catalog()
    if checkpoint_id not in catalog.checkpoints:
        known = ", ".join(sorted(catalog.checkpoints)) or "(none)"
        raise StageError(
            "CHECKPOINT_UNKNOWN", f"no checkpoint {checkpoint_id!r} in the catalog; known: {known}"
        )
    checkpoint = catalog.checkpoints[checkpoint_id]
    where = f"checkpoints.{checkpoint_id}"
    # The fetch-checkpoint stage's receipt gives the sha256 of unpinned remote sources; the bytes come
    # from the download cache (or are fetched again on a machine that lacks them).
    recorded = read_receipt(receipt, where)
    source = materialize(
        catalog,
        checkpoint,
        where,
        receipt=recorded,
        cache_dir=settings.download_cache,
        policy=RetryPolicy.from_settings(settings),
        archive=project_archive(catalog, settings),
    )
    config_dir = config_dir_for(catalog, checkpoint, where, recorded, default=sdxl_config, settings=settings)
    if parse_source(checkpoint.source).scheme == "file" and source.is_dir() and checkpoint.config is not None:
        log.info("%s: a diffusers folder carries its own configs; %s.config is not used", source, where)
    with atomic_dir(out) as tmp:
        convert_checkpoint(
            source,
            tmp,
            config_dir=config_dir,
            prediction=checkpoint.prediction,
            sha256=checkpoint.sha256,
            allow_pickle=checkpoint.allow_pickle,
            where=where,
        )


if __name__ == "__main__":
    run_stage("convert", main, paths=("out",), optional_paths=("receipt", "sdxl_config"))
