"""One generation: scheduler, weighted prompt embeddings, seeded denoising in the job's mode (txt2img,
img2img, inpaint), the template's refiner for the last part of a txt2img denoising, the optional hires pass,
checked decode with fp32 retry, inpainting's paste-back."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from worker.errors import ImageInvalid, ModelInvalid
from worker.image_job import ImageJob
from worker.images import decode_latents, invalid_reason, latents_are_finite, to_pil
from worker.inputs import MAX_SEED, GenerationParameters
from worker.masks import finish_inpaint
from worker.mode_pipelines import mode_pipeline
from worker.modes import effective_steps
from worker.pipelines import LoadedTemplate
from worker.prompts import PromptEmbeddings, encode_prompts
from worker.schedulers import build_scheduler
from worker.telemetry import note_retry

# (step just finished, total steps)
ProgressCallback = Callable[[int, int], None]
# SDXL's VAE maps 8x8 pixels to one latent.
VAE_SCALE = 8


@dataclass
class GenerationResult:
    images: list  # PIL images
    seeds: list[int]
    inference_ms: float
    warnings: list[str] = field(default_factory=list)
    # VAE decode (and its fp32 retry) and conversion to images; not part of inference_ms.
    decode_ms: float = 0.0
    # Denoising steps the first pass ran (img2img/inpaint: int(steps x strength)).
    effective_steps: int = 0
    # The hires pass: what it did (for the answer) and its time (upscale and refinement; not in
    # inference_ms). None without one.
    hires: dict[str, Any] | None = None
    hires_ms: float | None = None


def image_seeds(seed: int, count: int) -> list[int]:
    """Image i uses seed + i (wrapping at 2^64): each image can be redone alone with its own seed."""
    return [(seed + i) % (MAX_SEED + 1) for i in range(count)]


def _mode_inputs(params: GenerationParameters, image_job: ImageJob | None) -> dict[str, Any]:
    """The pipeline arguments of the job's mode: its size, and for the image modes the picture(s)."""
    if params.mode == "txt2img":
        return {"width": params.width, "height": params.height}
    if image_job is None:
        raise ValueError(f"a {params.mode} job needs its pictures (worker.image_job.load_image_job)")
    if params.mode == "img2img":
        # img2img's size is the picture's (already the generation size: worker.image_job).
        return {"image": image_job.image.image, "strength": params.strength}
    plan = image_job.plan
    if plan is None:
        raise ValueError("an inpaint job needs its plan (ImageJob.planned)")
    width, height = plan.image.size
    return {
        "image": plan.image,
        "mask_image": plan.mask,
        "strength": params.strength,
        "width": width,
        "height": height,
    }


def _denoise(
    pipe: Any,
    params: GenerationParameters,
    embeddings: PromptEmbeddings,
    generators: list[torch.Generator],
    steps: int,
    on_step: Callable[[int, int], None] | None,
    **mode_inputs: Any,
) -> torch.Tensor:
    """Run `pipe` to latents; `on_step(step, pipeline total)` after each step."""

    def on_step_end(pipeline, step: int, _timestep, callback_kwargs):
        if on_step is not None:
            # Second-order schedulers (Heun, DPM++ singlestep) run more model calls than `steps`.
            on_step(step + 1, pipeline.num_timesteps)
        return callback_kwargs

    return pipe(
        prompt_embeds=embeddings.prompt_embeds,
        negative_prompt_embeds=embeddings.negative_prompt_embeds,
        pooled_prompt_embeds=embeddings.pooled_prompt_embeds,
        negative_pooled_prompt_embeds=embeddings.negative_pooled_prompt_embeds,
        num_images_per_prompt=params.num_images,
        num_inference_steps=steps,
        guidance_scale=params.guidance_scale,
        generator=generators,
        output_type="latent",
        callback_on_step_end=on_step_end,
        **mode_inputs,
    ).images


