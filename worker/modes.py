"""The image modes' job options and rules (no torch): which mode a job asks for, what a strength leaves of
the steps, the hires pass's options and final size, and the per-request output place (`output.s3`).

A job's mode is named by what it sends: a prompt alone is `txt2img`, an `image` is `img2img`, an `image`
and a `mask` is `inpaint` (docs/operations.md, "Job input").
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fuseline.core.serving import MAX_SIZE, MODES_BY_CHECKPOINT_KIND, SIZE_MULTIPLE
from worker.errors import InvalidInput, ModeUnsupported, OutputNotAllowed
from worker.masks import DEFAULT_FULL_RES_PADDING, DEFAULT_MASK_BLUR
from worker.settings import MAX_OUTPUT_URL_EXPIRY_S, WorkerSettings

__all__ = ["DEFAULT_FULL_RES_PADDING", "DEFAULT_MASK_BLUR"]  # the inpaint defaults, with the others here

Mode = Literal["txt2img", "img2img", "inpaint"]

# A1111's default denoising strength, for img2img and inpainting alike.
DEFAULT_STRENGTH = 0.75
# A1111's hires-fix defaults: denoising 0.7, the job's own step count, the latent upscaler.
DEFAULT_HIRES_STRENGTH = 0.7
HIRES_UPSCALERS = ("latent", "lanczos")
MAX_HIRES_SCALE = 4.0
MAX_OUTPUT_PREFIX_CHARS = 512
_BUCKET_PATTERN = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"


class HiresOptions(BaseModel):
    """`hires`: after the first pass at the asked size, upscale by `scale` and refine with img2img."""

    model_config = ConfigDict(strict=True, extra="forbid")

    scale: float = Field(gt=1, le=MAX_HIRES_SCALE, allow_inf_nan=False)
    strength: float = Field(default=DEFAULT_HIRES_STRENGTH, gt=0, le=1, allow_inf_nan=False)
    # None: the job's own steps.
    steps: int | None = Field(default=None, ge=1, le=150)
    upscaler: Literal["latent", "lanczos"] = "latent"


class HiresParameters(BaseModel):
    """The hires pass as it runs: its options resolved, and the final size."""

    model_config = ConfigDict(frozen=True)

    scale: float
    strength: float
    steps: int
    upscaler: Literal["latent", "lanczos"]
    width: int
    height: int


class OutputPlace(BaseModel):
    """`output.s3`: the caller's own place for the images, in a bucket the endpoint allows
    (FUSELINE_OUTPUT_BUCKETS)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    bucket: str = Field(pattern=_BUCKET_PATTERN)
    prefix: str = Field(default="", max_length=MAX_OUTPUT_PREFIX_CHARS)
    # None: FUSELINE_OUTPUT_URL_EXPIRY_S.
    expires_in: int | None = Field(default=None, ge=1, le=MAX_OUTPUT_URL_EXPIRY_S)

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        prefix = value.strip("/")
        if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
            raise ValueError("must not have empty, '.' or '..' segments (e.g. 'team-a/renders')")
        if any(ord(c) < 32 or c == "\\" for c in prefix):
            raise ValueError("must not contain control characters or backslashes")
        return prefix


def job_mode(has_image: bool, has_mask: bool) -> Mode:
    """The mode named by what a job sends."""
    if has_mask:
        return "inpaint"
    return "img2img" if has_image else "txt2img"


def mode_problems(fields: dict[str, object]) -> list[str]:
    """Fields that do not fit together (given: the job's fields that are set), as `field: problem`."""
    has_image, has_mask = fields.get("image") is not None, fields.get("mask") is not None
    problems = []
    if has_mask and not has_image:
        problems.append("mask: needs image (the picture the mask belongs to)")
    if fields.get("strength") is not None and not has_image:
        problems.append("strength: only with image (img2img) or image and mask (inpaint)")
    for name in ("mask_blur", "inpaint_full_res", "inpaint_full_res_padding"):
        if fields.get(name) is not None and not has_mask:
            problems.append(f"{name}: only with mask (inpaint)")
    if fields.get("hires") is not None and has_mask:
        problems.append(
            "hires: not with mask (inpaint); inpaint at the size you want, or use inpaint_full_res for a "
            "small area"
        )
    return problems


