"""Inpainting masks: reading a job's mask, binarizing and feathering it, and A1111's "only masked area at
full resolution" (crop around the mask, generate the crop, paste it back through the feathered mask).

Conventions (docs/operations.md, "Image inputs"), chosen to match A1111 so masks made for it work here:
- White repaints, black keeps. A mask with any transparent or translucent pixel is read from its alpha
  channel alone (opaque = repaint, transparent = keep, whatever the colours): what editors that paint on a
  transparent layer export, and what A1111 does. A fully opaque mask is read from its luminance.
- Binarized after it is resized to the image's generation size: values above `threshold` (128 of 255)
  repaint.
- `blur` (A1111's mask_blur) is the standard deviation in pixels of a Gaussian feather across the mask's
  edge, both ways. The feather is cut to zero beyond `feather_px(blur)` pixels (A1111's kernel radius,
  2.5 σ) outside the mask, so every pixel farther than that from the mask keeps the input exactly.
- The result is always the input composited with the generated image through the feathered mask: where
  it is 0 the output pixel IS the input pixel, not a VAE round trip of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from worker.errors import ImageInvalid
from worker.image_fetch import Resolver
from worker.image_inputs import (
    ImageInputLimits,
    InputImage,
    has_transparency,
    open_image,
    read_image_source,
    resize_to,
)

DEFAULT_MASK_THRESHOLD = 128
DEFAULT_MASK_BLUR = 4  # A1111's mask_blur default
DEFAULT_FULL_RES_PADDING = 32  # A1111's inpaint_full_res_padding default

Box = tuple[int, int, int, int]  # left, top, right, bottom (right/bottom exclusive), as PIL's crop boxes


@dataclass(frozen=True)
class MaskReport:
    source: str
    format: str
    bytes: int
    input_size: tuple[int, int]  # after EXIF orientation
    exif_orientation: int
    read_from: str  # "alpha" | "luminance"
    threshold: int
    repaint_fraction: float  # share of the generation-size mask that is repainted
    warnings: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "format": self.format,
            "bytes": self.bytes,
            "input_size": list(self.input_size),
            "exif_orientation": self.exif_orientation,
            "read_from": self.read_from,
            "threshold": self.threshold,
            "repaint_fraction": self.repaint_fraction,
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class MaskInput:
    mask: Image.Image  # mode "L", 0 or 255 only, the image's generation size
    report: MaskReport


def mask_luminance(image: Image.Image) -> tuple[Image.Image, str]:
    """The mask's repaint strength (mode L) under the alpha rule above, and which channel it came from."""
    if image.mode.startswith("I"):  # 16-bit grey: scale, PIL's convert would clip
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L"), "luminance"
    if has_transparency(image):
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            return alpha, "alpha"
    return image.convert("L"), "luminance"


def binarize(mask: Image.Image, threshold: int = DEFAULT_MASK_THRESHOLD) -> Image.Image:
    """Mode L with 255 where `mask` is above `threshold` (repaint) and 0 elsewhere."""
    lut = [255 if v > threshold else 0 for v in range(256)]
    return mask.convert("L").point(lut)


def _nothing_to_repaint(where: str) -> ImageInvalid:
    return ImageInvalid(
        f"{where}: the mask has nothing to repaint (no pixel above the threshold); paint the area to repaint "
        "white (or opaque, on a transparent mask)"
    )


