"""MERGE stage: fuse a template's LoRAs into its converted checkpoint and export the fp16 model folder.

`python -m stages.merge <template-id> --base DIR --vae DIR --receipt FILE --out DIR` (dvc.yaml gives the
paths) reads the converted checkpoint (convert stage), the catalog's VAE (vae stage; it replaces the
checkpoint's) and the template's LoRA files, and writes a diffusers SDXL folder in fp16 (variant "fp16")
plus `fuseline.json`.
It streams tensor by tensor: memory holds the LoRA factors and a few tensor-sized buffers, whatever the
shard size (stages/export.py).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from fuseline import __version__
from fuseline.core import block_weights
from fuseline.core.catalog.model import Defaults, RecipeCheckpoint
from fuseline.core.files import atomic_dir
from fuseline.core.manifest import CheckpointRef, LoraRef, ModelManifest, VaeRef
from stages.errors import StageError
from stages.export import copy_plain_files, export_component
from stages.fuse import LoraFactors, WeightUpdate, fuse_weight, scaling
from stages.local_files import materialize, project_archive
from stages.lora import COMPONENTS, LoadedLora, LoraInput, read_lora
from stages.receipts import read_receipt
from stages.runtime import load_params, load_project_catalog, peak_rss_mb, record_metrics, run_stage
from stages.settings import BuildSettings
from stages.shards import write_json
from stages.sources.download import RetryPolicy
from stages.tensor_files import tensor_shapes

log = logging.getLogger("fuseline.stages.merge")

# Components whose weights are exported (LoRAs may target the first three); everything else in the base
# folder (tokenizers, scheduler, model_index.json) is copied, the scheduler with the catalog's prediction.
VAE = "vae"
SCHEDULER = "scheduler"
SCHEDULER_CONFIG = "scheduler_config.json"

PredictionType = Literal["epsilon", "v_prediction"]


@dataclass(frozen=True)
class TemplateIdentity:
    """What the manifest says the folder is, apart from what the merge itself measures."""

    template: str
    checkpoint: CheckpointRef
    vae: VaeRef
    spec_hash: str
    defaults: Defaults | None = None
    refiner: str | None = None


@dataclass(frozen=True)
class MergeResult:
    manifest: ModelManifest
    fused_tensors: dict[str, int]
    files: int


def read_base_layout(base_dir: Path) -> tuple[dict[str, dict[str, tuple[int, ...]]], Any]:
    """(tensor shapes per LoRA-targetable component, UNet config) of a base folder, read from headers."""
    shapes = {component: tensor_shapes(Path(base_dir) / component) for component in COMPONENTS}
    return shapes, _unet_config(Path(base_dir))


class UNetConfig(dict):
    """A UNet's config.json as a dict whose keys also read as attributes, as on a diffusers model's
    `.config` (diffusers' kohya key conversion reads `unet_config.layers_per_block`)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def _unet_config(base_dir: Path) -> UNetConfig:
    # Plain JSON: importing diffusers' UNet class only to read this file cost 9 s of a B1 merge.
    config_path = base_dir / "unet" / "config.json"
    if not config_path.is_file():
        raise StageError("BASE_INVALID", f"{config_path} missing; re-run the convert stage")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise StageError(
            "BASE_INVALID", f"{config_path} is not JSON ({exc}); re-run the convert stage"
        ) from exc
    if not isinstance(config, dict):
        raise StageError("BASE_INVALID", f"{config_path} is not a config object; re-run the convert stage")
    return UNetConfig(config)


class WeightFuser:
    """`fuse_weight` (stages/fuse.py) with fewer passes over memory, for the merge's stream of weights.

    For plain LoRAs each update is accumulated in place into one reused fp32 buffer,
    `W.view(out, -1).addmm_(up, down, alpha=scale * alpha / r)`: one pass over the weight per LoRA instead
    of materialising `up @ down`, scaling it and adding it into fresh full-size tensors (B1: about 3x
    faster per weight, docs/benchmarks.md). The result differs from PEFT's `W + (up @ down) * s` only in fp32
    rounding inside the product, which after the cast to fp16 changes about 3 values in 100,000 by one ulp
    (tests/stages/test_merge_oracle.py allows one ulp). DoRA updates (a norm of each adapter's own delta)
    and LyCORIS updates (no low-rank pair to accumulate) go through `fuse_weight` unchanged.

    The returned tensor is a view of the buffer: it is valid until the next call (the export casts it to
    fp16 before asking for the next weight).
    """

    def __init__(self) -> None:
        self._work = torch.empty(0, dtype=torch.float32)

    def __call__(self, base: Any, updates: Sequence[Any]) -> Any:
        if any(not isinstance(u.factors, LoraFactors) or u.factors.magnitude is not None for u in updates):
            return fuse_weight(base, updates)
        if self._work.numel() < base.numel():
            self._work = torch.empty(base.numel(), dtype=torch.float32)
        work = self._work[: base.numel()].view(base.shape[0], -1)
        work.copy_(base.reshape(base.shape[0], -1))
        for update in updates:
            factors = update.factors
            up = factors.up.flatten(1).to(torch.float32)
            down = factors.down.flatten(1).to(torch.float32)
            work.addmm_(up, down, alpha=scaling(factors, update.scale))
        return work.view(base.shape)


def _check_base(base_dir: Path, vae_dir: Path) -> None:
    if not (base_dir / "model_index.json").is_file():
        raise StageError(
            "BASE_MISSING",
            f"{base_dir} is not a converted checkpoint (no model_index.json); run the convert stage",
        )
    if json.loads((base_dir / "model_index.json").read_text()).get("requires_aesthetics_score"):
        raise StageError(
            "BASE_IS_REFINER",
            f"{base_dir} is an SDXL refiner, not a base checkpoint; name it in the template's `refiner` and "
            "an SDXL base checkpoint in its `checkpoint`",
        )
    for component in COMPONENTS:
        if not (base_dir / component).is_dir():
            raise StageError(
                "BASE_INVALID", f"{base_dir} has no {component}/ folder; re-run the convert stage"
            )
    if not (vae_dir / "config.json").is_file():
        raise StageError("VAE_MISSING", f"{vae_dir} has no config.json; run the vae stage")


def _write_scheduler(source: Path, target: Path, prediction_type: PredictionType) -> None:
    copy_plain_files(source, target)
    config_path = target / SCHEDULER_CONFIG
    if not config_path.is_file():
        raise StageError("BASE_INVALID", f"{source} has no {SCHEDULER_CONFIG}; re-run the convert stage")
    config = json.loads(config_path.read_text())
    # diffusers cannot detect v-prediction from an SDXL single file: the catalog says it.
    config["prediction_type"] = prediction_type
    write_json(config_path, config)


def merge_template(
    base_dir: Path,
    vae_dir: Path,
    loras: Sequence[LoraInput],
    out_dir: Path,
    *,
    identity: TemplateIdentity,
    prediction_type: PredictionType,
    shard_size_mb: float,
) -> MergeResult:
    """Fuse `loras` (in order) into the base folder and write the fp16 export to `out_dir`, atomically:
    on any error `out_dir` is absent afterwards."""
    base_dir, vae_dir, out_dir = Path(base_dir), Path(vae_dir), Path(out_dir)
    _check_base(base_dir, vae_dir)
    shapes, unet_config = read_base_layout(base_dir)

    # Every LoRA is read and placed before anything is written: a bad LoRA fails in seconds.
    loaded: list[LoadedLora] = [read_lora(lora, shapes, unet_config) for lora in loras]
    updates: dict[tuple[str, str], list[WeightUpdate]] = {}
    for lora, spec in zip(loaded, loras, strict=True):
        strength = _module_strengths(spec, unet_config)
        for target, factors in lora.factors.items():
            updates.setdefault(target, []).append(WeightUpdate(factors=factors, scale=strength(*target)))

    fused: dict[str, int] = dict.fromkeys(COMPONENTS, 0)
    fuse = WeightFuser()
    with atomic_dir(out_dir) as tmp:
        for component in COMPONENTS:

            def transform(name: str, tensor: torch.Tensor, component: str = component) -> torch.Tensor:
                pending = updates.get((component, name))
                return tensor if not pending else fuse(tensor, pending)

            result = export_component(base_dir / component, tmp / component, shard_size_mb, transform)
            fused[component] = result.transformed
            log.info(
                "%s: %d tensors (%d fused) -> %s", component, result.tensors, result.transformed, result.files
            )
        export_component(vae_dir, tmp / VAE, shard_size_mb)

        for entry in sorted(base_dir.iterdir()):
            if entry.name in (*COMPONENTS, VAE) or entry.name.startswith("."):
                continue
            if entry.name == SCHEDULER:
                _write_scheduler(entry, tmp / SCHEDULER, prediction_type)
            elif entry.is_dir():
                copy_plain_files(entry, tmp / entry.name)
            else:
                shutil.copyfile(entry, tmp / entry.name)
        if not (tmp / SCHEDULER / SCHEDULER_CONFIG).is_file():
            raise StageError(
                "BASE_INVALID", f"{base_dir} has no {SCHEDULER}/{SCHEDULER_CONFIG}; re-run convert"
            )

        manifest = ModelManifest(
            template=identity.template,
            checkpoint=identity.checkpoint,
            loras=[
                LoraRef(
                    source=spec.name,
                    sha256=lora.sha256,
                    scale=float(spec.scale),
                    placed_keys=lora.placed_keys,
                    block_weights=None if spec.block_weights is None else list(spec.block_weights),
                )
                for lora, spec in zip(loaded, loras, strict=True)
            ],
            vae=identity.vae,
            prediction_type=prediction_type,
            spec_hash=identity.spec_hash,
            defaults=identity.defaults,
            refiner=identity.refiner,
            fuseline_version=__version__,
        )
        # Every placed update names a base tensor, so each must have been fused exactly once; checked
        # before the folder is renamed into place, so a wrong model never appears.
        if sum(fused.values()) != len(updates):
            raise StageError("MERGE_INCOMPLETE", f"fused {fused} tensors, expected {len(updates)}")
        manifest.write(tmp)
        files = sum(1 for p in tmp.rglob("*") if p.is_file())
    return MergeResult(manifest=manifest, fused_tensors=fused, files=files)


def _module_strengths(spec: LoraInput, unet_config: Any) -> Callable[[str, str], float]:
    """(component, base tensor) -> the LoRA's strength there: its scale, times its block weight."""
    scale = float(spec.scale)
    if spec.block_weights is None:
        return lambda component, tensor: scale
    layers_per_block = unet_config.get("layers_per_block")
    if not isinstance(layers_per_block, int) or len(unet_config.get("down_block_types", ())) != 3:
        raise StageError(
            "BLOCK_WEIGHTS_UNSUPPORTED",
            f"LoRA {spec.name}: block weights follow the SDXL UNet's blocks (3 down blocks, one "
            f"layers_per_block); this base has down_block_types {unet_config.get('down_block_types')} and "
            f"layers_per_block {layers_per_block!r}; remove block_weights from this LoRA",
        )
    weights = block_weights.weights_by_block(spec.block_weights)
    return lambda component, tensor: (
        scale * block_weights.module_weight(weights, component, tensor, layers_per_block)
    )


def _lora_inputs(
    catalog: Any, template_id: str, receipt: Path | None, settings: BuildSettings
) -> list[LoraInput]:
    """The template's LoRAs as local files: `file:` in place, others from the download cache by the
    sha256 of the catalog pin or of the fetch-loras receipt (fetched again on a cache miss)."""
    group = f"templates.{template_id}"
    recorded = read_receipt(receipt, group)
    inputs = []
    for index, lora in enumerate(catalog.templates[template_id].loras):
        where = f"{group}.loras[{index}]"
        path = materialize(
            catalog,
            lora,
            where,
            receipt=recorded,
            cache_dir=settings.download_cache,
            policy=RetryPolicy.from_settings(settings),
            archive=project_archive(catalog, settings),
        )
        inputs.append(
            LoraInput(
                path=path,
                scale=lora.scale,
                name=lora.source,
                sha256=lora.sha256,
                block_weights=lora.resolved_block_weights,
            )
        )
    return inputs


def main(template_id: str, *, base: Path, vae: Path, out: Path, receipt: Path | None = None) -> None:
    """The stage: `base` the converted checkpoint folder, `vae` the converted VAE folder, `out` the model
    folder to write, `receipt` the template's fetch-loras receipt (absent: the catalog's pins only)."""
    settings = BuildSettings.from_env()
    catalog = load_project_catalog()
    if template_id not in catalog.templates:
        raise StageError(
            "TEMPLATE_UNKNOWN",
            f"no template {template_id!r} in the catalog; templates: {', '.join(sorted(catalog.templates))}",
        )
    params = load_params("merge")
    try:
        shard_size_mb = float(params["shard_size_mb"])
    except (KeyError, TypeError, ValueError) as exc:
        raise StageError(
            "PARAMS_INVALID", f"params.yaml merge.shard_size_mb must be a number ({exc})"
        ) from exc
    template = catalog.templates[template_id]
    checkpoint = catalog.checkpoints[template.checkpoint]
    if isinstance(checkpoint, RecipeCheckpoint):
        reference = CheckpointRef(
            id=template.checkpoint,
            source=checkpoint.recipe.identity,
            recipe=checkpoint.recipe.model_dump(mode="json"),
        )
    else:
        reference = CheckpointRef(id=template.checkpoint, source=checkpoint.source, sha256=checkpoint.sha256)
    identity = TemplateIdentity(
        template=template_id,
        checkpoint=reference,
        vae=VaeRef(source=catalog.vae.source, sha256=catalog.vae.sha256),
        spec_hash=catalog.spec_hash(template_id),
        defaults=template.defaults,
        refiner=template.refiner,
    )
    loras = _lora_inputs(catalog, template_id, receipt, settings)
    result = merge_template(
        base,
        vae,
        loras,
        out,
        identity=identity,
        prediction_type=checkpoint.prediction,
        shard_size_mb=shard_size_mb,
    )
    log.info(
        "merge %s: %d LoRAs, fused tensors %s, %d files, peak RSS %.0f MiB",
        template_id,
        len(result.manifest.loras),
        result.fused_tensors,
        result.files,
        peak_rss_mb(),
    )
    # Build metrics (artifacts/stats/merge/<id>.json, docs/operations.md): keys placed per component and
    # per LoRA as the merge counted them (every key of each file: the merge refuses a file with a key it
    # cannot place). DVC drops lists from metrics: LoRAs are keyed by fusing order.
    per_lora = {
        str(index): {
            "source": ref.source,
            "scale": ref.scale,
            "file_keys": sum(ref.placed_keys.values()),
            "placed_keys": ref.placed_keys,
        }
        for index, ref in enumerate(result.manifest.loras)
    }
    placed = {c: sum(e["placed_keys"].get(c, 0) for e in per_lora.values()) for c in COMPONENTS}
    record_metrics(
        checkpoint=template.checkpoint,
        model_bytes=sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
        model_files=result.files,
        lora_count=len(per_lora),
        loras=per_lora,
        placed_keys={**placed, "total": sum(placed.values())},
        fused_tensors=result.fused_tensors,
    )


if __name__ == "__main__":
    run_stage("merge", main, paths=("base", "vae", "out"), optional_paths=("receipt",))
