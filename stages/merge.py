"""MERGE stage: fuse a template's LoRAs into its converted checkpoint and export the fp16 model folder.

`python -m stages.merge <template-id> --base DIR --vae DIR --receipt FILE --out DIR` (dvc.yaml gives the
paths) reads the converted checkpoint (convert stage), the catalog's VAE (vae stage; it replaces the
checkpoint's) and the template's LoRA files, and writes a diffusers SDXL folder in fp16 (variant "fp16")
plus `fuseline.json`; the template's textual-inversion embeddings are checked against the base's text
encoders and copied into `embeddings/` (the worker loads them with the pipeline).
It streams tensor by tensor: memory holds the LoRA factors and a few tensor-sized buffers, whatever the
shard size (stages/export.py).
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from fuseline import __version__
from fuseline.core import block_weights
from fuseline.core.catalog.model import Defaults, RecipeCheckpoint
from fuseline.core.files import atomic_dir
from fuseline.core.manifest import EMBEDDINGS_DIR, CheckpointRef, EmbeddingRef, LoraRef, ModelManifest, VaeRef
from fuseline.core.serving import CHECKPOINT_KIND_BY_IN_CHANNELS, INPAINT_UNET_IN_CHANNELS, UNET_IN_CHANNELS
from stages.embeddings import (
    EmbeddingInput,
    LoadedEmbedding,
    check_tokens_free,
    read_embedding,
    text_encoder_widths,
)
from stages.errors import StageError
from stages.export import Destination, copy_plain_files, export_component, fuse_threads, intra_op_threads
from stages.fuse import LoraFactors, WeightUpdate, fuse_weight, stacked_lora
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
    """`fuse_weight` (stages/fuse.py) with fewer passes over memory and every core, for the merge's stream of
    weights.

    The plain LoRA updates of a weight become one low-rank product (`stacked_lora`: rank 64 for two rank-32
    LoRAs) accumulated in place into one reused fp32 buffer, `W.view(out, -1).addmm_(up, down)`, which is
    then cast into the export's own fp16 destination: one pass over the weight in all instead of
    materialising `up @ down`, scaling it and adding it into fresh full-size tensors per LoRA (B1, about 3x
    faster per weight; docs/benchmarks.md). The result differs from PEFT's `W + (up @ down) * s` only in
    fp32 rounding inside the product, which after the cast to fp16 changes about 3 values in 100,000 by one
    ulp (tests/stages/test_merge_oracle.py allows one ulp). DoRA updates (a norm of each adapter's own
    delta) and LyCORIS updates (no low-rank pair to accumulate) go through `fuse_weight` unchanged.

    With `threads` > 1 the rows of a large weight are split between that many threads (torch releases the
    GIL inside each op): on a machine where the export runs torch ops on one thread (stages/export.py), the
    product, the larger half of the merge's arithmetic, then uses the other cores while the reader and
    writer threads wait on the kernel. Threads, not torch's OpenMP pool: OpenMP workers spin at every op's
    barrier when the I/O threads hold a core (measured: 3.5x the CPU time, docs/benchmarks.md).

    The returned tensor is the destination, or for DoRA/LyCORIS a view of a reused buffer: valid until the
    next call (the export writes or casts it before asking for the next weight).
    """

    # Below this many elements a weight is fused on one thread: splitting costs more than it saves.
    SPLIT_MIN_ELEMENTS = 1 << 20

    def __init__(self, threads: int = 1) -> None:
        self._work = torch.empty(0, dtype=torch.float32)
        self._threads = max(1, threads)
        self._pool = ThreadPoolExecutor(self._threads - 1, "fuseline-fuse") if self._threads > 1 else None

    def __enter__(self) -> WeightFuser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __call__(self, base: Any, updates: Sequence[Any], destination: Destination | None = None) -> Any:
        if any(not isinstance(u.factors, LoraFactors) or u.factors.magnitude is not None for u in updates):
            return fuse_weight(base, updates)
        up, down = stacked_lora(updates)
        rows = base.shape[0]
        if self._work.numel() < base.numel():
            self._work = torch.empty(base.numel(), dtype=torch.float32)
        work = self._work[: base.numel()].view(rows, -1)
        flat_base = base.reshape(rows, -1)
        out = None if destination is None else destination().view(rows, -1)

        def fuse_rows(start: int, end: int) -> None:
            block = work[start:end]
            block.copy_(flat_base[start:end])
            block.addmm_(up[start:end], down)
            if out is not None:
                out[start:end].copy_(block)

        parts = self._threads if self._pool is not None and base.numel() >= self.SPLIT_MIN_ELEMENTS else 1
        spans = list(itertools.pairwise(rows * i // parts for i in range(parts + 1)))
        pending = [self._pool.submit(fuse_rows, *span) for span in spans[1:]] if self._pool else []
        try:
            fuse_rows(*spans[0])
        finally:
            for future in pending:
                future.result()
        return work.view(base.shape) if out is None else out.view(base.shape)


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
    threads: int | None = None,
    embeddings: Sequence[EmbeddingInput] = (),
) -> MergeResult:
    """Fuse `loras` (in order) into the base folder and write the fp16 export to `out_dir`, atomically:
    on any error `out_dir` is absent afterwards. `threads`: how many threads fuse a weight (default
    `stages.export.fuse_threads()`). `embeddings` are checked and copied into it."""
    base_dir, vae_dir, out_dir = Path(base_dir), Path(vae_dir), Path(out_dir)
    _check_base(base_dir, vae_dir)
    shapes, unet_config = read_base_layout(base_dir)
    checkpoint_kind = _checkpoint_kind(base_dir, unet_config)
    if checkpoint_kind == "inpaint" and identity.refiner is not None:
        # The refiner finishes text-to-image jobs only, and an inpainting checkpoint serves inpaint jobs only.
        raise StageError(
            "REFINER_INVALID",
            f"template {identity.template!r} is on an inpainting checkpoint ({base_dir}), which serves "
            f"inpaint jobs only, and names refiner {identity.refiner!r}, which only text-to-image jobs use; "
            "remove `refiner` (and defaults.refiner) from the template",
        )
    # Embeddings are checked before anything is written, as the LoRAs are below: a bad one fails in seconds.
    widths = text_encoder_widths(shapes) if embeddings else {}
    checked: list[LoadedEmbedding] = [read_embedding(embedding, widths) for embedding in embeddings]
    check_tokens_free(base_dir, checked)
    fused: dict[str, int] = dict.fromkeys(COMPONENTS, 0)
    # One intra-op setting for the whole merge: the exports below run partly at once, and each sets and
    # restores torch's thread count, which is global.
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(intra_op_threads(torch_threads))
    try:
        with (
            atomic_dir(out_dir) as tmp,
            WeightFuser(fuse_threads() if threads is None else threads) as fuse,
            ThreadPoolExecutor(2, "fuseline-merge-early") as early,
        ):
            # What no LoRA touches is written while the LoRAs are read and placed, and diffusers (which
            # converts kohya key names: seconds of imports) is imported while the LoRA files are hashed
            # and read. On a 2-core build machine that start-up was a quarter of the merge with one core
            # idle (B1, docs/benchmarks.md). Errors surface through the futures.
            untouched = early.submit(_write_untouched, base_dir, vae_dir, tmp, shard_size_mb, prediction_type)
            importing = early.submit(_import_key_conversion)
            # Every LoRA is read and placed before any fused weight is written: a bad LoRA fails in seconds.
            loaded: list[LoadedLora] = [read_lora(lora, shapes, unet_config) for lora in loras]
            importing.result()
            updates: dict[tuple[str, str], list[WeightUpdate]] = {}
            for lora, spec in zip(loaded, loras, strict=True):
                strength = _module_strengths(spec, unet_config)
                for target, factors in lora.factors.items():
                    updates.setdefault(target, []).append(
                        WeightUpdate(factors=factors, scale=strength(*target))
                    )

            for component in COMPONENTS:

                def transform(
                    name: str, tensor: torch.Tensor, destination: Destination, component: str = component
                ) -> torch.Tensor:
                    pending = updates.get((component, name))
                    return tensor if not pending else fuse(tensor, pending, destination)

                result = export_component(base_dir / component, tmp / component, shard_size_mb, transform)
                fused[component] = result.transformed
                log.info(
                    "%s: %d tensors (%d fused) -> %s",
                    component,
                    result.tensors,
                    result.transformed,
                    result.files,
                )
            untouched.result()
            embedding_refs = _copy_embeddings(checked, tmp)
            manifest = _manifest(identity, loaded, loras, prediction_type, checkpoint_kind, embedding_refs)
            # Every placed update names a base tensor, so each must have been fused exactly once; checked
            # before the folder is renamed into place, so a wrong model never appears.
            if sum(fused.values()) != len(updates):
                raise StageError("MERGE_INCOMPLETE", f"fused {fused} tensors, expected {len(updates)}")
            manifest.write(tmp)
            files = sum(1 for p in tmp.rglob("*") if p.is_file())
    finally:
        torch.set_num_threads(torch_threads)
    return MergeResult(manifest=manifest, fused_tensors=fused, files=files)


def _import_key_conversion() -> None:
    """Import what `read_lora` needs from diffusers (on a thread of its own, beside the LoRA reads)."""
    import diffusers.loaders  # noqa: F401


def _write_untouched(
    base_dir: Path, vae_dir: Path, tmp: Path, shard_size_mb: float, prediction_type: PredictionType
) -> None:
    """The parts of the export no LoRA changes: the catalog's VAE, the scheduler (with the catalog's
    prediction type), tokenizers, model_index.json."""
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
        raise StageError("BASE_INVALID", f"{base_dir} has no {SCHEDULER}/{SCHEDULER_CONFIG}; re-run convert")


def _manifest(
    identity: TemplateIdentity,
    loaded: Sequence[LoadedLora],
    loras: Sequence[LoraInput],
    prediction_type: PredictionType,
    checkpoint_kind: str | None,
    embeddings: Sequence[EmbeddingRef],
) -> ModelManifest:
    return ModelManifest(
        template=identity.template,
        checkpoint=identity.checkpoint.model_copy(update={"kind": checkpoint_kind}),
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
        embeddings=list(embeddings) or None,
        refiner=identity.refiner,
        fuseline_version=__version__,
    )


def _checkpoint_kind(base_dir: Path, unet_config: Any) -> str | None:
    """What fuseline.json records as `checkpoint.kind`: "inpaint" for a 9-channel UNet (the convert stage
    wrote an inpainting pipeline), None for an ordinary one."""
    channels = unet_config.get("in_channels", UNET_IN_CHANNELS)
    if channels not in CHECKPOINT_KIND_BY_IN_CHANNELS:
        raise StageError(
            "BASE_INVALID",
            f"{base_dir / 'unet' / 'config.json'}: in_channels {channels!r}; a converted SDXL checkpoint has "
            f"{UNET_IN_CHANNELS} (text-to-image) or {INPAINT_UNET_IN_CHANNELS} (inpainting); re-run the "
            "convert stage",
        )
    return CHECKPOINT_KIND_BY_IN_CHANNELS[channels]


def _copy_embeddings(embeddings: Sequence[LoadedEmbedding], folder: Path) -> list[EmbeddingRef]:
    """Each embedding file, byte for byte, as `embeddings/<token>.safetensors` in the export."""
    refs = []
    for embedding in embeddings:
        relative = f"{EMBEDDINGS_DIR}/{embedding.token}.safetensors"
        (folder / EMBEDDINGS_DIR).mkdir(exist_ok=True)
        shutil.copyfile(embedding.path, folder / relative)
        refs.append(
            EmbeddingRef(
                token=embedding.token,
                source=embedding.name,
                sha256=embedding.sha256,
                vectors=embedding.vectors,
                file=relative,
            )
        )
    return refs


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


def _embedding_inputs(
    catalog: Any, template_id: str, receipt: Path | None, settings: BuildSettings
) -> list[EmbeddingInput]:
    """The template's embeddings as local files, found as its LoRAs are (_lora_inputs)."""
    group = f"templates.{template_id}"
    recorded = read_receipt(receipt, group)
    inputs = []
    for index, embedding in enumerate(catalog.templates[template_id].embeddings or ()):
        path = materialize(
            catalog,
            embedding,
            f"{group}.embeddings[{index}]",
            receipt=recorded,
            cache_dir=settings.download_cache,
            policy=RetryPolicy.from_settings(settings),
        )
        inputs.append(
            EmbeddingInput(path=path, token=embedding.token, name=embedding.source, sha256=embedding.sha256)
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
        embeddings=_embedding_inputs(catalog, template_id, receipt, settings),
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
