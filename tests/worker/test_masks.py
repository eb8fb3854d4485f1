"""Inpainting masks on small synthetic images with exact expectations: the alpha rule, the threshold, the
feather and its reach, A1111's full-res crop box, and the paste back (unmasked pixels bit for bit)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.worker.image_samples import b64, encoded, halves, jpeg_with_orientation
from worker.errors import ImageInvalid
from worker.image_inputs import ImageInputLimits, SizeBounds, load_image_input
from worker.masks import (
    _dilate,
    binarize,
    crop_region,
    expand_to_aspect,
    feather,
    feather_px,
    finish_inpaint,
    load_mask_input,
    mask_luminance,
    plan_inpaint,
)

BOUNDS = SizeBounds(min_side=64, max_side=2048, max_pixels=1536 * 1536)
LIMITS = ImageInputLimits()
GREEN = (10, 200, 30)


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def square_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def chebyshev_distance_over(mask: np.ndarray, reach: int) -> np.ndarray:
    """Pixels farther than `reach` (rows, columns, diagonals) from every mask pixel, by brute force."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    yy, xx = np.mgrid[0:h, 0:w]
    distance = np.full((h, w), np.inf)
    for y, x in zip(ys, xs, strict=True):
        distance = np.minimum(distance, np.maximum(abs(yy - y), abs(xx - x)))
    return distance > reach


# ------------------------------------------------------------------------------- reading and rules


def test_an_opaque_mask_is_read_from_its_luminance() -> None:
    mask = Image.new("RGB", (4, 1), (0, 0, 0))
    mask.putpixel((1, 0), (255, 255, 255))
    mask.putpixel((2, 0), (128, 128, 128))
    strength, read_from = mask_luminance(mask)
    assert (read_from, list(strength.tobytes())) == ("luminance", [0, 255, 128, 0])


def test_a_mask_with_transparency_is_read_from_its_alpha_whatever_the_colours() -> None:
    mask = Image.new("RGBA", (3, 1), (255, 255, 255, 0))  # transparent white: keep
    mask.putpixel((1, 0), (0, 0, 0, 255))  # opaque black stroke: repaint
    mask.putpixel((2, 0), (0, 0, 0, 100))
    strength, read_from = mask_luminance(mask)
    assert (read_from, list(strength.tobytes())) == ("alpha", [0, 255, 100])


def test_binarize_repaints_above_the_threshold() -> None:
    mask = Image.frombytes("L", (5, 1), bytes([0, 127, 128, 129, 255]))
    assert list(binarize(mask).tobytes()) == [0, 0, 0, 255, 255]
    assert list(binarize(mask, threshold=0).tobytes()) == [0, 255, 255, 255, 255]


# ---------------------------------------------------------------------------------------- feather


def test_no_blur_keeps_the_binary_mask() -> None:
    mask = square_mask((16, 16), (4, 4, 8, 8))
    assert feather(mask, 0).tobytes() == mask.tobytes()
    assert feather_px(0) == 0


@pytest.mark.parametrize("blur", [1, 2, 4, 6.5])
def test_the_feather_stops_at_its_reach_and_keeps_the_core(blur: float) -> None:
    mask = square_mask((120, 120), (30, 30, 90, 90))
    alpha = np.asarray(feather(mask, blur))
    reach = feather_px(blur)
    assert reach == int(2.5 * blur + 0.5)
    binary = np.asarray(mask) > 0
    assert not alpha[chebyshev_distance_over(binary, reach)].any()  # farther than the reach: exactly 0
    assert alpha[29, 60] > 0  # just outside the edge: feathered
    assert 0 < alpha[30, 60] < 255  # on the edge
    assert alpha[60, 60] == 255  # the core (30 px, over 4.5 σ, from the edge)


@pytest.mark.parametrize("reach", [1, 2, 5])
def test_dilate_matches_brute_force(reach: int) -> None:
    rng = np.random.default_rng(reach)
    binary = rng.random((23, 31)) > 0.97
    assert np.array_equal(_dilate(binary, reach), ~chebyshev_distance_over(binary, reach))


# ------------------------------------------------------------------------------------ crop region


