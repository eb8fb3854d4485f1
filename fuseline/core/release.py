"""The release manifest: which published model folder (by DVC hash) each template of a channel serves.

Publishing writes it to the remote (`releases/<channel>.json`, plus an immutable copy
`releases/<channel>/<timestamp>.json`) only after every object it names is on the remote; the worker's
sync reads it and needs nothing else (no DVC, no git) to fetch and verify every file of every template.
Only pydantic and the standard library here: the worker imports this module.

Objects live in DVC's remote layout under the remote's root: `files/md5/<2 hex>/<30 hex>` for a file and
`files/md5/<2 hex>/<30 hex>.dir` for a folder's listing (JSON `[{"md5": ..., "relpath": ...}, ...]`).
"""

from __future__ import annotations

import json
import re
from pathlib import PurePosixPath

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fuseline.core.catalog.model import ID_PATTERN

RELEASE_FORMAT = 1
MD5_DIR_PATTERN = re.compile(r"^[0-9a-f]{32}\.dir$")
MD5_PATTERN = re.compile(r"^[0-9a-f]{32}$")
TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"  # also the history object's name: sortable, no ':' (unsafe in keys)
# A release id: TIMESTAMP_FORMAT's shape. It names a history object, so nothing else may (no '/' or '..').
RELEASE_ID_PATTERN = re.compile(r"^[0-9]{8}T[0-9]{6}Z$")


def object_key(md5: str) -> str:
    """Key of a DVC object (file md5, or `<md5>.dir` for a folder listing) relative to the remote root."""
    return f"files/md5/{md5[:2]}/{md5[2:]}"


def release_key(channel: str) -> str:
    return f"releases/{channel}.json"


def history_key(channel: str, timestamp: str) -> str:
    return f"releases/{channel}/{timestamp}.json"


def _check_dir_md5(value: str) -> str:
    if not MD5_DIR_PATTERN.match(value):
        raise ValueError(f"dir_md5 must be 32 lowercase hex digits followed by .dir, got {value!r}")
    return value


def _check_relative_path(value: str) -> str:
    p = PurePosixPath(value)
    if p.is_absolute() or ".." in p.parts:
        raise ValueError(f"path must be relative without '..', got {value!r}")
    return value


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraSummary(_Frozen):
    source: str
    sha256: str
    scale: float


class EmbeddingSummary(_Frozen):
    token: str
    source: str
    sha256: str


class ReleasedFolder(_Frozen):
    """A published model folder: its DVC hash (the listing object) and where it came from."""

    dir_md5: str = Field(description="DVC hash of the model folder, `<32 hex>.dir` (its listing object).")
    path: str = Field(description="Where the folder lies in the build project, e.g. artifacts/models/<id>.")
    size: int = Field(ge=0, description="Bytes of all files in the folder.")
    nfiles: int = Field(ge=1)
    spec_hash: str = Field(description="The spec hash of the folder's fuseline.json.")
    checkpoint: str = Field(description="Checkpoint source the model was built from.")
    prediction_type: str = "epsilon"

    _dir_md5 = field_validator("dir_md5")(lambda value: _check_dir_md5(value))
    _relative_path = field_validator("path")(lambda value: _check_relative_path(value))


class ReleasedAddon(_Frozen):
    """An add-on LoRA of the release: its folder (`addon.json` + `lora.safetensors`) and what jobs may ask."""

    dir_md5: str = Field(description="DVC hash of the add-on folder, `<32 hex>.dir`.")
    path: str = Field(description="Where the folder lies in the build project, e.g. artifacts/addons/<name>.")
    size: int = Field(ge=0)
    nfiles: int = Field(ge=1)
    source: str
    sha256: str = Field(description="SHA-256 of the LoRA file.")
    default_scale: float
    min_scale: float
    max_scale: float
    templates: list[str] | None = Field(description="Templates it is offered with; null: every template.")

    _dir_md5 = field_validator("dir_md5")(lambda value: _check_dir_md5(value))
    _relative_path = field_validator("path")(lambda value: _check_relative_path(value))