def check_mode_served(template_id: str, checkpoint_kind: str | None, mode: Mode) -> None:
    """ModeUnsupported when the template's checkpoint cannot serve `mode` (fuseline.core.serving)."""
    served = MODES_BY_CHECKPOINT_KIND.get(checkpoint_kind, ())
    if mode not in served:
        raise ModeUnsupported(
            f"template {template_id!r} is built on an inpainting checkpoint (9-channel UNet): it serves "
            f"{', '.join(served)} jobs only (send image and mask), not {mode}; diffusers' SDXL text-to-image "
            "and img2img pipelines cannot drive its UNet. Use a template on an ordinary SDXL checkpoint for "
            f"{mode}"
        )


def effective_steps(steps: int, strength: float) -> int:
    """The denoising steps an img2img or inpaint pass runs: diffusers' int(steps x strength), at most
    steps."""
    return min(int(steps * strength), steps)


def steps_problem(field: str, steps: int, strength: float, steps_field: str = "steps") -> str | None:
    """Why `steps` x `strength` leaves no step to run (diffusers would return an empty batch), or None."""
    if effective_steps(steps, strength) >= 1:
        return None
    need_steps = math.ceil(1 / strength - 1e-9)
    while int(need_steps * strength) < 1:
        need_steps += 1
    return (
        f"{field}: {strength:g} x {steps_field} {steps} leaves no denoising step "
        f"(int({steps} x {strength:g}) = 0); raise {steps_field} to at least {need_steps} or {field} to at "
        f"least {1 / steps:.3g}"
    )


def hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The hires pass's final size: each side times `scale`, rounded to the nearest multiple of 64 (halves
    up, as the image input size rule rounds)."""
    return tuple(  # type: ignore[return-value]
        max(SIZE_MULTIPLE, int(side * scale / SIZE_MULTIPLE + 0.5) * SIZE_MULTIPLE)
        for side in (width, height)
    )


def resolve_hires(
    hires: HiresOptions, width: int, height: int, steps: int, settings: WorkerSettings
) -> HiresParameters:
    """The hires pass for a first pass of `width` x `height`; InvalidInput when its final size is not one
    this worker generates (the pixel budget applies to the final size) or its steps run nothing."""
    final_width, final_height = hires_size(width, height, hires.scale)
    if (final_width, final_height) == (width, height):
        raise InvalidInput(
            f"1 problem(s): hires.scale: {hires.scale:g} leaves {width}x{height} unchanged once rounded to "
            f"multiples of {SIZE_MULTIPLE}; use a larger scale"
        )
    if max(final_width, final_height) > MAX_SIZE:
        raise InvalidInput(
            f"1 problem(s): hires.scale: {width}x{height} x {hires.scale:g} = {final_width}x{final_height} "
            f"has a side over {MAX_SIZE}; use a smaller scale or first-pass size"
        )
    if final_width * final_height > settings.max_pixels:
        raise InvalidInput(
            f"1 problem(s): hires.scale: {width}x{height} x {hires.scale:g} = {final_width}x{final_height} = "
            f"{final_width * final_height} pixels exceeds the budget of {settings.max_pixels} "
            "(FUSELINE_MAX_PIXELS, which applies to the final size); use a smaller scale or first-pass size"
        )
    hires_steps = hires.steps if hires.steps is not None else steps
    problem = steps_problem("hires.strength", hires_steps, hires.strength, "hires.steps")
    if problem is not None:
        raise InvalidInput(f"1 problem(s): {problem}")
    return HiresParameters(
        scale=hires.scale,
        strength=hires.strength,
        steps=hires_steps,
        upscaler=hires.upscaler,
        width=final_width,
        height=final_height,
    )


def check_output_place(place: OutputPlace, settings: WorkerSettings) -> None:
    """OutputNotAllowed unless the place's bucket is on FUSELINE_OUTPUT_BUCKETS (checked before any work)."""
    if place.bucket not in settings.output_buckets:
        why = (
            "this worker allows no per-job output buckets (FUSELINE_OUTPUT_BUCKETS is unset)"
            if not settings.output_buckets
            else "it is not on this worker's FUSELINE_OUTPUT_BUCKETS allow-list"
        )
        raise OutputNotAllowed(
            f"output.s3.bucket {place.bucket!r}: {why}; leave output.s3 out (the images come back as base64, "
            "or go to the endpoint's own bucket with output.return 's3'), or ask the operator to allow the "
            "bucket"
        )
