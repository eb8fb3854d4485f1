"""Job input validation, defaults resolution and the worker's environment settings (no models needed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fuseline.core.catalog.model import Defaults
from fuseline.core.errors import ConfigInvalid
from fuseline.core.serving import DEFAULT_MAX_PIXELS
from worker.errors import InvalidInput, ModelInvalid
from worker.inputs import MAX_SEED, OutputOptions, parse_input, resolve_parameters
from worker.settings import WorkerSettings, load_settings

SETTINGS = WorkerSettings(default_template=None)
OK = {"template": "t", "prompt": "a"}


def problems(raw, settings: WorkerSettings = SETTINGS) -> str:
    with pytest.raises(InvalidInput) as info:
        parse_input(raw, settings)
    message = str(info.value)
    assert message.startswith("[INVALID_INPUT] ")
    return message


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, "got nothing"),
        ([1, 2], "got list"),
        ("a cat", "got str"),
        ({"template": "t"}, "prompt: required"),
        ({"template": "t", "prompt": ""}, "prompt: String should have at least 1 character"),
        ({"template": "t", "prompt": "   "}, "prompt: must contain text"),
        ({"template": "t", "prompt": "x" * 10_000}, "at most 4000 characters (got a 10000-character string)"),
        ({"template": "t", "prompt": 5}, "prompt: Input should be a valid string (got 5)"),
        (
            {**OK, "width": 1000},
            "width: must be a multiple of 64 between 256 and 2048 (got 1000; nearest: 960 or 1024)",
        ),
        # Issue 16: the hints named sizes the worker refuses ("got 3; nearest: 0 or 64").
        ({**OK, "width": 3}, "width: must be a multiple of 64 between 256 and 2048 (got 3; nearest: 256)"),
        ({**OK, "height": -1}, "height: must be a multiple of 64 between 256 and 2048 (got -1; nearest: 256"),
        ({**OK, "width": 2050}, "between 256 and 2048 (got 2050; nearest: 2048)"),
        ({**OK, "height": 128}, "height: must be between 256 and 2048 (got 128)"),
        ({**OK, "width": 4096}, "width: must be between 256 and 2048"),
        (
            {**OK, "width": "1024"},
            "width: Input should be a valid integer (got '1024')",
        ),
        (
            {**OK, "steps": 0},
            "steps: Input should be greater than or equal to 1 (got 0)",
        ),
        ({**OK, "steps": 151}, "steps: Input should be less than or equal to 150"),
        ({**OK, "steps": 2.5}, "steps: Input should be a valid integer"),
        ({**OK, "steps": True}, "steps: Input should be a valid integer"),
        ({**OK, "guidance_scale": 31}, "guidance_scale: Input should be less than"),
        (
            {**OK, "guidance_scale": float("nan")},
            "guidance_scale: Input should be a finite",
        ),
        (
            {**OK, "seed": -1},
            "seed: Input should be greater than or equal to 0 (got -1)",
        ),
        ({**OK, "seed": 2**64}, "seed: Input should be less than or equal to"),
        (
            {**OK, "num_images": 5},
            "num_images: Input should be less than or equal to 4",
        ),
        (
            {**OK, "scheduler": "k_lms"},
            "scheduler: unknown scheduler 'k_lms'; valid: default",
        ),
        ({"template": "Bad/../x", "prompt": "a"}, "template: String should match pattern"),
        (
            {**OK, "output": {"format": "gif"}},
            "output.format: Input should be 'png'",
        ),
        (
            {**OK, "output": {"quality": 0}},
            "output.quality: Input should be greater",
        ),
        ({**OK, "output": "png"}, "output: Input should be"),
        ({"prompt": "a"}, "template: required (this worker has no FUSELINE_DEFAULT_TEMPLATE)"),
    ],
)
def test_each_malformed_input_names_its_field(raw, expected: str) -> None:
    assert expected in problems(raw)


def test_unknown_fields_list_the_valid_ones() -> None:
    message = problems({**OK, "cfg": 7, "output": {"fmt": "png"}})
    assert (
        "cfg: unknown field; valid fields: template, prompt, negative_prompt, width, height, steps,"
        in message
    )
    assert "output.fmt: unknown field; valid fields: format, quality, return" in message


def test_every_problem_is_reported_at_once() -> None:
    message = problems({"prompt": "", "width": 1000, "steps": 0, "seed": -1, "bogus": 1})
    assert message.startswith("[INVALID_INPUT] 5 problem(s): ")
    for field in ("prompt:", "width:", "steps:", "seed:", "bogus:"):
        assert field in message


def test_min_size_comes_from_settings() -> None:
    small = WorkerSettings(min_size=64)
    assert parse_input({**OK, "width": 64, "height": 128}, small).width == 64
    assert "must be between 256" in problems({**OK, "width": 64})


def test_default_template_makes_template_optional() -> None:
    request = parse_input({"prompt": "a"}, WorkerSettings(default_template="tiny"))
    assert request.template is None


def test_resolution_prefers_request_then_template_defaults() -> None:
    defaults = Defaults(
        steps=30, guidance_scale=7.0, width=768, height=1344, negative_prompt="ugly", scheduler="ddim"
    )
    request = parse_input({**OK, "steps": 5, "width": 1024}, SETTINGS)
    params = resolve_parameters(request, "t", defaults, SETTINGS)
    assert (params.steps, params.width, params.height) == (5, 1024, 1344)
    assert (params.guidance_scale, params.negative_prompt, params.scheduler) == (7.0, "ugly", "ddim")
    assert params.num_images == 1
    assert params.output == OutputOptions()
    assert 0 <= params.seed <= MAX_SEED


def test_global_defaults_apply_without_template_defaults() -> None:
    params = resolve_parameters(
        parse_input({"template": "t", "prompt": "a"}, SETTINGS), "t", Defaults(), SETTINGS
    )
    assert (params.steps, params.guidance_scale, params.width, params.height) == (24, 4.5, 1024, 1024)
    assert (params.negative_prompt, params.scheduler) == ("", "default")


def test_random_seeds_use_the_full_64_bit_range() -> None:
    request = parse_input({"template": "t", "prompt": "a"}, SETTINGS)
    seeds = [resolve_parameters(request, "t", Defaults(), SETTINGS).seed for _ in range(64)]
    assert len(set(seeds)) == 64
    # With 64 draws, at least one lands above 2^63 unless the range is narrower (chance 2^-64).
    assert max(seeds) >= 2**63


def test_explicit_seed_zero_and_max_are_kept() -> None:
    for seed in (0, MAX_SEED):
        request = parse_input({**OK, "seed": seed}, SETTINGS)
        assert resolve_parameters(request, "t", Defaults(), SETTINGS).seed == seed


def test_pixel_budget_applies_after_resolution() -> None:
    request = parse_input({**OK, "width": 2048, "height": 2048}, SETTINGS)
    with pytest.raises(InvalidInput, match=re.escape(f"exceeds the budget of {DEFAULT_MAX_PIXELS}")):
        resolve_parameters(request, "t", Defaults(), SETTINGS)
    assert resolve_parameters(
        parse_input({**OK, "width": 2048, "height": 1152}, SETTINGS),
        "t",
        Defaults(),
        SETTINGS,
    )


def test_unknown_template_default_scheduler_is_a_model_problem() -> None:
    request = parse_input({"template": "t", "prompt": "a"}, SETTINGS)
    with pytest.raises(ModelInvalid, match=r"defaults\.scheduler 'k_lms'"):
        resolve_parameters(request, "t", Defaults(scheduler="k_lms"), SETTINGS)


def test_public_parameters_use_the_wire_names() -> None:
    request = parse_input({**OK, "seed": 7, "output": {"format": "webp"}}, SETTINGS)
    public = resolve_parameters(request, "t", Defaults(), SETTINGS).public()
    assert public["output"] == {"format": "webp", "quality": 90, "return": "base64"}
    assert public["seed"] == 7


def test_settings_from_environment(tmp_path: Path) -> None:
    settings = load_settings(
        {
            "FUSELINE_VOLUME": str(tmp_path),
            "FUSELINE_DEFAULT_TEMPLATE": "tiny",
            "FUSELINE_PRELOAD": "tiny, other",
            "FUSELINE_MAX_PIPELINES": "3",
            "FUSELINE_MIN_SIZE": "64",
            "FUSELINE_SPEC_HASHES": '{"tiny": "abc"}',
        }
    )
    assert settings.models_dir == tmp_path / "models"
    assert settings.preload == ("tiny", "other")
    assert (settings.default_template, settings.max_pipelines, settings.min_size) == ("tiny", 3, 64)
    assert settings.expected_spec_hashes == {"tiny": "abc"}
    defaults = load_settings({})
    assert (str(defaults.volume), defaults.preload, defaults.min_size) == ("/runpod-volume", None, 256)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"FUSELINE_MAX_PIPELINES": "two"}, "FUSELINE_MAX_PIPELINES='two' is not an integer"),
        ({"FUSELINE_MAX_PIPELINES": "0"}, "FUSELINE_MAX_PIPELINES=0 must be at least 1"),
        ({"FUSELINE_MIN_SIZE": "100"}, "FUSELINE_MIN_SIZE=100 must be a multiple of 64"),
        ({"FUSELINE_SPEC_HASHES": "{"}, "FUSELINE_SPEC_HASHES is not JSON"),
        ({"FUSELINE_SPEC_HASHES": '["x"]'}, "must be a JSON object"),
        ({"FUSELINE_VRAM_BUDGET_GB": "lots"}, "FUSELINE_VRAM_BUDGET_GB='lots' is not a number"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigInvalid, match=re.escape(expected)):
        load_settings(env)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "-5", "0"])
def test_vram_budget_must_be_finite_and_positive(value: str) -> None:
    with pytest.raises(ConfigInvalid, match=re.escape(f"FUSELINE_VRAM_BUDGET_GB={value!r} must be a finite")):
        load_settings({"FUSELINE_VRAM_BUDGET_GB": value})
    assert load_settings({"FUSELINE_VRAM_BUDGET_GB": "1.5"}).vram_budget_bytes == int(1.5 * 1024**3)


@pytest.mark.parametrize(
    ("defaults", "expected"),
    [
        ({"width": 1000}, "defaults.width 1000 is not a size this worker serves (a multiple of 64"),
        ({"height": 328}, "defaults.height 328 is not a size this worker serves"),
        ({"width": 2048, "height": 2048}, "exceeds this worker's budget"),
    ],
)
def test_template_defaults_outside_the_workers_rules_name_the_template(defaults: dict, expected: str) -> None:
    request = parse_input({"prompt": "a cat", "template": "wide"}, SETTINGS)
    with pytest.raises(ModelInvalid, match=re.escape(expected)) as info:
        resolve_parameters(request, "wide", Defaults(**defaults), SETTINGS)
    assert "template 'wide'" in str(info.value) and "templates.json" in str(info.value)
    # The request's own size overrides the template's default: fine.
    explicit = parse_input({"prompt": "a cat", "template": "wide", "width": 1024, "height": 1024}, SETTINGS)
    assert resolve_parameters(explicit, "wide", Defaults(**defaults), SETTINGS).width == 1024


def test_template_default_below_the_workers_min_size_names_the_setting() -> None:
    settings = WorkerSettings(default_template=None, min_size=512)
    request = parse_input({"prompt": "a cat", "template": "small"}, settings)
    with pytest.raises(ModelInvalid, match=re.escape("defaults.height 448 is not a size this worker serves")):
        resolve_parameters(request, "small", Defaults(height=448), settings)
