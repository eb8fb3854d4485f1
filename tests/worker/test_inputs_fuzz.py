"""Fuzz: a job's input is resolved to parameters or refused with the worker's coded errors (INVALID_INPUT,
UPLOAD_NOT_CONFIGURED, or MODEL_INVALID for a template default this worker does not serve), never anything
else, whatever the JSON."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuseline.core.catalog.model import Defaults
from tests.fixtures.fuzz import coded_or_value, hostile_documents, json_values
from worker.errors import WorkerError
from worker.inputs import GenerationInput, GenerationParameters, parse_input, resolve_parameters
from worker.settings import WorkerSettings

pytestmark = pytest.mark.fuzz

SETTINGS = WorkerSettings(default_template="tiny", min_size=64)
DEFAULTS = Defaults(steps=24, guidance_scale=4.5, width=1024, height=1024, negative_prompt="", scheduler=None)
VALID = {
    "template": "tiny",
    "prompt": "a lighthouse, (golden hour:1.2)",
    "negative_prompt": "blurry",
    "width": 1024,
    "height": 1024,
    "steps": 24,
    "guidance_scale": 4.5,
    "seed": 42,
    "num_images": 1,
    "scheduler": "euler",
    "output": {"format": "png", "quality": 90, "return": "base64"},
}
PLACES = [*((key,) for key in VALID), ("output", "format"), ("output", "quality"), ("output", "return")]


def resolve(raw: object) -> None:
    def run() -> GenerationParameters:
        request = parse_input(raw, SETTINGS)
        assert isinstance(request, GenerationInput)
        return resolve_parameters(request, request.template or "tiny", DEFAULTS, SETTINGS)

    result = coded_or_value(run)
    assert isinstance(result, GenerationParameters | WorkerError), result
    if isinstance(result, GenerationParameters):
        assert result.width % 64 == 0 and 0 <= result.seed < 2**64 and result.steps >= 1


@given(json_values)
def test_any_json_value(raw: object) -> None:
    resolve(raw)


@given(hostile_documents(VALID, PLACES))
def test_a_job_with_hostile_fields(raw: dict) -> None:
    resolve(raw)


@given(st.dictionaries(st.sampled_from([*VALID, "image", "mask", "strength"]), json_values, max_size=8))
def test_jobs_of_known_fields_with_any_values(raw: dict) -> None:
    resolve(raw)
