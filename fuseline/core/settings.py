"""Settings from the environment: the base of each process's one typed settings model (pydantic-settings),
parsed once at the process's start and passed inward as a value.

Every field names its variable (`validation_alias="FUSELINE_..."`); `from_env()` reads those variables from
the environment (or a given mapping), treats an unset or blank one as its default, and turns every bad
value into one `ConfigInvalid` (CONFIG_INVALID) naming the variable, its value and the fix, never a
traceback. Building a model directly (`WorkerSettings(volume=...)`) reads no environment: tests and callers
pass values, and only the process's edge reads the environment.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any, Self

from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from fuseline.core.errors import ConfigInvalid


class _Environment(PydanticBaseSettingsSource):
    """The variables a settings model names, from one mapping (os.environ, or a test's dict). Blank values
    count as unset; values are stripped."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self._env = env

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        variable = field.validation_alias if isinstance(field.validation_alias, str) else None
        raw = self._env.get(variable) if variable else None
        return (raw.strip() if isinstance(raw, str) and raw.strip() else None), variable or field_name, False

    def __call__(self) -> dict[str, Any]:
        values = {}
        for name, field in self.settings_cls.model_fields.items():
            value, key, _ = self.get_field_value(field, name)
            if value is not None:
                values[key] = value
        return values


class EnvSettings(BaseSettings):
    """Base class: fields name their variable as `validation_alias`; see the module docstring."""

    model_config = SettingsConfigDict(
        frozen=True, extra="ignore", validate_by_name=True, validate_by_alias=True, validate_default=False
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only the values passed: the environment is read by from_env, once, at the edge.
        return (init_settings,)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **values: Any) -> Self:
        """The settings from `env` (default: os.environ); `values` (already parsed parts) win over it.
        ConfigInvalid names the first bad variable."""
        env = os.environ if env is None else env
        try:
            return cls(**{**_Environment(cls, env)(), **values})
        except ValidationError as exc:
            raise ConfigInvalid(cls._describe(exc)) from None

    @classmethod
    def variable(cls, field_name: str) -> str:
        """The environment variable of a field."""
        alias = cls.model_fields[field_name].validation_alias
        return alias if isinstance(alias, str) else field_name

    @classmethod
    def _describe(cls, exc: ValidationError) -> str:
        error = exc.errors()[0]
        loc = [str(part) for part in error["loc"]]
        names = {cls.variable(name): name for name in cls.model_fields}
        variable = next((part for part in loc if part in names), None)
        if variable is None:  # a field given by its name (a model built in code), or a model-level check
            variable = next((cls.variable(part) for part in loc if part in cls.model_fields), "settings")
        message = error["msg"].removeprefix("Value error, ")
        return f"environment variable {variable}={error.get('input')!r}: {message}; fix or unset it"


# ---------------------------------------------------------------------------------------- value parsers
# Used by the models' `mode="before"` validators. They raise ConfigInvalid directly (pydantic lets any
# exception other than ValueError/AssertionError through), with the exact wording a person needs.


def env_int(variable: str, raw: Any, minimum: int | None = None) -> int:
    """An integer variable: `raw` as given (a string from the environment, or an int built in code)."""
    if isinstance(raw, bool):
        raise ConfigInvalid(f"environment variable {variable}={raw!r} is not an integer; unset it or fix it")
    if isinstance(raw, int):
        value = raw
    else:
        try:
            value = int(str(raw).strip())
        except ValueError:
            raise ConfigInvalid(
                f"environment variable {variable}={raw!r} is not an integer; unset it or fix it"
            ) from None
    if minimum is not None and value < minimum:
        raise ConfigInvalid(f"environment variable {variable}={value} must be at least {minimum}")
    return value


def env_float(variable: str, raw: Any, *, minimum: float | None = None, above: float | None = None) -> float:
    """A finite number variable, at least `minimum` or strictly above `above` when given."""
    if isinstance(raw, bool):
        raise ConfigInvalid(f"environment variable {variable}={raw!r} is not a number; unset it or fix it")
    try:
        value = float(raw if isinstance(raw, int | float) else str(raw).strip())
    except ValueError:
        raise ConfigInvalid(
            f"environment variable {variable}={raw!r} is not a number; unset it or fix it"
        ) from None
    if not math.isfinite(value):
        raise ConfigInvalid(f"environment variable {variable}={raw!r} must be a finite number")
    if minimum is not None and value < minimum:
        raise ConfigInvalid(f"environment variable {variable}={raw!r} must be at least {minimum}")
    if above is not None and value <= above:
        raise ConfigInvalid(f"environment variable {variable}={raw!r} must be above {above}")
    return value


def env_list(raw: Any) -> tuple[str, ...] | None:
    """A comma-separated list (blank items dropped); a sequence built in code passes as a tuple."""
    if raw is None:
        return None
    items = raw.split(",") if isinstance(raw, str) else list(raw)
    return tuple(item.strip() for item in items if str(item).strip())


def env_json_object(variable: str, raw: Any, expected: str) -> dict[str, Any]:
    """A JSON object variable; `expected` says what it must look like."""
    if isinstance(raw, Mapping):
        return dict(raw)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigInvalid(f"{variable} is not JSON ({exc}); expected {expected}") from None
    if not isinstance(value, dict):
        raise ConfigInvalid(f"{variable} must be a JSON object: {expected}")
    return value
