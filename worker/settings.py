"""Worker configuration from the environment: read and validated once at start, then passed inward."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from worker.errors import ConfigInvalid as SettingsError
from worker.speed import SpeedOptions, parse_speed_options

DEFAULT_VOLUME = "/runpod-volume"
# SDXL's trained range; FUSELINE_MIN_SIZE lowers the floor (tests use tiny models at 64 px).
DEFAULT_MIN_SIZE = 256
MAX_SIZE = 2048
# 1536x1536 = 2048x1152: the largest images SDXL is commonly run at without tiling artefacts.
DEFAULT_MAX_PIXELS = 1536 * 1536
DEFAULT_MAX_PIPELINES = 2


@dataclass(frozen=True)
class WorkerSettings:
    volume: Path = Path(DEFAULT_VOLUME)
    default_template: str | None = None
    # None: every template present on the volume.
    preload: tuple[str, ...] | None = None
    # Pipelines kept loaded at once; on CUDA a VRAM budget applies as well.
    max_pipelines: int = DEFAULT_MAX_PIPELINES
    # Bytes of GPU memory the cached pipelines may use; None: 75% of the card (CUDA only).
    vram_budget_bytes: int | None = None
    min_size: int = DEFAULT_MIN_SIZE
    max_pixels: int = DEFAULT_MAX_PIXELS
    # template id -> spec hash its fuseline.json must carry; a template absent here is not checked.
    expected_spec_hashes: Mapping[str, str] = field(default_factory=dict)
    device: str | None = None
    # Release manifest to sync the volume from at start (`s3://…/releases/<channel>.json` or a path);
    # None: serve what the volume already holds.
    release: str | None = None
    # FUSELINE_SPEED and companions (worker/speed.py): off by default.
    speed: SpeedOptions = field(default_factory=SpeedOptions)
    # S3 output (`output.return: "s3"`): None refuses such jobs with UPLOAD_NOT_CONFIGURED.
    output_bucket: str | None = None
    # Key prefix inside the bucket, without leading/trailing slashes ("" for none).
    output_prefix: str = ""
    output_url_expiry_s: int = 3600
    # Jobs between two `worker.counters` log events (FUSELINE_COUNTERS_EVERY; 0: only at exit).
    counters_every: int = 50

    @property
    def models_dir(self) -> Path:
        return self.volume / "models"


def _int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(
            f"environment variable {name}={raw!r} is not an integer; unset it or fix it"
        ) from None
    if value < minimum:
        raise SettingsError(f"environment variable {name}={value} must be at least {minimum}")
    return value


# SigV4 presigned URLs are valid for at most 7 days.
MAX_OUTPUT_URL_EXPIRY_S = 7 * 24 * 3600
# S3 bucket naming rules (3-63 characters: lowercase letters, digits, dots, hyphens; letter or digit at
# both ends): checked at start so a typo fails the deployment, not every job.
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def _output_settings(env: Mapping[str, str]) -> dict:
    bucket = env.get("FUSELINE_OUTPUT_BUCKET", "").strip() or None
    if bucket is not None and bucket.startswith("s3://"):
        name, _, prefix = bucket[len("s3://") :].partition("/")
        raise SettingsError(
            f"FUSELINE_OUTPUT_BUCKET={bucket!r} must be a bucket name only: set FUSELINE_OUTPUT_BUCKET={name}"
            + (f" and FUSELINE_OUTPUT_PREFIX={prefix.strip('/')}" if prefix.strip("/") else "")
        )
    if bucket is not None and not _BUCKET_RE.match(bucket):
        raise SettingsError(
            f"FUSELINE_OUTPUT_BUCKET={bucket!r} is not a valid S3 bucket name (3-63 characters: lowercase "
            "letters, digits, dots, hyphens)"
        )
    prefix = env.get("FUSELINE_OUTPUT_PREFIX", "").strip().strip("/")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise SettingsError(
            f"FUSELINE_OUTPUT_PREFIX={prefix!r} has an empty, '.' or '..' segment; use e.g. 'fuseline/images'"
        )
    expiry = _int(env, "FUSELINE_OUTPUT_URL_EXPIRY_S", 3600, 1)
    if expiry > MAX_OUTPUT_URL_EXPIRY_S:
        raise SettingsError(
            f"FUSELINE_OUTPUT_URL_EXPIRY_S={expiry} exceeds {MAX_OUTPUT_URL_EXPIRY_S} (7 days, the longest "
            "a SigV4 presigned URL may live)"
        )
    return {"output_bucket": bucket, "output_prefix": prefix, "output_url_expiry_s": expiry}


def _check_s3_environment(env: Mapping[str, str], release: str | None, bucket: str | None) -> None:
    """When the worker talks to S3 (an output bucket, an s3:// release), the AWS_* endpoint and
    FUSELINE_S3_ADDRESSING boto3 would refuse only when the first client is made (for an upload: after
    the generation) fail the start instead; FUSELINE_S3_ADDRESSING whenever it is set."""
    from worker.remote import S3ConfigError, check_s3_environment, s3_addressing

    try:
        if bucket is not None or (release or "").startswith("s3://"):
            check_s3_environment(env)
        else:
            s3_addressing(env)
    except S3ConfigError as err:
        raise SettingsError(str(err)) from None


def load_settings(env: Mapping[str, str] | None = None) -> WorkerSettings:
    """Settings from FUSELINE_* variables (see docs/operations.md)."""
    env = os.environ if env is None else env
    preload_raw = env.get("FUSELINE_PRELOAD", "").strip()
    preload = tuple(t.strip() for t in preload_raw.split(",") if t.strip()) if preload_raw else None
    hashes_raw = env.get("FUSELINE_SPEC_HASHES", "").strip()
    hashes: dict[str, str] = {}
    if hashes_raw:
        try:
            hashes = json.loads(hashes_raw)
        except json.JSONDecodeError as exc:
            raise SettingsError(
                f"FUSELINE_SPEC_HASHES is not JSON ({exc}); expected {{'<template>': '<hash>'}}"
            ) from None
        if not isinstance(hashes, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in hashes.items()
        ):
            raise SettingsError(
                "FUSELINE_SPEC_HASHES must be a JSON object of template id -> spec hash strings"
            )
    min_size = _int(env, "FUSELINE_MIN_SIZE", DEFAULT_MIN_SIZE, 64)
    if min_size % 64 or min_size > MAX_SIZE:
        raise SettingsError(f"FUSELINE_MIN_SIZE={min_size} must be a multiple of 64 and at most {MAX_SIZE}")
    vram_gb = env.get("FUSELINE_VRAM_BUDGET_GB", "").strip()
    vram = None
    if vram_gb:
        try:
            gb = float(vram_gb)
        except ValueError:
            raise SettingsError(f"FUSELINE_VRAM_BUDGET_GB={vram_gb!r} is not a number") from None
        # inf would overflow int() and crash the start; zero, negative or NaN would evict everything.
        if not math.isfinite(gb) or gb <= 0:
            raise SettingsError(
                f"FUSELINE_VRAM_BUDGET_GB={vram_gb!r} must be a finite number of GiB above 0 "
                "(e.g. 20); unset it for no budget"
            )
        vram = int(gb * 1024**3)
    output = _output_settings(env)
    release = env.get("FUSELINE_RELEASE", "").strip() or None
    _check_s3_environment(env, release, output["output_bucket"])
    return WorkerSettings(
        volume=Path(env.get("FUSELINE_VOLUME", "").strip() or DEFAULT_VOLUME),
        default_template=env.get("FUSELINE_DEFAULT_TEMPLATE", "").strip() or None,
        preload=preload,
        max_pipelines=_int(env, "FUSELINE_MAX_PIPELINES", DEFAULT_MAX_PIPELINES, 1),
        vram_budget_bytes=vram,
        min_size=min_size,
        max_pixels=_int(env, "FUSELINE_MAX_PIXELS", DEFAULT_MAX_PIXELS, min_size * min_size),
        expected_spec_hashes=hashes,
        device=env.get("FUSELINE_DEVICE", "").strip() or None,
        release=release,
        speed=parse_speed_options(env),
        counters_every=_int(env, "FUSELINE_COUNTERS_EVERY", 50, 0),
        **output,
    )
