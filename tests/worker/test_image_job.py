"""A job's pictures made ready for its mode (worker/image_job.py): read under the worker's settings, sized
by the job's width/height, planned for inpainting; RunPod's body limit on inline pictures."""

from __future__ import annotations

import pytest
from PIL import Image

from fuseline.core.catalog.model import Defaults
from tests.worker.image_samples import b64, encoded, halves
from worker.errors import ImageFetchFailed, ImageInvalid, InvalidInput
from worker.image_job import RUNSYNC_BODY_LIMIT, load_image_job
from worker.inputs import parse_input, resolve_parameters
from worker.settings import WorkerSettings

SETTINGS = WorkerSettings(min_size=64, max_pixels=256 * 256, input_buckets=None)
RED, BLUE = (220, 20, 20), (20, 20, 220)


def request(settings: WorkerSettings = SETTINGS, **fields):
    return parse_input({"template": "t", "prompt": "a fox", **fields}, settings)


def picture(size=(128, 64)) -> str:
    return b64(encoded(halves(size, RED, BLUE), "PNG"))


def test_a_txt2img_job_has_no_pictures() -> None:
    assert load_image_job(request(), SETTINGS) is None


def test_the_image_is_read_and_sized_by_the_jobs_width() -> None:
    job = load_image_job(request(image=picture((128, 64)), width=64), SETTINGS)
    assert job is not None and job.size == (64, 64)  # height follows the aspect ratio: 32, up to the min 64
    report = job.report()["image"]
    assert (report["source"], report["size_rule"], report["input_size"], report["resized"]) == (
        "base64",
        "width",
        [128, 64],
        True,
    )
    assert job.mask is None and job.plan is None


def test_an_inpaint_job_gets_its_mask_and_then_its_plan() -> None:
    mask = Image.new("L", (128, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    raw = {"image": picture(), "mask": "data:image/png;base64," + b64(encoded(mask, "PNG")), "mask_blur": 0}
    job = load_image_job(request(**raw), SETTINGS)
    assert job is not None and job.size == (128, 64)
    params = resolve_parameters(request(**raw), "t", Defaults(), SETTINGS, image_size=job.size)
    planned = job.planned(params)
    assert planned.plan is not None and planned.plan.image.size == (128, 64)
    report = planned.report()
    assert report["mask"]["source"] == "data_url" and report["mask"]["repaint_fraction"] == 0.25
    assert report["inpaint"] == {
        "mask_blur": 0.0,
        "feather_px": 0,
        "full_res": False,
        "crop_box": None,
        "generation_size": [128, 64],
    }


def test_inline_pictures_over_runpods_runsync_limit_are_refused_before_decoding() -> None:
    # Not even base64: the size alone decides, before anything is decoded.
    huge = "A" * (RUNSYNC_BODY_LIMIT + 1)
    with pytest.raises(ImageInvalid) as info:
        load_image_job(request(image=huge), SETTINGS)
    message = str(info.value)
    assert message.startswith(f"[IMAGE_INVALID] image: {RUNSYNC_BODY_LIMIT + 1} characters of inline")
    assert "RunPod's request limit of 20000000 bytes for /runsync" in message
    assert "https:// URL or an s3:// object instead" in message
    # Image and mask count together, as they travel in one request body.
    half = "A" * (RUNSYNC_BODY_LIMIT // 2 + 1)
    with pytest.raises(ImageInvalid, match=r"image and mask: 20000002 characters"):
        load_image_job(request(image=half, mask=half), SETTINGS)


def test_urls_do_not_count_toward_the_inline_limit() -> None:
    # A URL is fetched (here: refused, loopback), never measured against the body limit.
    with pytest.raises(ImageFetchFailed, match="loopback"):
        load_image_job(request(image="https://127.0.0.1:9/" + "a" * 100), SETTINGS)


def test_a_requested_size_over_the_budget_is_refused_before_any_picture_is_read() -> None:
    with pytest.raises(InvalidInput, match=r"128x1024 = 131072 pixels exceeds the budget of 65536"):
        load_image_job(
            request(image="https://127.0.0.1:9/never-fetched.png", width=128, height=1024), SETTINGS
        )
    with pytest.raises(InvalidInput, match=r"width: 2048 x at least 64 \(FUSELINE_MIN_SIZE\) exceeds"):
        load_image_job(request(image="https://127.0.0.1:9/never-fetched.png", width=2048), SETTINGS)


def test_the_workers_limits_apply() -> None:
    small = SETTINGS.model_copy(update={"max_input_pixels": 100})
    with pytest.raises(ImageInvalid, match=r"128×64 is 8192 pixels, over the 100-pixel input limit"):
        load_image_job(request(image=picture()), small)


def test_s3_pictures_are_read_with_the_workers_shared_client(s3_server, s3_bucket: str, monkeypatch) -> None:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    s3_server.client().put_object(
        Bucket=s3_bucket, Key="in/pic.png", Body=encoded(halves((64, 64), RED, BLUE), "PNG")
    )
    job = load_image_job(request(image=f"s3://{s3_bucket}/in/pic.png"), SETTINGS)
    assert job is not None and job.report()["image"]["source"] == "s3"
    fenced = SETTINGS.model_copy(update={"input_buckets": frozenset({"elsewhere"})})
    with pytest.raises(ImageFetchFailed, match="FUSELINE_INPUT_BUCKETS"):
        load_image_job(request(image=f"s3://{s3_bucket}/in/pic.png"), fenced)