def load_mask_input(
    value: object,
    limits: ImageInputLimits,
    *,
    like: InputImage,
    threshold: int = DEFAULT_MASK_THRESHOLD,
    field_name: str = "mask",
    resolver: Resolver | None = None,
    s3_client: Any | None = None,
) -> MaskInput:
    """A job's mask field, read with the image input rules (sources, limits, format, EXIF orientation),
    brought to `like`'s geometry (the same crop and size as the image it masks) and binarized.

    The mask must have the image's aspect ratio (after EXIF orientation, within a pixel of rounding); a
    mask of another size with that aspect is scaled. ImageInvalid otherwise, or when nothing is left to
    repaint."""
    source = read_image_source(value, limits, field_name=field_name, resolver=resolver, s3_client=s3_client)
    opened = open_image(source.data, limits, source.where)
    strength, read_from = mask_luminance(opened.image)
    mw, mh = strength.size
    iw, ih = like.report.input_size
    # Same aspect ratio when either side, scaled to the other's, lands within a pixel.
    if abs(mh * iw / mw - ih) > 1 and abs(mw * ih / mh - iw) > 1:
        raise ImageInvalid(
            f"{source.where}: the mask is {mw}×{mh} but the image is {iw}×{ih} (after EXIF orientation); "
            "send a mask of the image's size"
        )
    sx, sy = mw / iw, mh / ih
    left, top, right, bottom = like.report.crop
    crop = (left * sx, top * sy, right * sx, bottom * sy)
    mask = binarize(resize_to(strength, like.report.size, crop), threshold)
    repainted = int(np.count_nonzero(np.asarray(mask)))
    if repainted == 0:
        raise _nothing_to_repaint(source.where)
    warnings = list(opened.warnings)
    if (mw, mh) != (iw, ih):
        warnings.append(f"{source.where}: the mask is {mw}×{mh}, the image {iw}×{ih}; the mask was scaled")
    report = MaskReport(
        source=source.kind,
        format=opened.format,
        bytes=len(source.data),
        input_size=(mw, mh),
        exif_orientation=opened.exif_orientation,
        read_from=read_from,
        threshold=threshold,
        repaint_fraction=round(repainted / (mask.width * mask.height), 6),
        warnings=tuple(warnings),
    )
    return MaskInput(mask, report)


# -------------------------------------------------------------------------------------- feathering


def feather_px(blur: float) -> int:
    """How far (pixels, along rows, columns or diagonals) a feather of standard deviation `blur` reaches
    outside the mask: A1111's Gaussian kernel radius, int(2.5 σ + 0.5)."""
    return int(2.5 * blur + 0.5) if blur > 0 else 0


def _dilate(binary: np.ndarray, reach: int) -> np.ndarray:
    """`binary` grown by `reach` pixels in every direction (a square neighbourhood), via an integral image.

    By hand because PIL's MaxFilter costs (2·reach+1)² per pixel (minutes for a 160-pixel reach on a
    megapixel mask) and scipy is not a worker dependency."""
    if reach <= 0:
        return binary.copy()
    k = 2 * reach + 1
    padded = np.pad(binary.astype(np.int64), reach)
    integral = np.zeros((padded.shape[0] + 1, padded.shape[1] + 1), dtype=np.int64)
    integral[1:, 1:] = padded.cumsum(0).cumsum(1)
    window = integral[k:, k:] - integral[:-k, k:] - integral[k:, :-k] + integral[:-k, :-k]
    return window > 0


def feather(mask: Image.Image, blur: float) -> Image.Image:
    """The binary `mask` with a Gaussian feather of standard deviation `blur` (PIL's GaussianBlur), cut
    to 0 beyond feather_px(blur) pixels from the mask; the mask itself when `blur` is 0."""
    binary = np.asarray(mask.convert("L")) > 127
    if blur <= 0:
        return Image.fromarray(np.where(binary, 255, 0).astype(np.uint8), "L")
    blurred = np.asarray(
        Image.fromarray(np.where(binary, 255, 0).astype(np.uint8), "L").filter(ImageFilter.GaussianBlur(blur))
    )
    near = _dilate(binary, feather_px(blur))
    return Image.fromarray(np.where(near, blurred, 0).astype(np.uint8), "L")


# --------------------------------------------------------------------------------- full-res crop box


def _grow(lo: int, hi: int, want: int, limit: int) -> tuple[int, int]:
    """[lo, hi) widened to `want` (at most `limit`) around its centre, shifted back inside [0, limit)."""
    want = min(want, limit)
    extra = want - (hi - lo)
    if extra <= 0:
        return lo, hi
    lo -= extra // 2
    hi += extra - extra // 2
    if hi > limit:
        lo -= hi - limit
        hi = limit
    if lo < 0:
        hi -= lo
        lo = 0
    return lo, hi


