"""fuseline.core.settings: one typed model per process, read from the environment once; every bad value a
CONFIG_INVALID naming the variable."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import Field, ValidationInfo, field_validator

from fuseline.core.errors import ConfigInvalid
from fuseline.core.settings import EnvSettings, env_float, env_int, env_json_object, env_list


class Example(EnvSettings):
    workers: int = Field(default=8, validation_alias="FUSELINE_TEST_WORKERS")
    ratio: float = Field(default=0.5, validation_alias="FUSELINE_TEST_RATIO")
    name: str | None = Field(default=None, validation_alias="FUSELINE_TEST_NAME")
    flag: bool = Field(default=False, validation_alias="FUSELINE_TEST_FLAG")

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, value: Any, info: ValidationInfo) -> int:
        return env_int(cls.variable(info.field_name), value, minimum=1)


def test_from_env_reads_the_variables_and_blank_means_default(monkeypatch):
    settings = Example.from_env({"FUSELINE_TEST_WORKERS": " 3 ", "FUSELINE_TEST_NAME": "  ", "OTHER": "x"})
    assert (settings.workers, settings.name, settings.ratio) == (3, None, 0.5)
    # Building a model reads no environment: only from_env does.
    monkeypatch.setenv("FUSELINE_TEST_WORKERS", "5")
    assert Example().workers == 8 and Example.from_env().workers == 5


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"FUSELINE_TEST_WORKERS": "eight"}, "FUSELINE_TEST_WORKERS='eight' is not an integer"),
        ({"FUSELINE_TEST_WORKERS": "0"}, "FUSELINE_TEST_WORKERS=0 must be at least 1"),
        # No validator of ours: pydantic's own message, still naming the variable and its value.
        ({"FUSELINE_TEST_RATIO": "half"}, "environment variable FUSELINE_TEST_RATIO='half': "),
        ({"FUSELINE_TEST_FLAG": "maybe"}, "environment variable FUSELINE_TEST_FLAG='maybe': "),
    ],
)
def test_a_bad_value_is_config_invalid_naming_the_variable(env: dict[str, str], expected: str):
    with pytest.raises(ConfigInvalid) as info:
        Example.from_env(env)
    assert info.value.code == "CONFIG_INVALID" and expected in str(info.value)
    assert str(info.value).startswith("[CONFIG_INVALID] ")


def test_value_parsers():
    assert env_float("V", "1.5", minimum=0) == 1.5
    with pytest.raises(ConfigInvalid, match="V='inf' must be a finite number"):
        env_float("V", "inf")
    with pytest.raises(ConfigInvalid, match="V='0' must be above 0"):
        env_float("V", "0", above=0)
    assert env_list("a, b,,c ") == ("a", "b", "c") and env_list(None) is None
    assert env_json_object("V", '{"a": "b"}', "an object") == {"a": "b"}
    with pytest.raises(ConfigInvalid, match="V must be a JSON object"):
        env_json_object("V", "[1]", "an object")
