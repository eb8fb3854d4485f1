"""The job input: one strict pydantic model, and the resolution of absent fields from template defaults.

runpod's own `rp_validator` skips range checks on fields that have a default, so every check lives here.
Validation reports every problem at once, as one `[INVALID_INPUT]` message naming each field.
"""

from __future__ import annotations

import secrets
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fuseline.core.catalog.model import ID_PATTERN, Defaults, RefinerOptions
from fuseline.core.serving import (
    CLIP_SKIP_MAX,
    CLIP_SKIP_MIN,
    DEFAULT_SCHEDULER,
    MAX_SIZE,
    SCHEDULER_NAMES,
    SDXL_CLIP_SKIP,
    SIZE_MULTIPLE,
    canonical_scheduler,
    nearest_sizes,
    size_problem,
)
from worker.errors import InvalidInput, ModelInvalid, UploadNotConfigured
from worker.modes import (
    DEFAULT_FULL_RES_PADDING,
    DEFAULT_MASK_BLUR,
    DEFAULT_STRENGTH,
    HiresOptions,
    HiresParameters,
    Mode,
    OutputPlace,
    check_output_place,
    job_mode,
    mode_problems,
    resolve_hires,
    steps_problem,
)
from worker.settings import WorkerSettings

MAX_PROMPT_CHARS = 4000
MAX_NUM_IMAGES = 4
MAX_SEED = 2**64 - 1
DEFAULT_QUALITY = 90
# Add-on LoRAs one job may apply at once (each adds adapter matmuls to every adapted layer and step).
MAX_JOB_LORAS = 4

_STRICT = ConfigDict(strict=True, extra="forbid")


class OutputOptions(BaseModel):
    """How images come back: encoding, quality, and where to (inline base64, or S3 with a presigned URL)."""

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=False)

    format: Literal["png", "jpeg", "webp"] = "png"
    # JPEG/WebP quality; PNG is lossless and ignores it.
    quality: int = Field(default=DEFAULT_QUALITY, ge=1, le=100)
    # "s3" by default when `s3` is given.
    return_: Literal["base64", "s3"] = Field(default="base64", alias="return")
    # The caller's own output place (a bucket on FUSELINE_OUTPUT_BUCKETS); absent from the answer when unset.
    s3: OutputPlace | None = Field(default=None, exclude_if=lambda value: value is None)

    @model_validator(mode="after")
    def _place_means_s3(self) -> OutputOptions:
        if self.s3 is not None:
            if "return_" in self.model_fields_set and self.return_ != "s3":
                raise ValueError("return 'base64' contradicts s3 (the images go to that bucket); drop one")
            self.return_ = "s3"
        return self


class LoraRequest(BaseModel):
    """One add-on LoRA a job asks for (the template's add-ons: worker/addons.py checks name and scale)."""

    model_config = _STRICT

    name: str = Field(pattern=ID_PATTERN, max_length=64)
    # None: the add-on's default_scale.
    scale: float | None = Field(default=None, allow_inf_nan=False)


