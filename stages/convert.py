"""CONVERT: turn one catalog checkpoint into a diffusers SDXL folder (`--out`), fully offline.

Single-file (SGM/A1111 layout) checkpoints go through diffusers' `from_single_file` with a local `config=`
folder (without it diffusers reaches for the hub); diffusers folders are re-saved into the same normal
layout (safetensors, no variant). Inpainting checkpoints (a 9-channel UNet, told from the header's shapes)
convert too, as an SDXL inpainting pipeline folder: with the SDXL base configs, the UNet's `in_channels` is
set to 9 in a temporary copy (the configs are otherwise the same); the merge records the kind in
fuseline.json. Weights keep the source dtype: upcasting fp16 to fp32 doubles the bytes
DVC hashes and stores and adds no precision. What the file is gets decided from its header first, so an
SD 1.5 model or a LoRA is refused with a message saying so instead of failing deep inside diffusers.

Two other kinds of entry end here too. An SDXL refiner is exported as the servable fp16 folder itself
(UNet, text_encoder_2, tokenizer_2, scheduler and a refiner `fuseline.json`; no VAE: the worker decodes
with the template's), since nothing is fused into it. A recipe checkpoint converts each of its inputs and
merges them tensor by tensor in fp32 (stages/checkpoint_recipe.py).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from fuseline import __version__
from fuseline.core.catalog.model import Catalog, Checkpoint, RecipeCheckpoint, Source
from fuseline.core.catalog.sources import parse_source
from fuseline.core.files import atomic_dir
from fuseline.core.manifest import CheckpointRef, RefinerManifest
from fuseline.core.safetensors_io import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    SafetensorsError,
    TensorEntry,
    read_header,
)
from fuseline.core.serving import CHECKPOINT_KIND_BY_IN_CHANNELS, INPAINT_UNET_IN_CHANNELS
from stages.checkpoint_kind import (
    CheckpointKind,
    classify_keys,
    classify_tensors,
    declares_v_prediction,
    dominant_dtype,
)
from stages.checkpoint_recipe import merge_converted
from stages.errors import StageError
from stages.export import copy_plain_files, export_component
from stages.local_files import check_pickle_allowed, check_sha256, materialize, project_archive
from stages.receipts import read_receipt
from stages.runtime import load_params, load_project_catalog, record_metrics, run_stage
from stages.settings import BuildSettings
from stages.shards import write_json
from stages.sources.download import RetryPolicy

log = logging.getLogger("fuseline.stages.convert")

# SDXL base 1.0's and SDXL refiner 1.0's diffusers configs and tokenizers, kept in the repo so conversion
# never goes online.
DEFAULT_CONFIG_DIR = Path(__file__).resolve().parent.parent / "fuseline" / "configs" / "sdxl-base"
DEFAULT_REFINER_CONFIG_DIR = DEFAULT_CONFIG_DIR.parent / "sdxl-refiner"
SDXL_PIPELINE = "StableDiffusionXLPipeline"
SDXL_INPAINT_PIPELINE = "StableDiffusionXLInpaintPipeline"
REFINER_PIPELINE = "StableDiffusionXLImg2ImgPipeline"
# The refiner export: what the worker loads beside a template (it passes the template's VAE).
REFINER_WEIGHTS = ("unet", "text_encoder_2")
REFINER_PLAIN = ("tokenizer_2", "scheduler")
REFINER_ABSENT = ("vae", "text_encoder", "tokenizer")
# The pipeline class a converted folder is written as, by the kind of its checkpoint (None: ordinary).
PIPELINE_BY_KIND = {None: SDXL_PIPELINE, "inpaint": SDXL_INPAINT_PIPELINE}
# What a diffusers folder is, from model_index.json's _class_name (anything else but the two above: "not
# SDXL").
PIPELINE_NAMES = {
    "StableDiffusionPipeline": "a Stable Diffusion 1.x/2.x diffusers folder",
    "StableDiffusionXLImg2ImgPipeline": "an SDXL img2img folder that is not a refiner",
    "StableDiffusion3Pipeline": "a Stable Diffusion 3 diffusers folder",
    "FluxPipeline": "a Flux diffusers folder",
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
    return classify_tensors(tensors), dtype, declares_v_prediction(tensors)


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
    if not kind.is_sdxl and kind.kind != "sdxl-refiner":
        raise StageError("NOT_SDXL", f"{path} is {kind.name}, not an SDXL checkpoint: {kind.advice}")


def _is_refiner_folder(index: dict[str, Any]) -> bool:
    return index.get("_class_name") == REFINER_PIPELINE and bool(index.get("requires_aesthetics_score"))


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


def _pipeline_class(kind: str | None):
    """The diffusers pipeline class of a checkpoint kind: None (ordinary), "inpaint", or "refiner"."""
    import diffusers

    return getattr(diffusers, REFINER_PIPELINE if kind == "refiner" else PIPELINE_BY_KIND[kind])


def _folder_kind(folder: Path) -> str | None:
    """The checkpoint kind of a diffusers folder, from its UNet's input channels."""
    config_path = folder / "unet" / "config.json"
    try:
        channels = json.loads(config_path.read_text()).get("in_channels", 4)
    except (OSError, ValueError, AttributeError) as exc:
        raise StageError("CHECKPOINT_FORMAT", f"{config_path}: unreadable UNet config ({exc})") from None
    if channels not in CHECKPOINT_KIND_BY_IN_CHANNELS:
        raise StageError(
            "NOT_SDXL",
            f"{folder}: its UNet takes {channels} input channels; fuseline serves SDXL checkpoints with a "
            f"4-channel (text-to-image) or {INPAINT_UNET_IN_CHANNELS}-channel (inpainting) UNet",
        )
    return CHECKPOINT_KIND_BY_IN_CHANNELS[channels]


