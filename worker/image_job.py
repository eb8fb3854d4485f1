"""A job's input pictures made ready for its mode: `image` (and `mask`) read under the worker's limits and
brought to the generation size (worker/image_inputs.py, worker/masks.py), then the inpaint plan once the
job's parameters are resolved. No torch: this runs before a pipeline is touched.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from worker.errors import ImageInvalid, InvalidInput
from worker.image_fetch import Resolver
from worker.image_inputs import InputImage, load_image_input
from worker.inputs import GenerationInput, GenerationParameters
from worker.masks import InpaintPlan, MaskInput, load_mask_input, plan_inpaint
from worker.settings import WorkerSettings

# RunPod's request body limit for /runsync (/run: 10 MB). A job whose inline pictures alone are larger could
# never arrive through RunPod; the worker refuses it the same way when it does arrive (local API, tests),
# pointing at the URL and s3:// sources, whose files may be up to FUSELINE_MAX_INPUT_BYTES.
RUNSYNC_BODY_LIMIT = 20_000_000
_FETCHED_PREFIXES = ("http://", "https://", "s3://")


@dataclass(frozen=True)
class ImageJob:
    """The pictures of an img2img or inpaint job, at the generation size."""

    image: InputImage
    mask: MaskInput | None = None
    # Inpaint only, once the parameters are known (`planned`): what the pipeline gets, and the paste-back.
    plan: InpaintPlan | None = None

    @property
    def size(self) -> tuple[int, int]:
        """The generation size (width, height) the image was brought to."""
        return self.image.report.size

    def planned(self, params: GenerationParameters) -> ImageJob:
        """This job with its inpaint plan (mask blur, "only masked" crop) for `params`; itself otherwise."""
        if self.mask is None or params.mode != "inpaint":
            return self
        assert params.mask_blur is not None and params.inpaint_full_res_padding is not None
        plan = plan_inpaint(
            self.image.image,
            self.mask.mask,
            blur=params.mask_blur,
            full_res=bool(params.inpaint_full_res),
            padding=params.inpaint_full_res_padding,
        )
        return replace(self, plan=plan)

    def report(self) -> dict[str, Any]:
        """What was done to the inputs, for the job's answer."""
        out: dict[str, Any] = {"image": self.image.report.as_dict()}
        if self.mask is not None:
            out["mask"] = self.mask.report.as_dict()
        if self.plan is not None:
            out["inpaint"] = self.plan.as_dict()
        return out

    def warnings(self) -> list[str]:
        found = list(self.image.report.warnings)
        if self.mask is not None:
            found += self.mask.report.warnings
        return found


def _check_requested_size(request: GenerationInput, settings: WorkerSettings) -> None:
    """The job's width/height against the pixel budget before any picture is read (the size rule needs
    them to fit: worker.image_inputs.choose_size)."""
    width, height = request.width, request.height
    if width is not None and height is not None and width * height > settings.max_pixels:
        raise InvalidInput(
            f"1 problem(s): width x height: {width}x{height} = {width * height} pixels exceeds the budget of "
            f"{settings.max_pixels} (FUSELINE_MAX_PIXELS); ask for a smaller image"
        )
    given = width if width is not None else height
    if (
        (width is None) != (height is None)
        and given is not None
        and given * settings.min_size > settings.max_pixels
    ):
        name = "width" if width is not None else "height"
        raise InvalidInput(
            f"1 problem(s): {name}: {given} x at least {settings.min_size} (FUSELINE_MIN_SIZE) exceeds the "
            f"budget of {settings.max_pixels} pixels (FUSELINE_MAX_PIXELS); ask for a smaller {name}"
        )


def _check_inline_size(request: GenerationInput) -> None:
    """Refuse inline pictures (base64, data: URLs) that together exceed RunPod's /runsync body limit."""
    inline = {
        name: len(value)
        for name in ("image", "mask")
        if isinstance(value := getattr(request, name), str)
        and not value.lstrip()[:8].lower().startswith(_FETCHED_PREFIXES)
    }
    total = sum(inline.values())
    if total > RUNSYNC_BODY_LIMIT:
        fields = " and ".join(inline)
        raise ImageInvalid(
            f"{fields}: {total} characters of inline (base64) picture data, over RunPod's request limit of "
            f"{RUNSYNC_BODY_LIMIT} bytes for /runsync (10 MB for /run); RunPod refuses such a request before "
            "any worker sees it: give the picture as an https:// URL or an s3:// object instead (up to "
            "FUSELINE_MAX_INPUT_BYTES)"
        )


def _s3_client_for(*values: str | None) -> Any | None:
    """The worker's shared S3 client when a picture is an s3:// object (its credentials, its endpoint)."""
    if not any(isinstance(v, str) and v.strip().lower().startswith("s3://") for v in values):
        return None
    from worker.upload import s3_client

    return s3_client()


def load_image_job(
    request: GenerationInput, settings: WorkerSettings, *, resolver: Resolver | None = None
) -> ImageJob | None:
    """The job's pictures (None for txt2img): fetched or decoded, checked and sized by the rules of
    docs/operations.md ("Image inputs"), with the job's width/height when it gave them. `resolver`: how URL
    host names become addresses (tests; default: the system's)."""
    if request.image is None:
        return None
    _check_requested_size(request, settings)
    _check_inline_size(request)
    limits = settings.image_limits()
    client = _s3_client_for(request.image, request.mask)
    image = load_image_input(
        request.image,
        limits,
        settings.size_bounds(),
        width=request.width,
        height=request.height,
        field_name="image",
        resolver=resolver,
        s3_client=client,
    )
    mask = None
    if request.mask is not None:
        mask = load_mask_input(
            request.mask, limits, like=image, field_name="mask", resolver=resolver, s3_client=client
        )
    return ImageJob(image, mask)