def _check_latents(latents: torch.Tensor, params: GenerationParameters) -> None:
    if not latents_are_finite(latents):
        # The UNet itself produced NaN/Inf: decoding again in fp32 cannot repair the latents.
        raise ImageInvalid(
            f"the denoiser produced NaN/Inf latents for template {params.template!r} (seed {params.seed}); "
            "the model folder's UNet may be broken in fp16: check its verify metrics"
        )


def _decode_checked(vae: Any, latents: torch.Tensor, params: GenerationParameters, warnings: list[str]):
    """Pixels in [-1, 1]; one fp32 retry of the decode after NaN/Inf or a black frame."""
    pixels = decode_latents(vae, latents, force_fp32=False)
    reason = invalid_reason(pixels)
    if reason is not None:
        note_retry("image_check")
        pixels = decode_latents(vae, latents, force_fp32=True)
        retry_reason = invalid_reason(pixels)
        if retry_reason is not None:
            raise ImageInvalid(
                f"{retry_reason} for template {params.template!r} (seed {params.seed}), also after retrying "
                "the VAE decode in fp32; try another seed or prompt, or check the model folder's VAE"
            )
        warnings.append(f"{reason} in the {vae.dtype} VAE decode; decoded again in float32")
    return pixels


def _hires_pass(
    loaded: LoadedTemplate,
    params: GenerationParameters,
    latents: torch.Tensor,
    embeddings: PromptEmbeddings,
    generators: list[torch.Generator],
    on_step: Callable[[int, int], None] | None,
    warnings: list[str],
) -> tuple[torch.Tensor, int]:
    """Upscale the first pass to the hires size and refine it with img2img; (latents, steps it ran).

    `latent`: the latents scaled bilinearly (A1111's "Latent" upscaler), refined without a VAE round trip;
    `lanczos`: the first pass decoded (checked), each image scaled with Lanczos, encoded again by img2img."""
    hires = params.hires
    assert hires is not None
    pipe = mode_pipeline(loaded, "img2img")
    pipe.scheduler = build_scheduler(params.scheduler, loaded.scheduler_config, params.scheduler_options)
    if hires.upscaler == "latent":
        image: Any = torch.nn.functional.interpolate(
            latents,
            size=(hires.height // VAE_SCALE, hires.width // VAE_SCALE),
            mode="bilinear",
            align_corners=False,
        )
    else:
        from PIL import Image

        first = to_pil(_decode_checked(pipe.vae, latents, params, warnings))
        image = [picture.resize((hires.width, hires.height), Image.Resampling.LANCZOS) for picture in first]
    refined = _denoise(
        pipe, params, embeddings, generators, hires.steps, on_step, image=image, strength=hires.strength
    )
    return refined, effective_steps(hires.steps, hires.strength)


@torch.no_grad()
def generate(
    loaded: LoadedTemplate,
    params: GenerationParameters,
    progress: ProgressCallback | None = None,
    image_job: ImageJob | None = None,
) -> GenerationResult:
    """Generate `params.num_images` images in the job's mode. `image_job`: the pictures of an img2img or
    inpaint job (worker.image_job; planned for inpaint)."""
    pipe = mode_pipeline(loaded, params.mode)
    mode_inputs = _mode_inputs(params, image_job)
    started = time.perf_counter()
    pipe.scheduler = build_scheduler(params.scheduler, loaded.scheduler_config, params.scheduler_options)
    embeddings = encode_prompts(pipe, params.prompt, params.negative_prompt, params.clip_skip)
    warnings = list(embeddings.warnings)
    seeds = image_seeds(params.seed, params.num_images)
    # One CPU generator per image: the same noise on every device, and image i starts from the same noise
    # as a single-image request with seed + i (equal up to batched-arithmetic rounding).
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    steps = effective_steps(params.steps, params.strength) if params.strength is not None else params.steps

    # The ensemble of experts (txt2img only: worker.inputs): the base stops at switch_at and hands its
    # latents to the refiner.
    split = params.refiner.switch_at if params.refiner is not None else None
    if split is not None and loaded.refiner is None:
        raise ModelInvalid(f"template {params.template!r}: a refiner was asked for, but none is loaded")

    # Progress over every pass (base, refiner, hires) in turn: a pass's own steps are counted once it runs,
    # the later ones are estimated until then.
    hires_estimate = (
        effective_steps(params.hires.steps, params.hires.strength) if params.hires is not None else 0
    )
    refiner_estimate = params.steps - int(params.steps * split) if split is not None else 0
    done_before, phase_total = [0], [0]

    def on_step_of_pass(later: int) -> Callable[[int, int], None]:
        def on_step(step: int, total: int) -> None:
            phase_total[0] = total
            if progress is not None:
                progress(done_before[0] + step, done_before[0] + total + later)

        return on_step

    def end_pass() -> None:
        done_before[0] += phase_total[0]
        phase_total[0] = 0

    if split is not None:
        mode_inputs["denoising_end"] = split
    base_step = on_step_of_pass(refiner_estimate + hires_estimate)
    latents = _denoise(pipe, params, embeddings, generators, params.steps, base_step, **mode_inputs)
    end_pass()
    if split is not None:
        refiner_step = on_step_of_pass(hires_estimate)
        latents = _refine(loaded, params, latents, generators, split, refiner_step, warnings)
        end_pass()
    _check_latents(latents, params)
    inference_ms = (time.perf_counter() - started) * 1000

    hires_report, hires_ms, vae = None, None, pipe.vae
    if params.hires is not None:
        hires_started = time.perf_counter()
        first_size = [latents.shape[-1] * VAE_SCALE, latents.shape[-2] * VAE_SCALE]
        latents, hires_steps = _hires_pass(
            loaded, params, latents, embeddings, generators, on_step_of_pass(0), warnings
        )
        _check_latents(latents, params)
        hires_ms = (time.perf_counter() - hires_started) * 1000
        hires_report = {
            **params.hires.model_dump(exclude={"width", "height"}),
            "effective_steps": hires_steps,
            "from_size": first_size,
            "size": [params.hires.width, params.hires.height],
        }

    decode_started = time.perf_counter()
    images = to_pil(_decode_checked(vae, latents, params, warnings))
    if params.mode == "inpaint":
        assert image_job is not None and image_job.plan is not None
        # Outside the feathered mask every pixel is the input's, bit for bit (worker/masks.py).
        images = [finish_inpaint(image_job.plan, image) for image in images]
    decode_ms = (time.perf_counter() - decode_started) * 1000
    return GenerationResult(
        images,
        seeds,
        inference_ms,
        warnings,
        decode_ms,
        effective_steps=steps,
        hires=hires_report,
        hires_ms=hires_ms,
    )


def _refine(
    loaded: LoadedTemplate,
    params: GenerationParameters,
    latents: torch.Tensor,
    generators: list[torch.Generator],
    split: float,
    on_step: Callable[[int, int], None] | None,
    warnings: list[str],
) -> torch.Tensor:
    """The refiner's part: the same scheduler, steps, guidance and generators, from `split` to the end,
    conditioned through its own text encoder (aesthetic scores: diffusers' defaults, 6 and 2.5)."""
    refiner = loaded.refiner
    assert refiner is not None and loaded.refiner_scheduler_config is not None
    refiner.scheduler = build_scheduler(
        params.scheduler, loaded.refiner_scheduler_config, params.scheduler_options
    )
    embeddings = encode_prompts(refiner, params.prompt, params.negative_prompt, params.clip_skip)
    warnings.extend(w for w in embeddings.warnings if w not in warnings)
    return _denoise(
        refiner, params, embeddings, generators, params.steps, on_step, image=latents, denoising_start=split
    )
