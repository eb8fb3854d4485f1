"""One generation: scheduler, weighted prompt embeddings, seeded denoising, checked decode with fp32 retry."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from worker.errors import ImageInvalid, ModelInvalid
from worker.images import decode_latents, invalid_reason, latents_are_finite, to_pil
from worker.inputs import MAX_SEED, GenerationParameters
from worker.pipelines import LoadedTemplate
from worker.prompts import encode_prompts
from worker.schedulers import build_scheduler
from worker.telemetry import note_retry

# (step just finished, total steps)
ProgressCallback = Callable[[int, int], None]


@dataclass
class GenerationResult:
    images: list  # PIL images
    seeds: list[int]
    inference_ms: float
    warnings: list[str] = field(default_factory=list)
    # VAE decode (and its fp32 retry) and conversion to images; not part of inference_ms.
    decode_ms: float = 0.0


def image_seeds(seed: int, count: int) -> list[int]:
    """Image i uses seed + i (wrapping at 2^64): each image can be redone alone with its own seed."""
    return [(seed + i) % (MAX_SEED + 1) for i in range(count)]


@torch.no_grad()
def generate(
    loaded: LoadedTemplate, params: GenerationParameters, progress: ProgressCallback | None = None
) -> GenerationResult:
    pipe = loaded.pipe
    started = time.perf_counter()
    pipe.scheduler = build_scheduler(params.scheduler, loaded.scheduler_config, params.scheduler_options)
    embeddings = encode_prompts(pipe, params.prompt, params.negative_prompt)
    warnings = list(embeddings.warnings)
    seeds = image_seeds(params.seed, params.num_images)
    # One CPU generator per image: the same noise on every device, and image i starts from the same noise
    # as a single-image request with seed + i (equal up to batched-arithmetic rounding).
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]

    def on_step_end(pipeline, step: int, _timestep, callback_kwargs):
        if progress is not None:
            # Second-order schedulers (Heun, DPM++ singlestep) run more model calls than `steps`.
            progress(step + 1, pipeline.num_timesteps)
        return callback_kwargs

    # The ensemble of experts: the base stops at switch_at and hands its latents to the refiner.
    split = params.refiner.switch_at if params.refiner is not None else None
    if split is not None and loaded.refiner is None:
        raise ModelInvalid(f"template {params.template!r}: a refiner was asked for, but none is loaded")
    latents = pipe(
        prompt_embeds=embeddings.prompt_embeds,
        negative_prompt_embeds=embeddings.negative_prompt_embeds,
        pooled_prompt_embeds=embeddings.pooled_prompt_embeds,
        negative_pooled_prompt_embeds=embeddings.negative_pooled_prompt_embeds,
        num_images_per_prompt=params.num_images,
        width=params.width,
        height=params.height,
        num_inference_steps=params.steps,
        guidance_scale=params.guidance_scale,
        generator=generators,
        output_type="latent",
        callback_on_step_end=on_step_end,
        **({"denoising_end": split} if split is not None else {}),
    ).images
    if split is not None:
        latents = _refine(loaded, params, latents, generators, split, on_step_end, warnings)

    if not latents_are_finite(latents):
        # The UNet itself produced NaN/Inf: decoding again in fp32 cannot repair the latents.
        raise ImageInvalid(
            f"the denoiser produced NaN/Inf latents for template {params.template!r} (seed {params.seed}); "
            "the model folder's UNet may be broken in fp16: check its verify metrics"
        )
    decode_started = time.perf_counter()
    pixels = decode_latents(pipe.vae, latents, force_fp32=False)
    reason = invalid_reason(pixels)
    if reason is not None:
        note_retry("image_check")
        pixels = decode_latents(pipe.vae, latents, force_fp32=True)
        retry_reason = invalid_reason(pixels)
        if retry_reason is not None:
            raise ImageInvalid(
                f"{retry_reason} for template {params.template!r} (seed {params.seed}), also after retrying "
                "the VAE decode in fp32; try another seed or prompt, or check the model folder's VAE"
            )
        warnings.append(f"{reason} in the {pipe.vae.dtype} VAE decode; decoded again in float32")
    images = to_pil(pixels)
    decode_ms = (time.perf_counter() - decode_started) * 1000
    return GenerationResult(images, seeds, (decode_started - started) * 1000, warnings, decode_ms)


def _refine(loaded: LoadedTemplate, params: GenerationParameters, latents, generators, split: float,
            on_step_end, warnings: list[str]):  # fmt: skip
    """The refiner's part: the same scheduler, steps, guidance and generators, from `split` to the end,
    conditioned through its own text encoder (aesthetic scores: diffusers' defaults, 6 and 2.5)."""
    refiner = loaded.refiner
    assert refiner is not None and loaded.refiner_scheduler_config is not None
    refiner.scheduler = build_scheduler(
        params.scheduler, loaded.refiner_scheduler_config, params.scheduler_options
    )
    embeddings = encode_prompts(refiner, params.prompt, params.negative_prompt)
    warnings.extend(w for w in embeddings.warnings if w not in warnings)
    return refiner(
        prompt_embeds=embeddings.prompt_embeds,
        negative_prompt_embeds=embeddings.negative_prompt_embeds,
        pooled_prompt_embeds=embeddings.pooled_prompt_embeds,
        negative_pooled_prompt_embeds=embeddings.negative_pooled_prompt_embeds,
        image=latents,
        num_images_per_prompt=params.num_images,
        num_inference_steps=params.steps,
        denoising_start=split,
        guidance_scale=params.guidance_scale,
        generator=generators,
        output_type="latent",
        callback_on_step_end=on_step_end,
    ).images
