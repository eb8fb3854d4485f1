"""VAE: write the catalog's VAE (typically the SDXL fp16-fix VAE) as a diffusers folder (`--out`).

One stage for all templates: the VAE is shared, so every export reads the same converted copy. The source is
a diffusers VAE folder (config.json + weights) or a single-file VAE (.safetensors, LDM key layout), which is
converted offline with SDXL base's VAE config. Weights keep the source dtype.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fuseline.core.files import atomic_dir
from fuseline.core.safetensors_io import SafetensorsError, read_header
from stages.checkpoint_kind import classify_keys, dominant_dtype
from stages.convert import DEFAULT_CONFIG_DIR, DTYPES, strip_local_paths, torch_dtype_for
from stages.errors import StageError
from stages.local_files import check_pickle_allowed, check_sha256, materialize, project_archive
from stages.receipts import read_receipt
from stages.runtime import load_project_catalog, run_stage
from stages.settings import BuildSettings
from stages.sources.download import RetryPolicy

log = logging.getLogger("fuseline.stages.vae")

STAGE_ID = "vae"


def _weights_dtype(weights: Path) -> str:
    try:
        tensors = read_header(weights).tensors
    except SafetensorsError as exc:
        raise StageError("VAE_CORRUPT", exc.message) from None
    dtype = dominant_dtype(tensors)
    if dtype is None:
        raise StageError("VAE_CORRUPT", f"{weights}: no floating-point tensors")
    return dtype


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

    dtype = _weights_dtype(path)
    kind = classify_keys(list(read_header(path).tensors))
    if kind.kind != "vae":
        raise StageError("VAE_FORMAT", f"{where}: {path} is {kind.name}, not a single-file VAE")
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


def main(
    _stage_id: str = STAGE_ID,
    *,
    out: Path,
    receipt: Path | None = None,
    sdxl_config: Path = DEFAULT_CONFIG_DIR,
) -> None:
    """The stage: write the catalog's VAE as a diffusers folder at `out`. `receipt`: the fetch-vae stage's
    receipt (absent: the catalog's pin only); `sdxl_config`: SDXL base's configs (a single-file VAE is
    converted with its `vae/` config)."""
    settings = BuildSettings.from_env()
    catalog = load_project_catalog()
    if catalog.vae is None:
        raise StageError(
            "VAE_MISSING",
            'templates.json has no "vae" entry; the pipeline exports every template with one shared VAE: add '
            '"vae": {"source": ...} (the SDXL fp16-fix VAE keeps fp16 decoding free of NaNs)',
        )
    source = materialize(
        catalog,
        catalog.vae,
        "vae",
        receipt=read_receipt(receipt, "vae"),
        cache_dir=settings.download_cache,
        policy=RetryPolicy.from_settings(settings),
        archive=project_archive(catalog, settings),
    )
    with atomic_dir(out) as tmp:
        convert_vae(
            source,
            tmp,
            config_dir=sdxl_config,
            sha256=catalog.vae.sha256,
            allow_pickle=catalog.vae.allow_pickle,
        )


if __name__ == "__main__":
    # `python -m stages.vae --out DIR ...`: one VAE for the whole catalog, so the id is fixed.
    run_stage(STAGE_ID, main, paths=("out",), optional_paths=("receipt", "sdxl_config"), fixed_id=STAGE_ID)
