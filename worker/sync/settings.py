"""The sync's settings from the environment, parsed once at start (by the worker with its own settings, by
`python -m worker.sync` on its own), passed to sync_templates as a value.

    FUSELINE_SYNC_WORKERS        parallel ranged GETs (default 8)
    FUSELINE_SYNC_PART_SIZE      bytes per ranged GET, also the unit of resume (default 64 MiB)
    FUSELINE_SYNC_LOCK_STALE     seconds a lock file may stay unchanged before another sync takes it over
    FUSELINE_SYNC_OBJECT_GRACE   seconds an unlinked store object is kept before it is collected
    FUSELINE_RELEASE, FUSELINE_VOLUME   the release and the volume (`python -m worker.sync` only; the worker
                                 reads them in its own settings)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, field_validator

from fuseline.core.settings import EnvSettings, env_float, env_int

DEFAULT_VOLUME = "/runpod-volume"
DEFAULT_PART_SIZE = 64 << 20  # ranged-GET size: big enough to amortise a request, small enough to resume
DEFAULT_WORKERS = 8
# Seconds a lock file may stay unchanged before a waiter takes it over (worker.sync.locks).
DEFAULT_STALE_AFTER = 30.0
# Store objects younger than this are never collected: a concurrent sync of another template may have
# just stored (or chosen to reuse) one and not linked it into its folder yet.
OBJECT_GRACE = 3600.0


class SyncSettings(EnvSettings):
    part_size: int = Field(default=DEFAULT_PART_SIZE, validation_alias="FUSELINE_SYNC_PART_SIZE")
    workers: int = Field(default=DEFAULT_WORKERS, validation_alias="FUSELINE_SYNC_WORKERS")
    lock_stale_after: float = Field(default=DEFAULT_STALE_AFTER, validation_alias="FUSELINE_SYNC_LOCK_STALE")
    object_grace: float = Field(default=OBJECT_GRACE, validation_alias="FUSELINE_SYNC_OBJECT_GRACE")

    @field_validator("part_size", "workers", mode="before")
    @classmethod
    def _positive_int(cls, value: Any, info: ValidationInfo) -> int:
        return env_int(cls.variable(info.field_name), value, minimum=1)

    @field_validator("lock_stale_after", mode="before")
    @classmethod
    def _stale(cls, value: Any, info: ValidationInfo) -> float:
        return env_float(cls.variable(info.field_name), value, above=0)

    @field_validator("object_grace", mode="before")
    @classmethod
    def _grace(cls, value: Any, info: ValidationInfo) -> float:
        return env_float(cls.variable(info.field_name), value, minimum=0)


class SyncCommandSettings(SyncSettings):
    """`python -m worker.sync`'s settings: the sync's, plus where from and where to."""

    release: str | None = Field(default=None, validation_alias="FUSELINE_RELEASE")
    volume: Path = Field(default=Path(DEFAULT_VOLUME), validation_alias="FUSELINE_VOLUME")
