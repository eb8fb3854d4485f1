"""VERIFY: load an exported template the way the worker does, generate one small image, and fail on a bad one.

Writes preview.png (a DVC plot) and metrics.json (DVC metrics: load and step time, pixel statistics) into
`--out`, so `dvc metrics show` and `dvc plots show` compare templates and builds. The checks catch what a
merge gets wrong without an error: NaN/Inf weights (NaN pixels), a collapsed model (a black or constant
image) and a manifest that does not match the catalog, the exported scheduler or the UNet. An inpainting
checkpoint's template (a 9-channel UNet, `checkpoint.kind: "inpaint"` in fuseline.json) is verified as the
worker serves it: an inpaint generation of a grey picture's centre.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fuseline.core.files import atomic_dir
from fuseline.core.manifest import ManifestError, ModelManifest
from fuseline.core.serving import CHECKPOINT_KIND_BY_IN_CHANNELS, UNET_IN_CHANNELS
from stages.errors import StageError
from stages.runtime import load_params, load_project_catalog, record_metrics, run_stage

log = logging.getLogger("fuseline.stages.verify")

DEFAULT_PROMPT = "a photo of a red fox in a snowy forest, detailed, sharp focus"
# A pixel counts as black when every channel is below this (on 0..1).
BLACK_LEVEL = 0.02


@dataclass(frozen=True)
class VerifySettings:
    """params.yaml `verify:` section. Tiny test models use 64 px; real SDXL wants 256 px or more (below
    that the UNet is far outside its training sizes and even a good model gives mush)."""

    steps: int = 4
    width: int = 64
    height: int = 64
    seed: int = 0
    prompt: str = DEFAULT_PROMPT
    max_black_fraction: float = 0.95
    min_std: float = 0.004

    @classmethod
    def from_params(cls, section: dict[str, Any]) -> VerifySettings:
        unknown = set(section) - set(cls.__dataclass_fields__)
        if unknown:
            raise StageError(
                "PARAMS_INVALID",
                f"params.yaml verify: unknown key(s) {sorted(unknown)};"
                f" known: {sorted(cls.__dataclass_fields__)}",
            )
        settings = cls(**section)
        for name in ("width", "height"):
            value = getattr(settings, name)
            if not isinstance(value, int) or value < 8 or value % 8:
                raise StageError(
                    "PARAMS_INVALID", f"params.yaml verify.{name}: {value!r}; use a multiple of 8"
                )
        if not isinstance(settings.steps, int) or settings.steps < 1:
            raise StageError("PARAMS_INVALID", f"params.yaml verify.steps: {settings.steps!r}; use 1 or more")
        return settings


def device_and_dtype():
    """fp16 on a GPU, as the worker serves; fp32 on CPU, where half-precision kernels are missing or
    very slow. Loading the fp16 files with torch_dtype=float32 upcasts exactly, so the weights checked are
    the exported ones; fp16 overflow in activations is then only caught on GPU (and by the worker's retry)."""
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.float16
    return "cpu", torch.float32


def load_model(model_dir: Path):
    """The exported folder loaded as the worker loads it: variant fp16, local files only; an inpainting
    pipeline for a 9-channel UNet."""
    from diffusers import StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline

    device, dtype = device_and_dtype()
    pipeline_class = StableDiffusionXLInpaintPipeline if _unet_kind(model_dir) else StableDiffusionXLPipeline
    pipe = pipeline_class.from_pretrained(
        model_dir, variant="fp16", dtype=dtype, use_safetensors=True, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _unet_kind(model_dir: Path) -> str | None:
    """The checkpoint kind the exported UNet's input channels say ("inpaint" for 9, None for 4)."""
    config_path = model_dir / "unet" / "config.json"
    try:
        channels = json.loads(config_path.read_text()).get("in_channels", UNET_IN_CHANNELS)
    except (OSError, ValueError, AttributeError) as exc:
        raise StageError(
            "MODEL_MISSING", f"{config_path}: unreadable UNet config ({exc}); re-run the merge"
        ) from None
    if channels not in CHECKPOINT_KIND_BY_IN_CHANNELS:
        raise StageError(
            "MODEL_MISSING",
            f"{config_path}: in_channels {channels!r} is not an SDXL UNet's; re-run the merge",
        )
    return CHECKPOINT_KIND_BY_IN_CHANNELS[channels]


def image_metrics(image) -> dict[str, float]:
    """Statistics of an H x W x 3 float image on 0..1 (NaN-safe)."""
    import numpy as np

    pixels = np.asarray(image, dtype=np.float64)
    finite = np.isfinite(pixels)
    nan_count = int(pixels.size - finite.sum())
    values = pixels[finite] if nan_count else pixels
    if values.size == 0:
        return {"nan_count": nan_count, "mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan,
                "black_fraction": math.nan}  # fmt: skip
    black = (np.nan_to_num(pixels, nan=1.0) < BLACK_LEVEL).all(axis=-1)
    return {
        "nan_count": nan_count,
        "mean": round(float(values.mean()), 6),
        "std": round(float(values.std()), 6),
        "min": round(float(values.min()), 6),
        "max": round(float(values.max()), 6),
        "black_fraction": round(float(black.mean()), 6),
    }


def image_problems(metrics: dict[str, float], settings: VerifySettings) -> list[str]:
    """Why the image is bad, or [] when it is fine."""
    problems = []
    if metrics["nan_count"]:
        problems.append(
            f"{metrics['nan_count']} NaN/Inf pixel values: the model has non-finite weights or overflows "
            "(check the LoRA scales and that the fp16-fix VAE is used)"
        )
    else:
        if metrics["black_fraction"] > settings.max_black_fraction:
            problems.append(
                f"{metrics['black_fraction']:.0%} of the pixels are black"
                f" (limit {settings.max_black_fraction:.0%}): "
                "the model or its VAE decodes to nothing"
            )
        if metrics["std"] < settings.min_std:
            problems.append(
                f"the image is constant (std {metrics['std']:.4g} < {settings.min_std}): the model's output "
                "carries no content"
            )
    return problems


def check_manifest(
    pipe: Any, model_dir: Path, template_id: str, expected_spec_hash: str | None
) -> ModelManifest:
    """The folder must be this template's current build, and its scheduler must predict what the manifest
    says (a v-prediction model sampled as epsilon gives washed-out images, not an error)."""
    try:
        manifest = ModelManifest.read(model_dir)
    except ManifestError as exc:
        raise StageError("MANIFEST_INVALID", str(exc)) from None
    if manifest.template != template_id:
        raise StageError(
            "MANIFEST_MISMATCH",
            f"{model_dir}: manifest is for template {manifest.template!r}, not {template_id!r}",
        )
    if expected_spec_hash is not None and manifest.spec_hash != expected_spec_hash:
        raise StageError(
            "MANIFEST_STALE",
            f"{model_dir}: built from spec {manifest.spec_hash[:12]}, the catalog now gives "
            f"{expected_spec_hash[:12]}; re-run the merge (dvc repro merge@{template_id})",
        )
    unet_kind = _unet_kind(model_dir)
    if unet_kind != manifest.checkpoint.kind:
        raise StageError(
            "MANIFEST_MISMATCH",
            f"{model_dir}: the manifest's checkpoint.kind is {manifest.checkpoint.kind!r} but the UNet says "
            f"{unet_kind!r} (in_channels); re-run the merge",
        )
    scheduler_prediction = pipe.scheduler.config.get("prediction_type")
    if scheduler_prediction != manifest.prediction_type:
        raise StageError(
            "PREDICTION_MISMATCH",
            f"{model_dir}/scheduler: prediction_type {scheduler_prediction!r}, but the manifest says "
            f"{manifest.prediction_type!r}; the export must write the catalog's prediction into the"
            " scheduler",
        )
    return manifest


def inpaint_inputs(width: int, height: int) -> dict[str, Any]:
    """What an inpainting checkpoint is verified with: a mid-grey picture whose centre half (a white
    rectangle in the mask) is repainted from scratch (strength 1)."""
    from PIL import Image

    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 4, height // 4, width - width // 4, height - height // 4))
    return {"image": Image.new("RGB", (width, height), (128, 128, 128)), "mask_image": mask, "strength": 1.0}


def generate(pipe: Any, settings: VerifySettings, guidance_scale: float, negative_prompt: str):
    """One image as an H x W x 3 float array on 0..1, and the seconds it took (an inpaint generation for an
    inpainting pipeline: inpaint_inputs)."""
    import torch
    from diffusers import StableDiffusionXLInpaintPipeline

    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    mode_inputs = (
        inpaint_inputs(settings.width, settings.height)
        if isinstance(pipe, StableDiffusionXLInpaintPipeline)
        else {}
    )
    started = time.perf_counter()
    with torch.inference_mode():
        result = pipe(
            prompt=settings.prompt,
            negative_prompt=negative_prompt or None,
            num_inference_steps=settings.steps,
            guidance_scale=guidance_scale,
            width=settings.width,
            height=settings.height,
            generator=generator,
            output_type="np",
            **mode_inputs,
        )
    return result.images[0], time.perf_counter() - started


def save_preview(image, path: Path) -> None:
    import numpy as np
    from PIL import Image

    pixels = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    Image.fromarray((pixels.clip(0, 1) * 255).round().astype("uint8")).save(path, format="PNG")


def verify_model(
    model_dir: Path,
    template_id: str,
    settings: VerifySettings,
    *,
    guidance_scale: float,
    negative_prompt: str = "",
    expected_spec_hash: str | None = None,
    out: Path | None = None,
) -> dict[str, Any]:
    """Load, check the manifest, generate, measure; write preview.png and metrics.json into `out`.

    Raises StageError listing every problem of a bad image (after writing nothing).
    """
    if not (model_dir / "model_index.json").is_file():
        raise StageError(
            "MODEL_MISSING",
            f"{model_dir} is not an exported model folder; run `dvc repro merge@{template_id}`",
        )
    started = time.perf_counter()
    pipe = load_model(model_dir)
    load_s = time.perf_counter() - started
    manifest = check_manifest(pipe, model_dir, template_id, expected_spec_hash)
    image, gen_s = generate(pipe, settings, guidance_scale, negative_prompt)
    metrics: dict[str, Any] = {
        "load_s": round(load_s, 3),
        "step_s": round(gen_s / settings.steps, 4),
        **image_metrics(image),
    }
    problems = image_problems(metrics, settings)
    if problems:
        raise StageError(
            "IMAGE_BAD",
            f"{model_dir} (template {template_id}, prediction {manifest.prediction_type},"
            f" seed {settings.seed}, "
            f"{settings.width}x{settings.height}, {settings.steps} steps): " + "; ".join(problems),
        )
    if out is not None:
        save_preview(image, out / "preview.png")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    log.info("verified %s: %s", template_id, metrics)
    return metrics


def main(template_id: str, *, model: Path, out: Path) -> None:
    """The stage: verify the exported folder `model` of `template_id`, writing preview.png and
    metrics.json into `out`."""
    catalog = load_project_catalog()
    if template_id not in catalog.templates:
        known = ", ".join(sorted(catalog.templates)) or "(none)"
        raise StageError("TEMPLATE_UNKNOWN", f"no template {template_id!r} in the catalog; known: {known}")
    defaults = catalog.templates[template_id].defaults
    settings = VerifySettings.from_params(load_params("verify"))
    with atomic_dir(out) as tmp:
        metrics = verify_model(
            model,
            template_id,
            settings,
            guidance_scale=defaults.guidance_scale,
            negative_prompt=defaults.negative_prompt,
            expected_spec_hash=catalog.spec_hash(template_id),
            out=tmp,
        )
    # Build metrics (artifacts/stats/verify/<id>.json): a failed check raised above and writes none.
    record_metrics(result="pass", load_s=metrics["load_s"], step_s=metrics["step_s"], steps=settings.steps,
                   size=f"{settings.width}x{settings.height}",
                   preview=(out / "preview.png").as_posix())  # fmt: skip


if __name__ == "__main__":
    run_stage("verify", main, paths=("model", "out"))