@pytest.mark.parametrize(
    ("image_size", "mask_box", "padding", "size", "expected"),
    [
        # 4×4 square, padded by 2 to 8×8, widened to 2:1 around its centre.
        ((32, 16), (10, 5, 14, 9), 2, (32, 16), (4, 3, 20, 11)),
        # At the right edge: widened, then shifted back inside the image.
        ((32, 16), (28, 5, 32, 9), 2, (32, 16), (16, 3, 32, 11)),
        # A tall stripe needs more width than is left of centre: shifted right from 0.
        ((32, 16), (10, 0, 12, 16), 2, (32, 16), (0, 0, 32, 16)),
        # A wide stripe and a 1:2 target: grown in height.
        ((32, 32), (8, 14, 24, 18), 0, (16, 32), (8, 0, 24, 32)),
        # The aspect cannot be reached inside the image: the whole height, aspect not exact.
        ((32, 16), (0, 0, 32, 16), 4, (16, 16), (0, 0, 32, 16)),
    ],
)
def test_crop_region(image_size, mask_box, padding, size, expected) -> None:
    assert crop_region(square_mask(image_size, mask_box), padding, size) == expected


def test_expand_to_aspect_leaves_a_matching_box_alone() -> None:
    assert expand_to_aspect((2, 2, 10, 6), (64, 32), (100, 100)) == (2, 2, 10, 6)


def test_an_empty_mask_has_no_crop_region() -> None:
    with pytest.raises(ImageInvalid, match="nothing to repaint"):
        crop_region(Image.new("L", (8, 8)), 4, (8, 8))


# --------------------------------------------------------------------------------- plan and finish


def test_whole_image_inpainting_keeps_unmasked_pixels_exactly() -> None:
    original = noise((64, 32))
    mask = square_mask((64, 32), (16, 8, 32, 24))
    plan = plan_inpaint(original, mask, blur=2)
    assert (plan.crop_box, plan.image.tobytes(), plan.feather_px) == (None, original.tobytes(), 5)
    assert plan.mask.tobytes() == plan.overlay_alpha.tobytes()
    out = np.asarray(finish_inpaint(plan, Image.new("RGB", (64, 32), GREEN)))
    alpha = np.asarray(plan.overlay_alpha)
    far = chebyshev_distance_over(np.asarray(mask) > 0, plan.feather_px)
    assert np.array_equal(out[alpha == 0], np.asarray(original)[alpha == 0])
    assert far.sum() == 64 * 32 - 26 * 26  # the 16×16 square grown by 5 on each side
    assert (alpha[far] == 0).all()  # everything beyond the feather is the input
    assert (out[alpha == 255] == GREEN).all()
    assert plan.as_dict() == {
        "mask_blur": 2,
        "feather_px": 5,
        "full_res": False,
        "crop_box": None,
        "generation_size": [64, 32],
    }


def test_full_res_inpainting_generates_the_crop_and_pastes_it_back() -> None:
    original = noise((64, 32), seed=1)
    mask = square_mask((64, 32), (40, 10, 44, 14))
    plan = plan_inpaint(original, mask, blur=0, full_res=True, padding=4)
    # bbox (40,10,44,14) + 4 -> (36,6,48,18), 12×12, widened to 2:1 -> 24×12 around x=42.
    assert plan.crop_box == (30, 6, 54, 18)
    assert plan.image.size == plan.mask.size == (64, 32)
    assert (
        plan.image.tobytes()
        == original.resize((64, 32), Image.Resampling.LANCZOS, box=(30, 6, 54, 18)).tobytes()
    )
    mask_for_pipeline = np.asarray(plan.mask)
    # The square at x 40-44, y 10-14 lands at x 26.7-37.3, y 10.7-21.3 of the 2.67× crop.
    assert mask_for_pipeline[12:20, 28:36].min() > 200
    # Lanczos reaches 3 source pixels (8 here) beyond the edges.
    assert mask_for_pipeline[:, :18].max() == 0 and mask_for_pipeline[:, 46:].max() == 0
    out = finish_inpaint(plan, Image.new("RGB", (64, 32), GREEN))
    result, source = np.asarray(out), np.asarray(original)
    binary = np.asarray(mask) > 0
    assert (result[binary] == GREEN).all()  # a flat colour survives Lanczos both ways exactly
    assert np.array_equal(result[~binary], source[~binary])  # no blur: everything else is the input