class ReleasedTemplate(ReleasedFolder):
    loras: list[LoraSummary] = Field(default_factory=list)
    embeddings: list[EmbeddingSummary] | None = Field(
        default=None,
        # Absent for templates without embeddings: releases written before the field keep their bytes.
        exclude_if=lambda value: value is None,
        description="The template's textual-inversion embeddings (also inside its folder).",
    )
    refiner: str | None = Field(
        default=None,
        # Absent when unused: releases of templates without a refiner read as before.
        exclude_if=lambda value: value is None,
        description="Id of the template's refiner under `refiners` (synced with the template).",
    )


class ReleasedRefiner(ReleasedFolder):
    """An SDXL refiner folder (the convert stage's fp16 export, artifacts/base/<id>), served beside the
    templates naming it; synced to `<volume>/refiners/<id>`."""


class Release(_Frozen):
    format: int = RELEASE_FORMAT
    channel: str
    created: str = Field(description=f"UTC time of publishing, {TIMESTAMP_FORMAT}; names the history copy.")
    git_commit: str | None = None
    templates: dict[str, ReleasedTemplate]
    addons: dict[str, ReleasedAddon] | None = Field(
        default=None,
        # Absent when the catalog has no add-ons: such releases keep the bytes they had before the field.
        exclude_if=lambda value: value is None,
        description="Add-on LoRAs by name, synced beside the templates they are offered with.",
    )
    refiners: dict[str, ReleasedRefiner] = Field(
        default_factory=dict,
        # Absent when empty, so that releases without refiners keep their bytes.
        exclude_if=lambda value: not value,
        description="SDXL refiner folders by checkpoint id, named by templates' `refiner`.",
    )

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: int) -> int:
        # A newer publisher may change what the fields mean: reading a format as if it were ours could
        # sync the wrong folders, so only the formats this code knows are read.
        if value != RELEASE_FORMAT:
            raise ValueError(
                f"release format {value} is not one this fuseline reads (it reads format {RELEASE_FORMAT}); "
                "publish the release with the same fuseline version as the worker, or update the worker"
            )
        return value

    @field_validator("created")
    @classmethod
    def _release_id(cls, value: str) -> str:
        if not RELEASE_ID_PATTERN.match(value):
            raise ValueError(
                f"created must be a UTC time like 20261127T211500Z (it names the history copy), got {value!r}"
            )
        return value

    @field_validator("templates", "addons", "refiners")
    @classmethod
    def _ids(cls, value: dict | None) -> dict | None:
        # Sync joins these keys into volume paths (models/<id>, addons/<name>, refiners/<id>, locks/...):
        # only catalog ids.
        bad = [key for key in value or () if not re.match(ID_PATTERN, key)]
        if bad:
            raise ValueError(
                f"ids {bad!r} are not catalog ids (pattern {ID_PATTERN}: lowercase letters, digits "
                "and inner dashes); republish the release from templates.json"
            )
        return value

    @model_validator(mode="after")
    def _refiners_are_released(self) -> Release:
        for template_id, template in self.templates.items():
            if template.refiner is not None and template.refiner not in self.refiners:
                raise ValueError(
                    f"template {template_id!r} names refiner {template.refiner!r}, which the release lacks; "
                    "republish the release"
                )
        return self

    def folder_hashes(self) -> list[str]:
        """The `.dir` hash of every folder the release names (templates, add-ons, refiners): what must stay
        on the remote for it to be synced."""
        return (
            [t.dir_md5 for t in self.templates.values()]
            + [a.dir_md5 for a in (self.addons or {}).values()]
            + [r.dir_md5 for r in self.refiners.values()]
        )

    def addons_for(self, template_ids: list[str] | None = None) -> list[str]:
        """Names of the add-ons offered with any of `template_ids` (None: every template), sorted."""
        wanted = set(self.templates if template_ids is None else template_ids)
        offered = {
            name: set(self.templates if addon.templates is None else addon.templates)
            for name, addon in (self.addons or {}).items()
        }
        return sorted(name for name, templates in offered.items() if wanted & templates)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Release:
        return cls.model_validate_json(text)
