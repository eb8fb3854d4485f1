"""The build side's settings from the environment, parsed once when a stage (or `fuseline lock`) starts.

    FUSELINE_CACHE_DIR               the shared download cache (default $XDG_CACHE_HOME/fuseline, else
                                     ~/.cache/fuseline)
    FUSELINE_DOWNLOAD_RETRY_SECONDS  how long one download may keep retrying (default 600)
    FUSELINE_DOWNLOAD_ATTEMPTS       attempts per download (default 20)
    FUSELINE_ARCHIVE_REMOTE          the DVC remote whose source archive a fetch falls back to when upstream
                                     lost a source (default: DVC's default remote; fuseline/remote/archive.py)

A bad value stops the stage with CONFIG_INVALID naming the variable (fuseline.core.settings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, field_validator

from fuseline.core.settings import EnvSettings, env_float, env_int


class BuildSettings(EnvSettings):
    cache_dir: Path | None = Field(default=None, validation_alias="FUSELINE_CACHE_DIR")
    xdg_cache_home: Path | None = Field(default=None, validation_alias="XDG_CACHE_HOME")
    download_retry_seconds: float = Field(default=600.0, validation_alias="FUSELINE_DOWNLOAD_RETRY_SECONDS")
    download_attempts: int = Field(default=20, validation_alias="FUSELINE_DOWNLOAD_ATTEMPTS")
    archive_remote: str | None = Field(default=None, validation_alias="FUSELINE_ARCHIVE_REMOTE")

    @field_validator("download_retry_seconds", mode="before")
    @classmethod
    def _seconds(cls, value: Any, info: ValidationInfo) -> float:
        return env_float(cls.variable(info.field_name), value, minimum=0)

    @field_validator("download_attempts", mode="before")
    @classmethod
    def _attempts(cls, value: Any, info: ValidationInfo) -> int:
        return env_int(cls.variable(info.field_name), value, minimum=1)

    @property
    def download_cache(self) -> Path:
        """FUSELINE_CACHE_DIR, else $XDG_CACHE_HOME/fuseline, else ~/.cache/fuseline."""
        if self.cache_dir is not None:
            return self.cache_dir.expanduser()
        return (self.xdg_cache_home or Path.home() / ".cache") / "fuseline"
