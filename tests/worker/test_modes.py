"""The image modes' job input (no models): the mode a job names, fields that do not fit it, strength and
effective steps, the hires pass's options and final size, the per-request output place."""

from __future__ import annotations

import re

import pytest

from fuseline.core.catalog.model import Defaults
from worker.errors import InvalidInput, ModeUnsupported, OutputNotAllowed
from worker.inputs import parse_input, resolve_parameters
from worker.modes import check_mode_served, effective_steps, hires_size, steps_problem
from worker.settings import WorkerSettings

SETTINGS = WorkerSettings(min_size=64, output_buckets=frozenset({"team-a"}))
OK = {"template": "t", "prompt": "a fox"}
PICTURE = "iVBORw0KGgo="  # only its presence matters before the pictures are read


def resolved(settings: WorkerSettings = SETTINGS, image_size=None, **fields):
    request = parse_input({**OK, **fields}, settings)
    return resolve_parameters(request, "t", Defaults(), settings, image_size=image_size)


def refused(raw: dict, settings: WorkerSettings = SETTINGS) -> str:
    with pytest.raises(InvalidInput) as info:
        parse_input({**OK, **raw}, settings)
    return str(info.value)


# ------------------------------------------------------------------------------------------- modes


def test_the_mode_is_named_by_what_the_job_sends() -> None:
    assert parse_input(OK, SETTINGS).mode == "txt2img"
    assert parse_input({**OK, "image": PICTURE}, SETTINGS).mode == "img2img"
    assert parse_input({**OK, "image": PICTURE, "mask": PICTURE}, SETTINGS).mode == "inpaint"


def test_fields_that_do_not_fit_the_mode_are_refused_together() -> None:
    message = refused({"strength": 0.5, "mask_blur": 2, "inpaint_full_res": True})
    assert message.startswith("[INVALID_INPUT] 3 problem(s): ")
    assert "strength: only with image (img2img) or image and mask (inpaint)" in message
    assert "mask_blur: only with mask (inpaint)" in message
    assert "inpaint_full_res: only with mask (inpaint)" in message
    assert "mask: needs image (the picture the mask belongs to)" in refused({"mask": PICTURE})
    assert "hires: not with mask (inpaint)" in refused(
        {"image": PICTURE, "mask": PICTURE, "hires": {"scale": 2}}
    )
    assert "inpaint_full_res_padding: only with mask" in refused(
        {"image": PICTURE, "inpaint_full_res_padding": 8}
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"image": PICTURE, "strength": 0}, "strength: Input should be greater than 0 (got 0)"),
        ({"image": PICTURE, "strength": 1.5}, "strength: Input should be less than or equal to 1"),
        ({"image": 42}, "image: Input should be a valid string (got 42)"),
        (
            {"image": PICTURE, "mask": PICTURE, "mask_blur": 65},
            "mask_blur: Input should be less than or equal",
        ),
        ({"image": PICTURE, "mask": PICTURE, "inpaint_full_res_padding": -1}, "greater than or equal to 0"),
        ({"hires": {"scale": 1}}, "hires.scale: Input should be greater than 1 (got 1)"),
        ({"hires": {"scale": 5}}, "hires.scale: Input should be less than or equal to 4"),
        (
            {"hires": {"scale": 2, "upscaler": "esrgan"}},
            "hires.upscaler: Input should be 'latent' or 'lanczos'",
        ),
        (
            {"hires": {"scale": 2, "denoise": 0.5}},
            "hires.denoise: unknown field; valid fields: scale, strength",
        ),
        ({"hires": {"scale": 2, "steps": 0}}, "hires.steps: Input should be greater than or equal to 1"),
    ],
)
def test_malformed_mode_fields_name_the_field(raw: dict, expected: str) -> None:
    assert expected in refused(raw)


def test_image_mode_parameters_are_reported_only_where_they_apply() -> None:
    txt2img = resolved(steps=10).public()
    assert not {
        "strength",
        "mask_blur",
        "inpaint_full_res",
        "inpaint_full_res_padding",
        "hires",
        "mode",
    } & set(txt2img)
    img2img = resolved(image_size=(128, 64), image=PICTURE, steps=10)
    assert (img2img.mode, img2img.strength, img2img.width, img2img.height) == ("img2img", 0.75, 128, 64)
    assert "image" not in img2img.public() and img2img.public()["strength"] == 0.75
    inpaint = resolved(image_size=(64, 64), image=PICTURE, mask=PICTURE, steps=10)
    assert (inpaint.mask_blur, inpaint.inpaint_full_res, inpaint.inpaint_full_res_padding) == (4, False, 32)
    assert {"mask_blur", "inpaint_full_res", "inpaint_full_res_padding"} <= set(inpaint.public())


def test_an_image_decides_the_size_not_the_template_defaults() -> None:
    request = parse_input({**OK, "image": PICTURE}, SETTINGS)
    params = resolve_parameters(
        request, "t", Defaults(width=1024, height=1024), SETTINGS, image_size=(192, 128)
    )
    assert (params.width, params.height) == (192, 128)


# -------------------------------------------------------------------------------- strength, steps


def test_effective_steps_are_diffusers_int_of_steps_times_strength() -> None:
    assert [effective_steps(20, s) for s in (0.05, 0.5, 0.75, 0.99, 1.0)] == [1, 10, 15, 19, 20]
    assert effective_steps(3, 0.3) == 0


