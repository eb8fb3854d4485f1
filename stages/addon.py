"""ADDON stage: fetch an add-on LoRA, prove it places on the base of every template it is offered with, and
write the folder publishing pushes and the worker syncs (`lora.safetensors` + `addon.json`).

`python -m stages.addon <name> --bases DIR --out DIR` (dvc.yaml gives the paths: `--bases` the convert
stage's folders, `artifacts/base/<checkpoint id>/`). The placement check is the merge's own LoRA reader
(stages/lora.py): every key of the file must land on a tensor of the right shape, or the stage fails naming
the keys (a LoRA for SD 1.5 or another family cannot pass). The worker applies add-ons with diffusers'
adapters, which load kohya and PEFT LoRAs, LoCon and PEFT DoRA but not the LyCORIS formats (LoHa, LoKr,
Tucker LoCon) nor kohya-format DoRA (diffusers drops `dora_scale`): those are refused here by name; fuse
them into a template instead, where the merge handles them.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from fuseline import __version__
from fuseline.core.files import atomic_dir
from fuseline.core.manifest import ADDON_LORA_NAME, AddonManifest
from fuseline.core.safetensors_io import SafetensorsError, read_header
from stages.errors import StageError
from stages.local_files import materialize, project_archive
from stages.lora import LYCORIS_MARKERS, LoadedLora, LoraInput, read_lora
from stages.merge import read_base_layout
from stages.runtime import load_project_catalog, peak_rss_mb, record_metrics, run_stage
from stages.settings import BuildSettings
from stages.sources.download import RetryPolicy

log = logging.getLogger("fuseline.stages.addon")


def runtime_format_problem(path: Path, name: str) -> str | None:
    """Why diffusers' adapters cannot apply this file at run time as the merge would fuse it, or None."""
    try:
        keys = sorted(read_header(path).tensors)
    except SafetensorsError:
        return None  # read_lora names the file's own problem
    for key in keys:
        suffix = key.partition(".")[2]
        kind = next((kind for marker, kind in LYCORIS_MARKERS.items() if suffix.startswith(marker)), None)
        if kind is not None:
            what = "kohya-format DoRA (dora_scale)" if suffix.startswith("dora_scale") else f"LyCORIS {kind}"
            return (
                f"add-on {name}: {path} is {what} (key {key}), which diffusers' adapters cannot apply at run "
                "time as the merge fuses it; fuse it into a template's loras instead, or use a LoRA/LoCon "
                "release of it"
            )
    return None


def check_addon(name: str, lora: LoraInput, bases: dict[str, Path]) -> LoadedLora:
    """Place the add-on on each base (checkpoint id -> converted folder); the placement on the first."""
    problem = runtime_format_problem(Path(lora.path), name)
    if problem is not None:
        raise StageError("ADDON_FORMAT", problem)
    placed: LoadedLora | None = None
    for checkpoint, base in bases.items():
        if not (base / "model_index.json").is_file():
            raise StageError(
                "BASE_MISSING",
                f"add-on {name}: {base} is not a converted checkpoint; run `dvc repro convert@{checkpoint}`",
            )
        shapes, unet_config = read_base_layout(base)
        loaded = read_lora(lora, shapes, unet_config)
        log.info("add-on %s: %s keys placed on %s", name, loaded.placed_keys, checkpoint)
        placed = placed or loaded
    assert placed is not None
    return placed


def write_addon(
    name: str, lora: LoraInput, manifest_fields: dict, bases: dict[str, Path], out: Path
) -> AddonManifest:
    """Check the add-on on `bases` and write `out` (lora.safetensors + addon.json) atomically."""
    loaded = check_addon(name, lora, bases)
    manifest = AddonManifest(
        name=name,
        source=lora.name,
        sha256=loaded.sha256,
        placed_keys={k: v for k, v in loaded.placed_keys.items() if v},
        checked_on=sorted(bases),
        fuseline_version=__version__,
        **manifest_fields,
    )
    with atomic_dir(out) as tmp:
        shutil.copyfile(lora.path, tmp / ADDON_LORA_NAME)
        manifest.write(tmp)
    return manifest


def main(name: str, *, bases: Path, out: Path) -> None:
    """The stage: `bases` the folder of converted checkpoints, `out` the add-on folder to write."""
    settings = BuildSettings.from_env()
    catalog = load_project_catalog()
    if name not in catalog.addons:
        known = ", ".join(sorted(catalog.addons)) or "(none)"
        raise StageError("ADDON_UNKNOWN", f"no add-on {name!r} in the catalog; add-ons: {known}")
    spec = catalog.addons[name]
    templates = catalog.addon_templates(name)
    checkpoints = sorted({catalog.templates[t].checkpoint for t in templates})
    path = materialize(
        catalog,
        spec,
        f"addons.{name}",
        cache_dir=settings.download_cache,
        policy=RetryPolicy.from_settings(settings),
        archive=project_archive(catalog, settings),
    )
    lora = LoraInput(path=path, scale=spec.default_scale, name=spec.source, sha256=spec.sha256)
    manifest = write_addon(
        name,
        lora,
        {
            "default_scale": spec.default_scale,
            "min_scale": spec.min_scale,
            "max_scale": spec.max_scale,
            "templates": spec.templates,
        },
        {checkpoint: Path(bases) / checkpoint for checkpoint in checkpoints},
        Path(out),
    )
    log.info("add-on %s: checked on %s, peak RSS %.0f MiB", name, ", ".join(checkpoints), peak_rss_mb())
    record_metrics(
        source=spec.source,
        file_keys=sum(manifest.placed_keys.values()),
        placed_keys=manifest.placed_keys,
        checked_on=manifest.checked_on,
        offered_to=templates,
    )


if __name__ == "__main__":
    run_stage("addon", main, paths=("bases", "out"))
