"""Generation in each mode through the worker (worker/generate.py), on the kit's tiny templates.

"Close to the input" is measured on `tiny-blockvae`, whose VAE reproduces 8x8-block pictures exactly
(testkit.block_vae): the kit's random VAE turns any picture into an unrelated one, which no img2img could
undo. Tolerances, with what was measured on CPU (64 px, seed 1, three random block pictures):

- img2img, strength 0.05 (20 steps: 1 denoising step): mean |output - input| <= 4 levels of 255 and
  max <= 16 (measured 2.15-2.27 mean, 8 max);
- img2img, strength 1.0: the output no longer follows the input: correlation with it below 0.3 (measured
  -0.01 to 0.17, against 0.999 at 0.05), and two opposite inputs (every pixel inverted, 120-132 levels
  apart) give outputs within 25% of that distance of each other (measured 14-15%: diffusers starts
  strength 1.0 from the image plus full noise, and the tiny random UNet does not remove what is left);
- inpainting: every pixel farther than the feather (int(2.5 x mask_blur + 0.5) px) from the mask equals
  the input exactly (tolerance 0), masked pixels change (mean >= 20 levels; measured 58-63). The VAE
  round-trip error bounds what the pipeline's own unmasked latents can reproduce; with the block VAE it
  is 0 and the pipeline output before the paste-back matched it (0.0 mean on the ordinary checkpoint).
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from tests.worker.conftest import BLOCK_VAE_TEMPLATE, INPAINT_TEMPLATE, TEMPLATE
from tests.worker.image_samples import b64, encoded
from worker.image_job import load_image_job
from worker.inputs import parse_input, resolve_parameters
from worker.mode_pipelines import mode_pipeline

STRENGTH_005_MEAN, STRENGTH_005_MAX = 4.0, 16
STRENGTH_1_MAX_CORRELATION, STRENGTH_1_MAX_SHARE = 0.3, 0.25
MASKED_MIN_CHANGE = 20.0


def block_picture(seed: int, blocks: tuple[int, int] = (8, 8)) -> np.ndarray:
    """Random colours in 8x8 blocks: a picture the block VAE reproduces exactly."""
    colours = np.random.default_rng(seed).integers(0, 256, (blocks[1], blocks[0], 3)).astype(np.uint8)
    return np.kron(colours, np.ones((8, 8, 1), np.uint8))


def png64(pixels: np.ndarray) -> str:
    return b64(encoded(Image.fromarray(pixels), "PNG"))


def decode(image: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(image["data"]))), dtype=np.float64)


def centre_mask(size: int = 64, inset: int = 16) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[inset : size - inset, inset : size - inset] = 255
    return mask


def far_from(mask: np.ndarray, reach: int) -> np.ndarray:
    """Pixels more than `reach` pixels (rows, columns or diagonals) from every masked pixel."""
    ys, xs = np.nonzero(mask)
    far = np.ones(mask.shape, bool)
    far[max(ys.min() - reach, 0) : ys.max() + reach + 1, max(xs.min() - reach, 0) : xs.max() + reach + 1] = (
        False
    )
    return far


# ----------------------------------------------------------------------------------------- img2img


@pytest.mark.parametrize("picture_seed", [0, 1])
def test_img2img_at_strength_005_stays_close_to_the_input(modes_worker, picture_seed: int) -> None:
    picture = block_picture(picture_seed)
    result = modes_worker.run(
        {
            "template": BLOCK_VAE_TEMPLATE,
            "prompt": "a fox",
            "image": png64(picture),
            "strength": 0.05,
            "steps": 20,
            "seed": 1,
        }
    )
    difference = np.abs(decode(result["images"][0]) - picture)
    assert difference.mean() <= STRENGTH_005_MEAN and difference.max() <= STRENGTH_005_MAX, (
        difference.mean(),
        difference.max(),
    )
    assert result["mode"] == "img2img" and result["report"]["effective_steps"] == 1
    assert result["parameters"]["strength"] == 0.05


def test_img2img_at_strength_1_no_longer_follows_the_input(modes_worker) -> None:
    picture = block_picture(0)
    job = {"template": BLOCK_VAE_TEMPLATE, "prompt": "a fox", "strength": 1.0, "steps": 20, "seed": 1}
    out = decode(modes_worker.run({**job, "image": png64(picture)})["images"][0])
    out_inverted = decode(modes_worker.run({**job, "image": png64(255 - picture)})["images"][0])
    correlation = np.corrcoef(out.ravel(), picture.ravel().astype(np.float64))[0, 1]
    inputs_apart = np.abs(picture - (255.0 - picture)).mean()
    assert correlation < STRENGTH_1_MAX_CORRELATION, correlation
    assert np.abs(out - out_inverted).mean() < STRENGTH_1_MAX_SHARE * inputs_apart
    # ...while at 0.05 the two outputs are as far apart as their inputs.
    low = {**job, "strength": 0.05}
    a = decode(modes_worker.run({**low, "image": png64(picture)})["images"][0])
    b = decode(modes_worker.run({**low, "image": png64(255 - picture)})["images"][0])
    assert np.abs(a - b).mean() > 0.9 * inputs_apart


def test_img2img_is_deterministic_and_reports_what_it_did(modes_worker) -> None:
    job = {
        "template": BLOCK_VAE_TEMPLATE,
        "prompt": "a fox",
        "image": png64(block_picture(3, (16, 8))),
        "steps": 8,
        "seed": 5,
    }
    first = modes_worker.run(job)
    assert modes_worker.run(job)["images"][0]["data"] == first["images"][0]["data"]
    assert modes_worker.run({**job, "seed": 6})["images"][0]["data"] != first["images"][0]["data"]
    entry, _ = modes_worker.cache.get(BLOCK_VAE_TEMPLATE)
    # The reported steps are the ones the pipeline ran: int(8 x 0.75) = 6.
    assert first["report"]["effective_steps"] == 6 == mode_pipeline(entry, "img2img").num_timesteps
    assert first["report"]["size"] == [128, 64] and first["parameters"]["width"] == 128
    report = first["report"]["image"]
    assert (report["size_rule"], report["input_size"], report["resized"]) == ("input", [128, 64], False)
    assert set(first["timings_ms"]) == {"inputs", "load", "inference", "decode", "encode", "total"}


def test_each_img2img_image_of_a_batch_can_be_redone_alone(modes_worker) -> None:
    job = {"template": BLOCK_VAE_TEMPLATE, "prompt": "a fox", "image": png64(block_picture(4)), "steps": 4}
    batch = modes_worker.run({**job, "seed": 100, "num_images": 2})["images"]
    alone = decode(modes_worker.run({**job, "seed": 101})["images"][0])
    assert [image["seed"] for image in batch] == [100, 101]
    assert np.abs(alone - decode(batch[1])).max() <= 2


# ---------------------------------------------------------------------------------------- inpaint


@pytest.mark.parametrize("template", [BLOCK_VAE_TEMPLATE, INPAINT_TEMPLATE])
def test_inpainting_keeps_the_unmasked_pixels_and_repaints_the_masked_ones(
    modes_worker, template: str
) -> None:
    picture, mask = block_picture(0), centre_mask()
    job = {
        "template": template,
        "prompt": "a fox",
        "image": png64(picture),
        "mask": png64(mask),
        "steps": 10,
        "seed": 1,
    }
    result = modes_worker.run(job)
    out = decode(result["images"][0])
    feather = result["report"]["inpaint"]["feather_px"]
    assert feather == 10  # mask_blur 4: int(2.5 x 4 + 0.5)
    assert np.abs(out - picture)[far_from(mask, feather)].max() == 0
    assert np.abs(out - picture)[mask > 0].mean() >= MASKED_MIN_CHANGE
    assert modes_worker.run(job)["images"][0]["data"] == result["images"][0]["data"]
    assert result["mode"] == "inpaint" and result["report"]["effective_steps"] == 7
    assert result["report"]["mask"]["repaint_fraction"] == 0.25
    assert result["parameters"]["mask_blur"] == 4 and result["parameters"]["inpaint_full_res"] is False


def test_the_ordinary_checkpoints_unmasked_latents_come_back_within_the_vae_round_trip(modes_worker) -> None:
    """Before the paste-back: the inpainting pipeline keeps the unmasked latents of the input, so its own
    output there is the input's VAE round trip (0 with the block VAE, for a block picture)."""
    picture, mask = block_picture(0), centre_mask()
    raw = {
        "template": BLOCK_VAE_TEMPLATE,
        "prompt": "a fox",
        "image": png64(picture),
        "mask": png64(mask),
        "steps": 10,
    }
    request = parse_input(raw, modes_worker.settings)
    image_job = load_image_job(request, modes_worker.settings)
    entry, _ = modes_worker.cache.get(BLOCK_VAE_TEMPLATE)
    params = resolve_parameters(
        request, BLOCK_VAE_TEMPLATE, entry.folder.defaults, modes_worker.settings, image_size=image_job.size
    )
    plan = image_job.planned(params).plan
    import torch

    generated = mode_pipeline(entry, "inpaint")(
        prompt="a fox",
        image=plan.image,
        mask_image=plan.mask,
        strength=0.75,
        num_inference_steps=10,
        generator=torch.Generator().manual_seed(1),
    ).images[0]
    difference = np.abs(np.asarray(generated, dtype=np.float64) - picture)
    # One latent (8 px) away from the mask, the latent blend holds the input's latents exactly.
    assert difference[far_from(mask, 8)].max() <= 1