def expand_to_aspect(box: Box, size: tuple[int, int], image_size: tuple[int, int]) -> Box:
    """`box` grown along one axis to `size`'s aspect ratio (rounding up), centred, kept inside the image;
    when the image is too small for that, the box is the image's whole extent along that axis (and the
    aspect is not exact). A1111's expand_crop_region."""
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    tw, th = size
    iw, ih = image_size
    if bw * th > bh * tw:  # wider than the target: grow the height
        y1, y2 = _grow(y1, y2, math.ceil(bw * th / tw), ih)
    elif bw * th < bh * tw:
        x1, x2 = _grow(x1, x2, math.ceil(bh * tw / th), iw)
    return (x1, y1, x2, y2)


def crop_region(alpha: Image.Image, padding: int, size: tuple[int, int]) -> Box:
    """The full-res crop box: the bounding box of the feathered mask's nonzero pixels, `padding` pixels
    wider on each side (clamped to the image), expanded to `size`'s aspect ratio."""
    bbox = alpha.getbbox()
    if bbox is None:
        raise _nothing_to_repaint("mask")
    iw, ih = alpha.size
    x1, y1, x2, y2 = bbox
    padded = (max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, iw), min(y2 + padding, ih))
    return expand_to_aspect(padded, size, (iw, ih))


# ------------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class InpaintPlan:
    """What to generate for one inpainting job, and how to put it back (`finish_inpaint`)."""

    original: Image.Image  # RGB, the input image at the output size
    overlay_alpha: Image.Image  # L, original's size: the feathered mask (255 takes the generated pixel)
    image: Image.Image  # RGB, the pipeline's `image`: the crop resized to the generation size, or original
    mask: Image.Image  # L, the pipeline's `mask_image`: overlay_alpha cropped and resized like `image`
    crop_box: Box | None  # in original's pixels; None without full_res
    blur: float
    feather_px: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "mask_blur": self.blur,
            "feather_px": self.feather_px,
            "full_res": self.crop_box is not None,
            "crop_box": list(self.crop_box) if self.crop_box is not None else None,
            "generation_size": list(self.image.size),
        }


def plan_inpaint(
    image: Image.Image,
    mask: Image.Image,
    *,
    blur: float = DEFAULT_MASK_BLUR,
    full_res: bool = False,
    padding: int = DEFAULT_FULL_RES_PADDING,
    generation_size: tuple[int, int] | None = None,
) -> InpaintPlan:
    """Prepare an inpainting generation from the input `image` (RGB) and its binary `mask` (L, same size).

    Without `full_res` the whole image is generated at its own size. With it (A1111's "only masked"), the
    crop box around the feathered mask (`crop_region`, `padding`) is scaled to `generation_size` (default:
    the image's size), so a small masked area is repainted at full resolution."""
    if image.size != mask.size:
        raise ValueError(f"image {image.size} and mask {mask.size} differ in size")
    if blur < 0 or padding < 0:
        raise ValueError("blur and padding must be >= 0")
    original = image.convert("RGB")
    alpha = feather(mask, blur)
    if alpha.getbbox() is None:
        raise _nothing_to_repaint("mask")
    size = generation_size or original.size
    if not full_res:
        if size != original.size:
            raise ValueError("without full_res the generation size is the image's own")
        return InpaintPlan(original, alpha, original, alpha, None, blur, feather_px(blur))
    box = crop_region(alpha, padding, size)
    crop = tuple(float(v) for v in box)
    return InpaintPlan(
        original,
        alpha,
        original.resize(size, Image.Resampling.LANCZOS, box=crop),
        alpha.resize(size, Image.Resampling.LANCZOS, box=crop),
        box,
        blur,
        feather_px(blur),
    )


def finish_inpaint(plan: InpaintPlan, generated: Image.Image) -> Image.Image:
    """The output image: `generated` (what the pipeline made from plan.image) scaled back into the crop
    box when there is one, composited over plan.original through plan.overlay_alpha. Pixels where the
    alpha is 0 are the original's, bit for bit."""
    if generated.size != plan.image.size:
        raise ValueError(f"generated image is {generated.size}, the plan generates {plan.image.size}")
    generated = generated.convert("RGB")
    if plan.crop_box is None:
        canvas = generated
    else:
        x1, y1, x2, y2 = plan.crop_box
        canvas = plan.original.copy()
        canvas.paste(generated.resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS), (x1, y1))
    return Image.composite(canvas, plan.original, plan.overlay_alpha)