def _load_diffusers_folder(folder: Path, allow_pickle: bool):
    index = json.loads((folder / "model_index.json").read_text())
    class_name = index.get("_class_name")
    refiner = _is_refiner_folder(index)
    if class_name not in PIPELINE_BY_KIND.values() and not refiner:
        what = PIPELINE_NAMES.get(class_name, f"a {class_name} folder")
        raise StageError(
            "NOT_SDXL",
            f"{folder} is {what}, not an SDXL base pipeline ({SDXL_PIPELINE}, or {SDXL_INPAINT_PIPELINE} for "
            "an inpainting checkpoint) or SDXL refiner",
        )
    # The UNet decides, not the class name: an inpainting pipeline folder may hold an ordinary UNet.
    kind = "refiner" if refiner else _folder_kind(folder)
    dtype, variant = _folder_dtype_and_variant(folder)
    pipe = _pipeline_class(kind).from_pretrained(
        folder,
        dtype=torch_dtype_for(dtype),
        variant=variant,
        use_safetensors=None if allow_pickle else True,
        local_files_only=True,
    )
    return pipe, dtype, kind


def _inpaint_config_dir(config_dir: Path, scratch: Path) -> Path:
    """`config_dir` as an inpainting pipeline's: itself when its UNet already takes 9 channels, else a
    copy in `scratch` with `in_channels` 9 and the inpainting pipeline class (nothing else differs: SDXL
    inpainting 0.1 is SDXL base with a wider first convolution)."""
    unet_config = json.loads((config_dir / "unet" / "config.json").read_text())
    if unet_config.get("in_channels") == INPAINT_UNET_IN_CHANNELS:
        return config_dir
    copy = scratch / "inpaint-config"
    shutil.copytree(config_dir, copy)
    unet_config["in_channels"] = INPAINT_UNET_IN_CHANNELS
    (copy / "unet" / "config.json").write_text(json.dumps(unet_config, indent=2, sort_keys=True) + "\n")
    index = json.loads((copy / "model_index.json").read_text())
    index["_class_name"] = SDXL_INPAINT_PIPELINE
    (copy / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return copy


def _load_single_file(path: Path, config_dir: Path, dtype: str, kind: str | None):
    with tempfile.TemporaryDirectory(prefix="fuseline-convert-") as scratch:
        config = _inpaint_config_dir(config_dir, Path(scratch)) if kind == "inpaint" else config_dir
        return _pipeline_class(kind).from_single_file(
            str(path),
            config=str(config),
            local_files_only=True,
            dtype=torch_dtype_for(dtype),
        )


def _check_loaded(pipe: Any, source: Path, config_dir: Path) -> None:
    """Catch the silent failures of single-file loading: weights left on the meta device (a config that
    does not fit the checkpoint) come out as NaN images much later."""
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is None:
            continue  # a refiner has no text_encoder
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


def export_refiner(pipe: Any, out: Path, shard_size_mb: float) -> None:
    """Write a loaded refiner pipeline as the servable fp16 folder: its weights through the merge's
    byte-deterministic fp16 export (so a text_encoder_2 equal to a template's is byte-identical to it, and
    stored once by DVC and on the volume), its tokenizer and scheduler as they are, and a model_index.json
    without the components the worker takes from the template (VAE) or a refiner lacks."""
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
        for component in REFINER_WEIGHTS:
            export_component(Path(staging) / component, out / component, shard_size_mb)
        for component in REFINER_PLAIN:
            copy_plain_files(Path(staging) / component, out / component)
        index = json.loads((Path(staging) / "model_index.json").read_text())
    for component in REFINER_ABSENT:
        index[component] = [None, None]
    write_json(out / "model_index.json", index)


def convert_checkpoint(
    source: Path,
    out: Path,
    *,
    config_dir: Path | None = None,
    prediction: str = "epsilon",
    sha256: str | None = None,
    allow_pickle: bool = False,
    where: str = "checkpoint",
    base_config: Path = DEFAULT_CONFIG_DIR,
    refiner_config: Path = DEFAULT_REFINER_CONFIG_DIR,
    shard_size_mb: float = 2000,
) -> dict[str, Any]:
    """Write the diffusers folder for `source` (single file or diffusers folder) into `out`: an SDXL base
    or inpainting checkpoint in its source dtype, an SDXL refiner as its fp16 export (`export_refiner`).
    `config_dir`: the catalog's config folder for a single file (absent: `base_config` or `refiner_config`
    by kind).

    Returns a summary (kind, layout, dtype, timings) for the log.
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
        pipe, dtype, kind = _load_diffusers_folder(source, allow_pickle)
        layout = "diffusers"
        used_config = source
    else:
        check_sha256(source, sha256, where)
        file_kind, dtype, v_pred_marker = inspect_single_file(source)
        _refuse_if_not_sdxl(source, file_kind)
        _check_prediction(source, v_pred_marker, prediction, where)
        kind = "refiner" if file_kind.kind == "sdxl-refiner" else file_kind.manifest_kind
        used_config = config_dir or (refiner_config if kind == "refiner" else base_config)
        pipe = _load_single_file(source, used_config, dtype, kind)
        layout = "single-file"
    is_refiner = kind == "refiner"
    _check_loaded(pipe, source, used_config)
    _set_prediction(pipe, prediction)
    loaded = time.perf_counter()
    if is_refiner:
        export_refiner(pipe, out, shard_size_mb)
    else:
        pipe.save_pretrained(out, safe_serialization=True)
    strip_local_paths(out)
    summary = {
        "layout": layout,
        # "sdxl", "inpaint" or "refiner" (a recipe's summary says "recipe").
        "kind": kind or "sdxl",
        "dtype": "float16" if is_refiner else DTYPES[dtype],
        "prediction": prediction,
        "load_s": round(loaded - started, 2),
        "save_s": round(time.perf_counter() - loaded, 2),
    }
    log.info("converted %s (%s, %s) -> %s: %s", source, layout, summary["dtype"], out, summary)
    return summary


def convert_recipe(
    recipe_inputs: dict[str, tuple[Path, Source]],
    checkpoint: RecipeCheckpoint,
    out: Path,
    *,
    where: str,
    config_dir: Path | None = None,
    base_config: Path = DEFAULT_CONFIG_DIR,
) -> dict[str, Any]:
    """Convert each input of a recipe ({role: (local path, its catalog source)}) and write their merge
    into `out`. Inputs must be SDXL base checkpoints."""
    started = time.perf_counter()
    places = {role: f"{where}.recipe.{role}" for role in recipe_inputs}
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.inputs.", dir=out.parent) as staging:
        folders: dict[str, Path] = {}
        for role, (path, source) in recipe_inputs.items():
            if is_refiner_source(path):
                raise StageError(
                    "RECIPE_INPUT_INVALID",
                    f"{places[role]}: {path} is an SDXL refiner; a recipe merges SDXL base checkpoints",
                )
            folders[role] = Path(staging) / role
            summary = convert_checkpoint(
                path,
                folders[role],
                config_dir=config_dir,
                prediction=checkpoint.prediction,
                sha256=source.sha256,
                allow_pickle=source.allow_pickle,
                where=places[role],
                base_config=base_config,
            )
            if summary["kind"] != "sdxl":
                raise StageError(
                    "RECIPE_INPUT_INVALID",
                    f"{places[role]}: {path} is an SDXL {summary['kind']} checkpoint; a recipe merges "
                    "SDXL base checkpoints",
                )
        result = merge_converted(checkpoint.recipe, folders, out, places)
    summary = {
        "kind": "recipe",
        "method": checkpoint.recipe.method,
        "alpha": checkpoint.recipe.alpha,
        "merged_tensors": result.merged_tensors,
        "copied_tensors": result.copied_tensors,
        "seconds": round(time.perf_counter() - started, 2),
    }
    log.info("recipe %s -> %s: %s", where, out, summary)
    return summary


def main(
    checkpoint_id: str,
    *,
    out: Path,
    receipt: Path | None = None,
    sdxl_config: Path = DEFAULT_CONFIG_DIR,
    refiner_config: Path = DEFAULT_REFINER_CONFIG_DIR,
) -> None:
    """The stage: write checkpoint `checkpoint_id` as a diffusers folder at `out`. `receipt`: the
    fetch-checkpoint stage's receipt (absent: the catalog's pins only); `sdxl_config` / `refiner_config`:
    the SDXL base / refiner configs used when the checkpoint names no `config` of its own."""
    settings = BuildSettings.from_env()
    sdxl_config = sdxl_config or DEFAULT_CONFIG_DIR
    refiner_config = refiner_config or DEFAULT_REFINER_CONFIG_DIR
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
    policy = RetryPolicy.from_settings(settings)
    archive = project_archive(catalog, settings)
    config_dir = None
    if checkpoint.config is not None:
        config_dir = config_dir_for(catalog, checkpoint, where, recorded, settings=settings)
    if isinstance(checkpoint, RecipeCheckpoint):
        inputs = {
            role: (
                materialize(
                    catalog,
                    model,
                    f"{where}.recipe.{role}",
                    receipt=recorded,
                    cache_dir=settings.download_cache,
                    policy=policy,
                    archive=archive,
                ),
                model,
            )
            for role, model in checkpoint.recipe.inputs().items()
        }
        with atomic_dir(out) as tmp:
            summary = convert_recipe(
                inputs, checkpoint, tmp, where=where, config_dir=config_dir, base_config=sdxl_config
            )
        record_metrics(**summary)
        return
    source = materialize(
        catalog,
        checkpoint,
        where,
        receipt=recorded,
        cache_dir=settings.download_cache,
        policy=policy,
        archive=archive,
    )
    if parse_source(checkpoint.source).scheme == "file" and source.is_dir() and checkpoint.config is not None:
        log.info("%s: a diffusers folder carries its own configs; %s.config is not used", source, where)
    with atomic_dir(out) as tmp:
        summary = convert_checkpoint(
            source,
            tmp,
            config_dir=config_dir,
            prediction=checkpoint.prediction,
            sha256=checkpoint.sha256,
            allow_pickle=checkpoint.allow_pickle,
            where=where,
            base_config=sdxl_config,
            refiner_config=refiner_config,
            shard_size_mb=_shard_size_mb() if is_refiner_source(source) else 2000,
        )
        if summary["kind"] == "refiner":
            RefinerManifest(
                refiner=checkpoint_id,
                checkpoint=CheckpointRef(
                    id=checkpoint_id, source=checkpoint.source, sha256=checkpoint.sha256
                ),
                prediction_type=checkpoint.prediction,
                spec_hash=catalog.checkpoint_spec_hash(checkpoint_id),
                fuseline_version=__version__,
            ).write(tmp)
    record_metrics(kind=summary["kind"], dtype=summary["dtype"], layout=summary["layout"])


def is_refiner_source(path: Path) -> bool:
    """Whether a checkpoint source is an SDXL refiner (from its header or model_index.json)."""
    if path.is_dir():
        index_path = path / "model_index.json"
        return index_path.is_file() and _is_refiner_folder(json.loads(index_path.read_text()))
    try:
        return classify_keys(list(read_header(path).tensors)).kind == "sdxl-refiner"
    except SafetensorsError:
        return False  # not safetensors: convert_checkpoint says what it is


def _shard_size_mb() -> float:
    """params.yaml merge.shard_size_mb: a refiner is exported as the merge exports templates."""
    try:
        return float(load_params("merge")["shard_size_mb"])
    except (KeyError, TypeError, ValueError) as exc:
        raise StageError(
            "PARAMS_INVALID", f"params.yaml merge.shard_size_mb must be a number ({exc})"
        ) from exc


if __name__ == "__main__":
    run_stage("convert", main, paths=("out",), optional_paths=("receipt", "sdxl_config", "refiner_config"))