def test_only_masked_inpainting_generates_the_crop_and_keeps_the_rest(modes_worker) -> None:
    picture = block_picture(1, (16, 16))  # 128 x 128
    mask = np.zeros((128, 128), np.uint8)
    mask[8:24, 96:120] = 255
    job = {
        "template": BLOCK_VAE_TEMPLATE,
        "prompt": "a fox",
        "image": png64(picture),
        "mask": png64(mask),
        "steps": 4,
        "seed": 2,
        "inpaint_full_res": True,
        "inpaint_full_res_padding": 8,
        "mask_blur": 2,
    }
    result = modes_worker.run(job)
    out = decode(result["images"][0])
    inpaint = result["report"]["inpaint"]
    assert inpaint["full_res"] is True and inpaint["generation_size"] == [128, 128]
    left, top, right, bottom = inpaint["crop_box"]
    assert left <= 96 - 8 and right >= 120 + 8 and top == 0 and bottom <= 128
    assert np.abs(out - picture)[far_from(mask, inpaint["feather_px"])].max() == 0
    assert np.abs(out - picture)[mask > 0].mean() >= MASKED_MIN_CHANGE


# ----------------------------------------------------------------------------------------- hires


@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
def test_hires_returns_the_scaled_size_and_reports_both_passes(modes_worker, upscaler: str) -> None:
    job = {"template": TEMPLATE, "prompt": "a fox", "width": 64, "height": 64, "steps": 4, "seed": 3}
    result = modes_worker.run({**job, "hires": {"scale": 2, "strength": 0.5, "upscaler": upscaler}})
    image = Image.open(io.BytesIO(base64.b64decode(result["images"][0]["data"])))
    assert image.size == (128, 128)
    assert result["parameters"]["width"] == 64 and result["parameters"]["hires"]["width"] == 128
    assert result["report"]["size"] == [128, 128]
    assert result["report"]["hires"] == {
        "scale": 2.0,
        "strength": 0.5,
        "steps": 4,
        "upscaler": upscaler,
        "effective_steps": 2,
        "from_size": [64, 64],
        "size": [128, 128],
    }
    assert result["timings_ms"]["hires"] > 0
    again = modes_worker.run({**job, "hires": {"scale": 2, "strength": 0.5, "upscaler": upscaler}})
    assert again["images"][0]["data"] == result["images"][0]["data"]


def test_hires_refines_an_img2img_first_pass_too(modes_worker) -> None:
    result = modes_worker.run(
        {
            "template": BLOCK_VAE_TEMPLATE,
            "prompt": "a fox",
            "image": png64(block_picture(2)),
            "steps": 4,
            "seed": 1,
            "hires": {"scale": 1.5, "steps": 2, "strength": 0.5},
        }
    )
    assert result["mode"] == "img2img" and result["report"]["size"] == [128, 128]
    assert result["report"]["hires"]["effective_steps"] == 1


def test_progress_runs_over_both_passes_and_ends_at_its_total(modes_worker) -> None:
    seen: list[tuple[int, int]] = []
    modes_worker.run(
        {
            "template": TEMPLATE,
            "prompt": "a fox",
            "width": 64,
            "height": 64,
            "steps": 4,
            "seed": 1,
            "hires": {"scale": 2, "strength": 0.5},
        },
        lambda step, total: seen.append((step, total)),
    )
    assert seen[-1] == (6, 6)  # 4 first-pass steps + int(4 x 0.5) hires steps
    assert [step for step, _ in seen] == [1, 2, 3, 4, 5, 6]
