"""The worker's settings: one typed model of every FUSELINE_* variable it reads (docs/operations.md lists
them), parsed once at start (`load_settings`) and passed inward. A bad value fails the start with
CONFIG_INVALID naming the variable (fuseline.core.settings), never a traceback and never later, during a
job."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

from pydantic import Field, ValidationInfo, field_validator, model_validator

from fuseline.core.errors import ConfigInvalid
from fuseline.core.s3 import addressing_from_env, check_endpoint_variables
from fuseline.core.serving import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIZE, MAX_SIZE
from fuseline.core.settings import EnvSettings, env_int, env_json_object, env_list
from worker.sync.settings import DEFAULT_VOLUME, SyncSettings

DEFAULT_MAX_PIPELINES = 2
# SigV4 presigned URLs are valid for at most 7 days.
MAX_OUTPUT_URL_EXPIRY_S = 7 * 24 * 3600
# S3 bucket naming rules (3-63 characters: lowercase letters, digits, dots, hyphens; letter or digit at
# both ends): checked at start so a typo fails the deployment, not every job.
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
SPEED_OPTIONS = ("channels_last", "fuse_qkv", "compile")
# The devices the worker generates on (worker/device.py): checked here, without importing torch, so that a
# typo fails the start with CONFIG_INVALID instead of a traceback from torch.device() in the first load.
_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")


class SpeedOptions(EnvSettings):
    """FUSELINE_SPEED and its companions (applied by worker/speed.py); off by default. An unknown option
    fails the start (a typo would otherwise silently run the slow path)."""

    options: tuple[str, ...] = Field(default=(), validation_alias="FUSELINE_SPEED")
    compile_mode: str | None = Field(default=None, validation_alias="FUSELINE_COMPILE_MODE")
    compile_backend: str = Field(default="inductor", validation_alias="FUSELINE_COMPILE_BACKEND")

    def __bool__(self) -> bool:
        return bool(self.options)

    @field_validator("options", mode="before")
    @classmethod
    def _known(cls, value: Any) -> tuple[str, ...]:
        options = tuple(dict.fromkeys(o.lower() for o in env_list(value) or ()))
        unknown = [o for o in options if o not in SPEED_OPTIONS]
        if unknown:
            raw = value if isinstance(value, str) else ",".join(value)
            raise ConfigInvalid(
                f"FUSELINE_SPEED={raw!r}: unknown option(s) {', '.join(unknown)}; "
                f"valid: {', '.join(SPEED_OPTIONS)} (comma-separated), or unset it"
            )
        return options

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **values: Any) -> Self:
        speed = super().from_env(env, **values)
        # From the environment only: code (tests, the GPU benchmark) may pass compile settings it then
        # does not use; a deployment setting them without `compile` has a typo somewhere.
        given = speed.compile_mode is not None or "compile_backend" in speed.model_fields_set
        if given and "compile" not in speed.options:
            raise ConfigInvalid(
                "FUSELINE_COMPILE_MODE/FUSELINE_COMPILE_BACKEND are set but FUSELINE_SPEED does not include "
                "'compile'; add it or unset them"
            )
        return speed


class WorkerSettings(EnvSettings):
    volume: Path = Field(default=Path(DEFAULT_VOLUME), validation_alias="FUSELINE_VOLUME")
    default_template: str | None = Field(default=None, validation_alias="FUSELINE_DEFAULT_TEMPLATE")
    # None: every template present on the volume.
    preload: tuple[str, ...] | None = Field(default=None, validation_alias="FUSELINE_PRELOAD")
    # Pipelines kept loaded at once; on CUDA a VRAM budget applies as well.
    max_pipelines: int = Field(default=DEFAULT_MAX_PIPELINES, validation_alias="FUSELINE_MAX_PIPELINES")
    # Bytes of GPU memory the cached pipelines may use; None: 75% of the card (CUDA only).
    vram_budget_bytes: int | None = Field(default=None, validation_alias="FUSELINE_VRAM_BUDGET_GB")
    min_size: int = Field(default=DEFAULT_MIN_SIZE, validation_alias="FUSELINE_MIN_SIZE")
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, validation_alias="FUSELINE_MAX_PIXELS")
    # template id -> spec hash its fuseline.json must carry; a template absent here is not checked.
    expected_spec_hashes: Mapping[str, str] = Field(
        default_factory=dict, validation_alias="FUSELINE_SPEC_HASHES"
    )
    device: str | None = Field(default=None, validation_alias="FUSELINE_DEVICE")
    # Release manifest to sync the volume from at start (`s3://…/releases/<channel>.json` or a path);
    # None: serve what the volume already holds.
    release: str | None = Field(default=None, validation_alias="FUSELINE_RELEASE")
    # S3 output (`output.return: "s3"`): None refuses such jobs with UPLOAD_NOT_CONFIGURED.
    output_bucket: str | None = Field(default=None, validation_alias="FUSELINE_OUTPUT_BUCKET")
    # Key prefix inside the bucket, without leading/trailing slashes ("" for none).
    output_prefix: str = Field(default="", validation_alias="FUSELINE_OUTPUT_PREFIX")
    output_url_expiry_s: int = Field(default=3600, validation_alias="FUSELINE_OUTPUT_URL_EXPIRY_S")
    # Jobs between two `worker.counters` log events (FUSELINE_COUNTERS_EVERY; 0: only at exit).
    counters_every: int = Field(default=50, validation_alias="FUSELINE_COUNTERS_EVERY")
    # FUSELINE_SPEED and companions, FUSELINE_SYNC_*: their own models, parsed with these (from_env).
    speed: SpeedOptions = Field(default_factory=SpeedOptions)
    sync: SyncSettings = Field(default_factory=SyncSettings)

    @property
    def models_dir(self) -> Path:
        return self.volume / "models"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **values: Any) -> Self:
        env = os.environ if env is None else env
        values.setdefault("speed", SpeedOptions.from_env(env))
        values.setdefault("sync", SyncSettings.from_env(env))
        settings = super().from_env(env, **values)
        # When the worker talks to S3 (an output bucket, an s3:// release), an AWS_* endpoint or
        # FUSELINE_S3_ADDRESSING boto3 would refuse only when the first client is made (for an upload:
        # after the generation) fails the start instead; FUSELINE_S3_ADDRESSING whenever it is set.
        if settings.output_bucket is not None or (settings.release or "").startswith("s3://"):
            check_endpoint_variables(env)
        addressing_from_env(env)
        return settings

    @field_validator("device", mode="before")
    @classmethod
    def _device(cls, value: Any) -> str | None:
        if value is None:
            return None
        device = str(value).strip().lower()
        if not _DEVICE_RE.match(device):
            raise ConfigInvalid(
                f"FUSELINE_DEVICE={value!r} is not a device this worker runs on: use cuda, cuda:<index> "
                "(e.g. cuda:0) or cpu, or unset it (cuda when a GPU is present, else cpu)"
            )
        return device

    @field_validator("preload", mode="before")
    @classmethod
    def _preload(cls, value: Any) -> tuple[str, ...] | None:
        return env_list(value) or None

    @field_validator("max_pipelines", mode="before")
    @classmethod
    def _at_least_one(cls, value: Any, info: ValidationInfo) -> int:
        return env_int(cls.variable(info.field_name), value, minimum=1)

    @field_validator("counters_every", mode="before")
    @classmethod
    def _at_least_zero(cls, value: Any, info: ValidationInfo) -> int:
        return env_int(cls.variable(info.field_name), value, minimum=0)

    @field_validator("vram_budget_bytes", mode="before")
    @classmethod
    def _gib_to_bytes(cls, value: Any) -> int | None:
        if value is None or isinstance(value, int):
            return value  # bytes, given in code
        try:
            gib = float(value)
        except ValueError:
            raise ConfigInvalid(f"FUSELINE_VRAM_BUDGET_GB={value!r} is not a number") from None
        # inf would overflow int() and crash the start; zero, negative or NaN would evict everything.
        if not gib > 0 or gib == float("inf"):
            raise ConfigInvalid(
                f"FUSELINE_VRAM_BUDGET_GB={value!r} must be a finite number of GiB above 0 "
                "(e.g. 20); unset it for no budget"
            )
        return int(gib * 1024**3)

    @field_validator("min_size", mode="before")
    @classmethod
    def _min_size(cls, value: Any, info: ValidationInfo) -> int:
        size = env_int(cls.variable(info.field_name), value, minimum=64)
        if size % 64 or size > MAX_SIZE:
            raise ConfigInvalid(f"FUSELINE_MIN_SIZE={size} must be a multiple of 64 and at most {MAX_SIZE}")
        return size

    @field_validator("max_pixels", mode="before")
    @classmethod
    def _max_pixels(cls, value: Any, info: ValidationInfo) -> int:
        return env_int(cls.variable(info.field_name), value)

    @field_validator("expected_spec_hashes", mode="before")
    @classmethod
    def _spec_hashes(cls, value: Any) -> dict[str, str]:
        hashes = env_json_object("FUSELINE_SPEC_HASHES", value, "{'<template>': '<hash>'}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in hashes.items()):
            raise ConfigInvalid(
                "FUSELINE_SPEC_HASHES must be a JSON object of template id -> spec hash strings"
            )
        return hashes

    @field_validator("output_bucket", mode="before")
    @classmethod
    def _bucket(cls, value: Any) -> str | None:
        if value is None:
            return None
        bucket = str(value).strip() or None
        if bucket is not None and bucket.startswith("s3://"):
            name, _, prefix = bucket[len("s3://") :].partition("/")
            raise ConfigInvalid(
                f"FUSELINE_OUTPUT_BUCKET={bucket!r} must be a bucket name only: set "
                f"FUSELINE_OUTPUT_BUCKET={name}"
                + (f" and FUSELINE_OUTPUT_PREFIX={prefix.strip('/')}" if prefix.strip("/") else "")
            )
        if bucket is not None and not _BUCKET_RE.match(bucket):
            raise ConfigInvalid(
                f"FUSELINE_OUTPUT_BUCKET={bucket!r} is not a valid S3 bucket name (3-63 characters: "
                "lowercase letters, digits, dots, hyphens)"
            )
        return bucket

    @field_validator("output_prefix", mode="before")
    @classmethod
    def _prefix(cls, value: Any) -> str:
        prefix = str(value).strip().strip("/")
        if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
            raise ConfigInvalid(
                f"FUSELINE_OUTPUT_PREFIX={prefix!r} has an empty, '.' or '..' segment; use e.g. "
                "'fuseline/images'"
            )
        return prefix

    @field_validator("output_url_expiry_s", mode="before")
    @classmethod
    def _expiry(cls, value: Any, info: ValidationInfo) -> int:
        expiry = env_int(cls.variable(info.field_name), value, minimum=1)
        if expiry > MAX_OUTPUT_URL_EXPIRY_S:
            raise ConfigInvalid(
                f"FUSELINE_OUTPUT_URL_EXPIRY_S={expiry} exceeds {MAX_OUTPUT_URL_EXPIRY_S} (7 days, the "
                "longest a SigV4 presigned URL may live)"
            )
        return expiry

    @model_validator(mode="after")
    def _pixels_fit_min_size(self) -> Self:
        if "max_pixels" in self.model_fields_set and self.max_pixels < self.min_size * self.min_size:
            raise ConfigInvalid(
                f"environment variable FUSELINE_MAX_PIXELS={self.max_pixels} must be at least "
                f"{self.min_size * self.min_size}"
            )
        return self


def load_settings(env: Mapping[str, str] | None = None) -> WorkerSettings:
    """The worker's settings from FUSELINE_* variables (default: the process environment)."""
    return WorkerSettings.from_env(env)