def test_full_res_with_a_feather_changes_nothing_outside_the_crop_box() -> None:
    original = noise((128, 64), seed=2)
    mask = square_mask((128, 64), (60, 20, 70, 30))
    plan = plan_inpaint(original, mask, blur=3, full_res=True, padding=8, generation_size=(256, 128))
    x1, y1, x2, y2 = plan.crop_box
    assert plan.image.size == (256, 128) and (x2 - x1) == 2 * (y2 - y1)
    out = np.asarray(finish_inpaint(plan, noise((256, 128), seed=3)))
    source = np.asarray(original)
    outside = np.ones(source.shape[:2], bool)
    outside[y1:y2, x1:x2] = False
    assert np.array_equal(out[outside], source[outside])
    far = chebyshev_distance_over(np.asarray(mask) > 0, plan.feather_px)
    assert np.array_equal(out[far], source[far])
    assert not np.array_equal(out[25, 65], source[25, 65])


def test_plan_refusals() -> None:
    image = noise((16, 16))
    with pytest.raises(ImageInvalid, match="nothing to repaint"):
        plan_inpaint(image, Image.new("L", (16, 16)))
    with pytest.raises(ValueError, match="differ in size"):
        plan_inpaint(image, Image.new("L", (8, 16)))
    plan = plan_inpaint(image, square_mask((16, 16), (0, 0, 4, 4)))
    with pytest.raises(ValueError, match="generated image is"):
        finish_inpaint(plan, Image.new("RGB", (8, 8)))


# ---------------------------------------------------------------------------------- loading a mask


def test_a_mask_follows_its_images_crop_and_size() -> None:
    # 300×100 image, 64×64 requested: the centre 100×100 is used. The mask (150×50, same aspect) marks
    # the image's centre third, whose left half only is repainted.
    image = load_image_input(b64(encoded(noise((300, 100)), "PNG")), LIMITS, BOUNDS, width=64, height=64)
    mask_image = Image.new("L", (150, 50), 0)
    mask_image.paste(255, (50, 0, 75, 50))
    mask = load_mask_input(b64(encoded(mask_image, "PNG")), LIMITS, like=image)
    assert mask.mask.size == (64, 64)
    values = np.asarray(mask.mask)
    assert set(np.unique(values)) == {0, 255}
    assert values[:, :30].min() == 255 and values[:, 34:].max() == 0
    assert mask.report.warnings == (
        "mask (base64): the mask is 150×50, the image 300×100; the mask was scaled",
    )
    assert mask.report.as_dict()["read_from"] == "luminance"
    assert 0.45 < mask.report.repaint_fraction < 0.55


def test_a_mask_of_another_aspect_ratio_is_refused() -> None:
    image = load_image_input(b64(encoded(noise((128, 64)), "PNG")), LIMITS, BOUNDS)
    with pytest.raises(ImageInvalid, match=r"the mask is 64×64 but the image is 128×64"):
        load_mask_input(b64(encoded(Image.new("L", (64, 64), 255), "PNG")), LIMITS, like=image)


def test_an_all_black_mask_is_refused() -> None:
    image = load_image_input(b64(encoded(noise((64, 64)), "PNG")), LIMITS, BOUNDS)
    with pytest.raises(ImageInvalid, match=r"mask \(base64\): the mask has nothing to repaint"):
        load_mask_input(b64(encoded(Image.new("L", (64, 64), 0), "PNG")), LIMITS, like=image)


def test_a_transparent_layer_mask_and_an_exif_rotated_mask() -> None:
    image = load_image_input(b64(encoded(noise((64, 128)), "PNG")), LIMITS, BOUNDS)
    layer = Image.new("RGBA", (64, 128), (0, 0, 0, 0))
    layer.paste((255, 0, 0, 255), (0, 0, 64, 64))  # red strokes over the top half
    from_alpha = load_mask_input(b64(encoded(layer, "PNG")), LIMITS, like=image)
    assert from_alpha.report.read_from == "alpha"
    # Stored 128×64 white|black, EXIF orientation 6: shown as 64×128, white on top.
    rotated = jpeg_with_orientation(halves((128, 64), (255, 255, 255), (0, 0, 0)), 6)
    from_jpeg = load_mask_input(b64(rotated), LIMITS, like=image)
    assert from_jpeg.report.exif_orientation == 6
    for mask in (from_alpha.mask, from_jpeg.mask):
        values = np.asarray(mask)
        assert values[:60].min() == 255 and values[68:].max() == 0