class GenerationInput(BaseModel):
    """What a job may ask for; None means "not given": resolved later from the template's defaults."""

    model_config = _STRICT

    template: str | None = Field(default=None, pattern=ID_PATTERN, max_length=64)
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    width: int | None = None
    height: int | None = None
    steps: int | None = Field(default=None, ge=1, le=150)
    guidance_scale: float | None = Field(default=None, ge=0, le=30, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    num_images: int | None = Field(default=None, ge=1, le=MAX_NUM_IMAGES)
    scheduler: str | None = None
    output: OutputOptions | None = None
    # Image modes (worker/modes.py): base64, a data: URL, an https:// URL or s3://bucket/key each.
    image: str | None = None
    mask: str | None = None
    strength: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    mask_blur: float | None = Field(default=None, ge=0, le=64, allow_inf_nan=False)
    inpaint_full_res: bool | None = None
    inpaint_full_res_padding: int | None = Field(default=None, ge=0, le=256)
    hires: HiresOptions | None = None
    loras: list[LoraRequest] | None = Field(default=None, max_length=MAX_JOB_LORAS)
    clip_skip: int | None = Field(default=None, ge=CLIP_SKIP_MIN, le=CLIP_SKIP_MAX)
    # The template's refiner takes over at `switch_at` ({"switch_at": 1} turns a default refiner off).
    refiner: RefinerOptions | None = None

    @property
    def mode(self) -> Mode:
        return job_mode(self.image is not None, self.mask is not None)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must contain text, not only whitespace")
        return value

    @field_validator("width", "height")
    @classmethod
    def _size(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is None:
            return None
        min_size = _settings(info).min_size
        if value % SIZE_MULTIPLE:
            nearest = " or ".join(str(size) for size in nearest_sizes(value, min_size))
            raise ValueError(
                f"must be a multiple of {SIZE_MULTIPLE} between {min_size} and {MAX_SIZE} "
                f"(got {value}; nearest: {nearest})"
            )
        if not min_size <= value <= MAX_SIZE:
            raise ValueError(f"must be between {min_size} and {MAX_SIZE} (got {value})")
        return value

    @field_validator("loras")
    @classmethod
    def _each_once(cls, value: list[LoraRequest] | None) -> list[LoraRequest] | None:
        names = [lora.name for lora in value or ()]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(
                f"names {', '.join(twice)} more than once; give each add-on once, with its scale"
            )
        return value

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, value: str | None) -> str | None:
        value = canonical_scheduler(value) if value is not None else None  # "DPM++ 2M Karras" too
        if value is not None and value not in SCHEDULER_NAMES:
            raise ValueError(f"unknown scheduler {value!r}; valid: {', '.join(SCHEDULER_NAMES)}")
        return value


def _unset(value: Any) -> bool:
    return value is None


class GenerationParameters(BaseModel):
    """Every parameter resolved to a concrete value; returned to the caller as `parameters` (the image
    modes' fields only when they apply, the mode itself at the top of the answer, never the images)."""

    model_config = ConfigDict(frozen=True)

    template: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    num_images: int
    scheduler: str
    output: OutputOptions
    mode: Mode = Field(default="txt2img", exclude=True)
    strength: float | None = Field(default=None, exclude_if=_unset)
    mask_blur: float | None = Field(default=None, exclude_if=_unset)
    inpaint_full_res: bool | None = Field(default=None, exclude_if=_unset)
    inpaint_full_res_padding: int | None = Field(default=None, exclude_if=_unset)
    hires: HiresParameters | None = Field(default=None, exclude_if=_unset)
    # Clip skip used (A1111 numbering; 2: SDXL's own penultimate layer).
    clip_skip: int = SDXL_CLIP_SKIP
    # Add-on LoRAs applied, each {"name", "scale"} with its scale resolved (worker/addons.py).
    loras: list[dict[str, Any]] = Field(default_factory=list)
    # The template's scheduler options and refiner split; left out of `parameters` when unused.
    timestep_spacing: str | None = Field(default=None, exclude_if=lambda value: value is None)
    karras_sigmas: bool | None = Field(default=None, exclude_if=lambda value: value is None)
    refiner: RefinerOptions | None = Field(default=None, exclude_if=lambda value: value is None)

    @property
    def scheduler_options(self) -> dict[str, Any]:
        return {"timestep_spacing": self.timestep_spacing, "karras_sigmas": self.karras_sigmas}

    def public(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True)


def _settings(info: ValidationInfo) -> WorkerSettings:
    context = info.context or {}
    return context.get("settings") or WorkerSettings()


def _format_errors(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        loc = ".".join(str(part) for part in item["loc"]) or "input"
        if item["type"] == "extra_forbidden":
            # List items (loras[1].x) are looked up by their list's name.
            path = tuple(str(p) for p in item["loc"][:-1] if not isinstance(p, int))
            model = _MODELS_AT.get(path, GenerationInput)
            valid = [f.alias or name for name, f in model.model_fields.items()]
            problems.append(f"{loc}: unknown field; valid fields: {', '.join(valid)}")
            continue
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "missing":
            message = "required"
        got = item.get("input")
        shown = repr(got) if not isinstance(got, str) or len(got) <= 40 else f"a {len(got)}-character string"
        if item["type"] not in ("missing",) and not isinstance(got, dict):
            message = f"{message} (got {shown})" if "(got" not in message else message
        problems.append(f"{loc}: {message}")
    return problems


# The model whose fields an unknown key sits among, by the key's parent path.
_MODELS_AT: dict[tuple[str, ...], type[BaseModel]] = {
    ("output",): OutputOptions,
    ("output", "s3"): OutputPlace,
    ("hires",): HiresOptions,
    ("loras",): LoraRequest,
    ("refiner",): RefinerOptions,
}


def parse_input(raw: Any, settings: WorkerSettings) -> GenerationInput:
    """Validate a job's `input`; raises InvalidInput listing every problem, or UploadNotConfigured."""
    if not isinstance(raw, dict):
        kind = "nothing" if raw is None else type(raw).__name__
        raise InvalidInput(f"job input must be a JSON object like {{'prompt': '...'}}; got {kind}")
    try:
        parsed = GenerationInput.model_validate(raw, context={"settings": settings})
    except ValidationError as exc:
        problems = _format_errors(exc)
        raise InvalidInput(f"{len(problems)} problem(s): " + "; ".join(problems)) from None
    if parsed.template is None and settings.default_template is None:
        raise InvalidInput("1 problem(s): template: required (this worker has no FUSELINE_DEFAULT_TEMPLATE)")
    problems = mode_problems({name: getattr(parsed, name) for name in type(parsed).model_fields})
    if problems:
        raise InvalidInput(f"{len(problems)} problem(s): " + "; ".join(problems))
    place = parsed.output.s3 if parsed.output is not None else None
    if place is not None:
        # Refused before any image is fetched or generated.
        check_output_place(place, settings)
    elif parsed.output is not None and parsed.output.return_ == "s3" and settings.output_bucket is None:
        # Refused before any generation: the GPU time would be lost with nowhere to put the images.
        raise UploadNotConfigured(
            "output.return 's3' needs an output bucket, and this worker has none: set "
            "FUSELINE_OUTPUT_BUCKET (and the AWS_* credentials) on the endpoint, or ask for output.return "
            "'base64' (the default)"
        )
    return parsed


def check_refiner_request(request: GenerationInput, template_id: str, refiner: str | None) -> None:
    """Refuse a job's `refiner` that the template cannot honour (it has none, or the job is not
    text-to-image): called before any picture is fetched or pipeline loaded."""
    if request.refiner is None:
        return
    if refiner is None:
        raise InvalidInput(
            f"1 problem(s): refiner: template {template_id!r} has no refiner; leave refiner out, or use a "
            "template whose catalog entry names one"
        )
    if request.mode != "txt2img":
        raise InvalidInput(
            "1 problem(s): refiner: the refiner hands over the last part of a text-to-image denoising; a "
            f"{request.mode} job cannot use it (leave refiner out)"
        )


def resolve_parameters(
    request: GenerationInput,
    template_id: str,
    defaults: Defaults,
    settings: WorkerSettings,
    image_size: tuple[int, int] | None = None,
    *,
    refiner: str | None = None,
) -> GenerationParameters:
    """Request values first, then the template's defaults (which carry the global ones), then a seed.

    `image_size`: the generation size the input image was brought to (img2img, inpaint: worker.image_job,
    which applies the job's width/height and the image input size rule); the template's default size
    does not apply to an image mode. `refiner`: the refiner the template's folder names (None: none)."""
    if image_size is not None:
        request = request.model_copy(update={"width": image_size[0], "height": image_size[1]})
    width = request.width if request.width is not None else defaults.width
    height = request.height if request.height is not None else defaults.height
    # The catalog refuses defaults outside the serving rules (core.serving), but a fuseline.json may come
    # from elsewhere and this worker's FUSELINE_MIN_SIZE may be stricter: a template default it does not
    # serve is the template's fault, named as such (the request is fine).
    from_defaults = [name for name in ("width", "height") if getattr(request, name) is None]
    for name in from_defaults:
        value = getattr(defaults, name)
        if size_problem(value, settings.min_size) is not None:
            raise ModelInvalid(
                f"template {template_id!r}: fuseline.json defaults.{name} {value} is not a size this worker "
                f"serves (a multiple of {SIZE_MULTIPLE} between {settings.min_size} (FUSELINE_MIN_SIZE) and "
                f"{MAX_SIZE}); fix the template's defaults in templates.json, or pass {name} in the request"
            )
    if from_defaults and width * height > settings.max_pixels:
        raise ModelInvalid(
            f"template {template_id!r}: {width}x{height} (defaults.{' and defaults.'.join(from_defaults)} of "
            f"its fuseline.json) = {width * height} pixels exceeds this worker's budget of "
            f"{settings.max_pixels} (FUSELINE_MAX_PIXELS); pass width and height in the request, or fix the "
            "template's defaults in templates.json"
        )
    if width * height > settings.max_pixels:
        raise InvalidInput(
            f"1 problem(s): width x height: {width}x{height} = {width * height} pixels exceeds the budget of "
            f"{settings.max_pixels} (FUSELINE_MAX_PIXELS); ask for a smaller image"
        )
    scheduler = request.scheduler or defaults.scheduler or DEFAULT_SCHEDULER
    if scheduler not in SCHEDULER_NAMES:
        raise ModelInvalid(
            f"template {template_id!r}: fuseline.json defaults.scheduler {scheduler!r} is not a scheduler "
            f"this worker knows ({', '.join(SCHEDULER_NAMES)}); fix the template's defaults in templates.json"
        )
    steps = request.steps if request.steps is not None else defaults.steps
    mode = request.mode
    strength = (
        (request.strength if request.strength is not None else DEFAULT_STRENGTH)
        if mode != "txt2img"
        else None
    )
    if strength is not None and (problem := steps_problem("strength", steps, strength)) is not None:
        raise InvalidInput(f"1 problem(s): {problem}")
    inpainting = mode == "inpaint"
    output = request.output or OutputOptions()
    check_refiner_request(request, template_id, refiner)
    if defaults.refiner is not None and refiner is None:
        raise ModelInvalid(
            f"template {template_id!r}: fuseline.json defaults.refiner is set but the manifest names no "
            "refiner; fix the template in templates.json and rebuild it"
        )
    # An image mode runs without the template's default refiner (it refines a text-to-image denoising).
    split = (request.refiner or defaults.refiner) if mode == "txt2img" else None
    return GenerationParameters(
        template=template_id,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt
        if request.negative_prompt is not None
        else defaults.negative_prompt,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=request.guidance_scale
        if request.guidance_scale is not None
        else defaults.guidance_scale,
        # Full 64-bit range; drawn here so that it is always returned and the image can be reproduced.
        seed=request.seed if request.seed is not None else secrets.randbits(64),
        num_images=request.num_images or 1,
        scheduler=scheduler,
        output=output,
        mode=mode,
        strength=strength,
        mask_blur=(request.mask_blur if request.mask_blur is not None else DEFAULT_MASK_BLUR)
        if inpainting
        else None,
        inpaint_full_res=bool(request.inpaint_full_res) if inpainting else None,
        inpaint_full_res_padding=(
            request.inpaint_full_res_padding
            if request.inpaint_full_res_padding is not None
            else DEFAULT_FULL_RES_PADDING
        )
        if inpainting
        else None,
        hires=resolve_hires(request.hires, width, height, steps, settings)
        if request.hires is not None
        else None,
        clip_skip=request.clip_skip or defaults.clip_skip or SDXL_CLIP_SKIP,
        timestep_spacing=defaults.timestep_spacing,
        karras_sigmas=defaults.karras_sigmas,
        # switch_at 1: the base does all of it, the refiner nothing (how a request turns a default off).
        refiner=split if split is not None and split.switch_at < 1 else None,
    )
