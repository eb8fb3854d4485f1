"""VAE: write the catalog's VAE (typically the SDXL fp16-fix VAE) as a diffusers folder at artifacts/vae/.

One stage for all templates: the VAE is shared, so every export reads the same converted copy. The source is
a diffusers VAE folder (config.json + weights) or a single-file VAE (.safetensors, LDM key layout), which is
converted offline with SDXL base's VAE config. Weights keep the source dtype.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from stages.checkpoint_kind import (
    CheckpointFormatError,
    classify_keys,
    dominant_dtype,
    read_safetensors_header,
)
from stages.convert import DEFAULT_CONFIG_DIR, DTYPES, strip_local_paths, torch_dtype_for
from stages.fetch import read_receipt
from stages.local_files import check_pickle_allowed, check_sha256, materialize
from stages.runtime import StageError, atomic_output_dir, load_project_catalog, run_stage

log = logging.getLogger("fuseline.stages.vae")

VAE_DIR = Path("artifacts/vae")
STAGE_ID = "vae"


def _weights_dtype(weights: Path) -> str:
    try:
        tensors, _ = read_safetensors_header(weights)
    except CheckpointFormatError as exc:
        raise StageError("VAE_CORRUPT", str(exc)) from None
    return dominant_dtype(tensors)


def _load_folder(folder: Path, where: str):
    from diffusers import AutoencoderKL

    config = json.loads((folder / "config.json").read_text())
    if config.get("_class_name") != "AutoencoderKL":
        raise StageError(
            "VAE_FORMAT",
            f"{where}: {folder}/config.json is a {config.get('_class_name')}, not an AutoencoderKL",
        )
    plain = folder / "diffusion_pytorch_model.safetensors"
    variant = None if plain.is_file() else "fp16"
    weights = plain if variant is None else folder / "diffusion_pytorch_model.fp16.safetensors"
    if not weights.is_file():
        raise StageError(
            "VAE_FORMAT", f"{where}: {folder} has config.json but no diffusion_pytorch_model.safetensors"
        )
    dtype = _weights_dtype(weights)
    vae = AutoencoderKL.from_pretrained(
        folder,
        dtype=torch_dtype_for(dtype),
        variant=variant,
        use_safetensors=True,
        local_files_only=True,
    )
    return vae, dtype


def _load_single_file(path: Path, config_dir: Path, config_subfolder: str | None, where: str):
    from diffusers import AutoencoderKL

    try:
        tensors, _ = read_safetensors_header(path)
    except CheckpointFormatError as exc:
        raise StageError("VAE_CORRUPT", str(exc)) from None
    kind = classify_keys(list(tensors))
    if kind.kind != "vae":
        raise StageError("VAE_FORMAT", f"{where}: {path} is {kind.name}, not a single-file VAE")
    dtype = dominant_dtype(tensors)
    vae = AutoencoderKL.from_single_file(
        str(path),
        config=str(config_dir),
        subfolder=config_subfolder,
        local_files_only=True,
        dtype=torch_dtype_for(dtype),
    )
    return vae, dtype


def convert_vae(
    source: Path,
    out: Path,
    *,
    config_dir: Path = DEFAULT_CONFIG_DIR,
    config_subfolder: str | None = "vae",
    sha256: str | None = None,
    allow_pickle: bool = False,
    where: str = "vae",
) -> str:
    """Write config.json + diffusion_pytorch_model.safetensors for `source` into `out`; return the dtype."""
    check_pickle_allowed(source, allow_pickle, where)
    if source.is_dir():
        if not (source / "config.json").is_file():
            raise StageError(
                "VAE_FORMAT", f"{where}: {source} is a folder without config.json (not a diffusers VAE)"
            )
        check_sha256(source, sha256, where)
        vae, dtype = _load_folder(source, where)
    elif source.suffix.lower() == ".safetensors":
        check_sha256(source, sha256, where)
        vae, dtype = _load_single_file(source, config_dir, config_subfolder, where)
    else:
        raise StageError(
            "VAE_FORMAT", f"{where}: {source}: expected a diffusers VAE folder or a .safetensors file"
        )
    for name, param in vae.named_parameters():
        if param.device.type == "meta":
            raise StageError(
                "CONFIG_MISMATCH", f"{where}: {source}: {name} was not filled; the VAE config does not fit"
            )
    vae.save_pretrained(out, safe_serialization=True)
    strip_local_paths(out)
    log.info("VAE %s (%s) -> %s", source, DTYPES[dtype], out)
    return DTYPES[dtype]


def main(_stage_id: str = STAGE_ID) -> None:
    catalog = load_project_catalog()
    if catalog.vae is None:
        raise StageError(
            "VAE_MISSING",
            'templates.json has no "vae" entry; the pipeline exports every template with one shared VAE: add '
            '"vae": {"source": ...} (the SDXL fp16-fix VAE keeps fp16 decoding free of NaNs)',
        )
    source = materialize(catalog, catalog.vae, "vae", receipt=read_receipt("vae"))
    with atomic_output_dir(VAE_DIR) as out:
        convert_vae(source, out, sha256=catalog.vae.sha256, allow_pickle=catalog.vae.allow_pickle)


if __name__ == "__main__":
    # `python -m stages.vae`: one VAE for the whole catalog, so the id is fixed.
    run_stage(STAGE_ID, main, sys.argv[1:] or [STAGE_ID])