def test_a_strength_that_leaves_no_step_is_refused_with_the_fix() -> None:
    with pytest.raises(InvalidInput) as info:
        resolved(image_size=(64, 64), image=PICTURE, strength=0.05, steps=10)
    assert str(info.value) == (
        "[INVALID_INPUT] 1 problem(s): strength: 0.05 x steps 10 leaves no denoising step "
        "(int(10 x 0.05) = 0); raise steps to at least 20 or strength to at least 0.1"
    )
    assert resolved(image_size=(64, 64), image=PICTURE, strength=0.05, steps=20).strength == 0.05
    # The suggested step count really is enough, also where float rounding bites (0.3 x 10 = 2.9999...).
    assert steps_problem("strength", 3, 0.3) is not None and "at least 4" in steps_problem("strength", 3, 0.3)


# ------------------------------------------------------------------------------------------ hires


def test_hires_final_size_is_rounded_to_multiples_of_64() -> None:
    assert hires_size(64, 64, 2) == (128, 128)
    assert hires_size(1024, 768, 1.5) == (1536, 1152)
    assert hires_size(832, 1216, 1.25) == (1024, 1536)


def test_hires_is_resolved_with_the_jobs_steps_and_a1111s_defaults() -> None:
    params = resolved(width=64, height=128, steps=6, hires={"scale": 2})
    assert params.hires is not None
    assert params.hires.model_dump() == {
        "scale": 2.0,
        "strength": 0.7,
        "steps": 6,
        "upscaler": "latent",
        "width": 128,
        "height": 256,
    }
    assert params.public()["hires"]["width"] == 128


def test_the_pixel_budget_applies_to_the_hires_final_size() -> None:
    budget = WorkerSettings(min_size=64, max_pixels=128 * 128)
    assert resolved(budget, width=64, height=64, hires={"scale": 2}).hires.width == 128
    with pytest.raises(
        InvalidInput, match=re.escape("64x64 x 2.5 = 192x192 = 36864 pixels exceeds the budget")
    ):
        resolved(budget, width=64, height=64, hires={"scale": 2.5})
    with pytest.raises(InvalidInput, match="has a side over 2048"):
        resolved(WorkerSettings(max_pixels=8_000_000), width=1024, height=1024, hires={"scale": 2.5})
    with pytest.raises(InvalidInput, match="leaves 64x64 unchanged once rounded"):
        resolved(width=64, height=64, hires={"scale": 1.2})
    with pytest.raises(InvalidInput, match=r"hires.strength: 0.1 x hires.steps 4 leaves no denoising step"):
        resolved(width=64, height=64, steps=4, hires={"scale": 2, "strength": 0.1})


# -------------------------------------------------------------------------------- checkpoint kinds


def test_an_inpainting_checkpoint_serves_inpaint_only() -> None:
    check_mode_served("t", None, "txt2img")
    check_mode_served("t", "inpaint", "inpaint")
    for mode in ("txt2img", "img2img"):
        with pytest.raises(ModeUnsupported, match=rf"inpainting checkpoint \(9-channel UNet\).*not {mode}"):
            check_mode_served("t", "inpaint", mode)


# ---------------------------------------------------------------------------- per-request output


def test_output_place_in_an_allowed_bucket_means_s3_output() -> None:
    parsed = parse_input(
        {**OK, "output": {"s3": {"bucket": "team-a", "prefix": "/renders/x/", "expires_in": 60}}}, SETTINGS
    )
    assert parsed.output is not None and parsed.output.return_ == "s3"
    assert (parsed.output.s3.bucket, parsed.output.s3.prefix, parsed.output.s3.expires_in) == (
        "team-a",
        "renders/x",
        60,
    )
    public = resolved(output={"s3": {"bucket": "team-a"}}).public()["output"]
    assert public == {
        "format": "png",
        "quality": 90,
        "return": "s3",
        "s3": {"bucket": "team-a", "prefix": "", "expires_in": None},
    }
    # No place: the answer's output section is what it always was.
    assert resolved().public()["output"] == {"format": "png", "quality": 90, "return": "base64"}


def test_output_place_outside_the_allow_list_is_refused_before_anything_runs() -> None:
    with pytest.raises(OutputNotAllowed) as info:
        parse_input({**OK, "output": {"s3": {"bucket": "someone-else"}}}, SETTINGS)
    assert str(info.value).startswith("[OUTPUT_NOT_ALLOWED] output.s3.bucket 'someone-else': it is not on ")
    with pytest.raises(OutputNotAllowed, match="FUSELINE_OUTPUT_BUCKETS is unset"):
        parse_input({**OK, "output": {"s3": {"bucket": "team-a"}}}, WorkerSettings())


@pytest.mark.parametrize(
    ("place", "expected"),
    [
        ({"bucket": "Team_A"}, "output.s3.bucket: String should match pattern"),
        (
            {"bucket": "team-a", "prefix": "a//b"},
            "output.s3.prefix: must not have empty, '.' or '..' segments",
        ),
        ({"bucket": "team-a", "prefix": "../up"}, "'..' segments"),
        (
            {"bucket": "team-a", "expires_in": 0},
            "output.s3.expires_in: Input should be greater than or equal to 1",
        ),
        ({"bucket": "team-a", "expires_in": 604801}, "less than or equal to 604800"),
        ({"prefix": "x"}, "output.s3.bucket: required"),
    ],
)
def test_malformed_output_places_name_the_field(place: dict, expected: str) -> None:
    assert expected in refused({"output": {"s3": place}})


def test_base64_return_contradicting_a_place_is_refused() -> None:
    message = refused({"output": {"return": "base64", "s3": {"bucket": "team-a"}}})
    assert "output: return 'base64' contradicts s3" in message
