"""Worker configuration from the environment: read and validated once at start, then passed inward."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from worker.errors import ConfigInvalid as SettingsError

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
        release=env.get("FUSELINE_RELEASE", "").strip() or None,
    )
