"""The catalog: the parsed, validated `templates.json` (version 1) shared by the build stages and the worker.

Only pydantic and the standard library may be imported here: the worker image and every DVC stage import
this module, and neither should pay for torch, diffusers or DVC to read a JSON file.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from fuseline import block_weights
from fuseline.redact import SECRET_QUERY_PARAMS

__all__ = [
    "CATALOG_VERSION",
    "ID_PATTERN",
    "SCHEMES",
    "SHA256_PATTERN",
    "SOURCE_PATTERN",
    "Catalog",
    "CatalogError",
    "Checkpoint",
    "Defaults",
    "LoraSpec",
    "ParsedSource",
    "Problem",
    "Source",
    "SourceError",
    "Template",
    "VaeSpec",
    "catalog_json_schema",
    "format_path",
    "load_catalog",
    "parse_catalog",
    "parse_source",
]

CATALOG_VERSION = 1

# Ids become DVC params paths (`templates.<id>`, split on dots) and folder names (`artifacts/models/<id>`),
# so only characters that are safe in both are allowed.
ID_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$"
ID_MAX_LENGTH = 64
SHA256_PATTERN = r"^[0-9a-fA-F]{64}$"
SCHEMES = ("civitai", "hf", "https", "s3", "file")


# The syntax of a source string, for editors that read the JSON Schema. `parse_source` is the authority
# (it explains what is wrong); tests check that both accept the same strings.
def _any_case(word: str) -> str:
    # JSON Schema regexes take no flags, so case-insensitivity is spelled out per letter.
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in word)


# An https URL with credentials in it would be copied into dvc.lock, fuseline.json and the release manifest.
_SECRET_QUERY = r"\?(?:[^#\s]*[&;])?(?:" + "|".join(_any_case(p) for p in SECRET_QUERY_PARAMS) + ")="
SOURCE_PATTERN = (
    r"^(civitai:[0-9]+"
    r"|hf:[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(?:/(?!\.\.?[/@])[^/@\s]+)*@[0-9a-f]{40}"
    r"|https://(?![^\s?#]*" + _SECRET_QUERY + r")[^/\s?#@]+(?:[/?#][^\s]*)?"
    r"|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/[^\s]+"
    r"|file:(?!//)\S(?:[^\x00-\x1f]*\S)?)$"
)

# Pickle-based weight files run arbitrary code when loaded.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

_HF_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HF_REVISION = re.compile(r"^[0-9a-f]{40}$")
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SHA256 = re.compile(SHA256_PATTERN)
_ID = re.compile(ID_PATTERN)
_SOURCE_FORMS = (
    "civitai:<modelVersionId>, hf:<org>/<repo>[/<file>]@<40-hex revision>, https://<host>/<path>, "
    "s3://<bucket>/<key> or file:<path>"
)


# --------------------------------------------------------------------------------------------------------
# Problems


@dataclass(frozen=True)
class Problem:
    """One thing wrong with (or worth knowing about) a catalog, located by file and JSON path."""

    file: str
    path: str
    message: str
    hint: str = ""
    severity: Literal["error", "warning"] = "error"
    code: str = ""

    def __str__(self) -> str:
        where = f"{self.file}: {self.path}: " if self.path else f"{self.file}: "
        kind = "warning: " if self.severity == "warning" else ""
        fix = f" (fix: {self.hint})" if self.hint else ""
        return f"{where}{kind}{self.message}{fix}"


class CatalogError(Exception):
    """A catalog that cannot be used. `problems` holds every error found (and the warnings), not just the
    first, so one run of `fuseline validate` shows everything to fix."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]


def _fail(code: str, message: str, hint: str = "", at: tuple[str | int, ...] = ()) -> PydanticCustomError:
    """An error of ours for pydantic to collect. `at` extends the location pydantic reports (a model
    validator is located at its model; the problem is at one of its fields)."""
    # The message travels in the context so that braces in it are never taken for a template.
    return PydanticCustomError(code, "{message}", {"message": message, "hint": hint, "at": at})


_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")


def format_path(loc: tuple[str | int, ...] | list[str | int]) -> str:
    """`("templates", "cinematic", "loras", 1, "scale")` -> `templates.cinematic.loras[1].scale`.
    Keys that would be ambiguous in dotted form (dots, spaces, empty) are quoted: `templates["a.b"]`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part)}]"
    return out


# --------------------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class ParsedSource:
    """A source string taken apart. Which fields are set depends on `scheme`:
    civitai: version_id; hf: repo, path (None for the whole repo), revision; https: url;
    s3: bucket, key; file: path (as written, relative to the catalog's folder unless absolute)."""

    scheme: Literal["civitai", "hf", "https", "s3", "file"]
    raw: str
    version_id: str | None = None
    repo: str | None = None
    path: str | None = None
    revision: str | None = None
    url: str | None = None
    bucket: str | None = None
    key: str | None = None

    @property
    def filename(self) -> str | None:
        """The last path component of the file the source names, when the source string shows one
        (a Civitai version id does not: its file name is known only after asking Civitai)."""
        if self.scheme == "hf":
            return self.path.rsplit("/", 1)[-1] if self.path else None
        if self.scheme == "https":
            tail = urlsplit(self.url or "").path.rsplit("/", 1)[-1]
            return tail or None
        if self.scheme == "s3":
            return (self.key or "").rsplit("/", 1)[-1] or None
        if self.scheme == "file":
            return (self.path or "").rstrip("/").rsplit("/", 1)[-1] or None
        return None

    @property
    def is_pickle(self) -> bool:
        """True when the named file is a pickle-based format (.ckpt/.pt/.pth/.bin)."""
        name = (self.filename or "").lower()
        return name.endswith(PICKLE_SUFFIXES)


class SourceError(ValueError):
    """A source string that cannot be used: `problem` says what is wrong, `hint` how to write it."""

    def __init__(self, problem: str, hint: str):
        self.problem = problem
        self.hint = hint
        super().__init__(f"{problem}; {hint}")


_HF_PIN_HINT = (
    "pin it to a commit: hf:<org>/<repo>[/<file>]@<40-hex commit sha>, the sha from the repo's "
    "'Files and versions' -> 'History' page (a branch or tag such as main moves)"
)


def parse_source(text: str) -> ParsedSource:
    """Parse a source string (`civitai:`, `hf:`, `https://`, `s3://`, `file:`). Raises SourceError (a
    ValueError) saying what is wrong and what a valid one looks like."""
    if not isinstance(text, str):
        raise SourceError(
            f"a source must be a string, got {type(text).__name__}", f"write one of {_SOURCE_FORMS}"
        )
    if not text or text != text.strip():
        raise SourceError(
            f"source {text!r} is empty or has surrounding whitespace", f"write one of {_SOURCE_FORMS}"
        )
    if not text.isprintable():
        raise SourceError(f"source {text!r} contains control characters", f"write one of {_SOURCE_FORMS}")
    if text.startswith("civitai:"):
        version_id = text[len("civitai:") :]
        if not version_id.isascii() or not version_id.isdigit():
            raise SourceError(
                f"civitai source {text!r} needs a numeric model version id",
                "write civitai:<modelVersionId>, the number after ?modelVersionId= in the Civitai page URL",
            )
        return ParsedSource("civitai", text, version_id=version_id)
    if text.startswith("hf:"):
        body = text[len("hf:") :]
        if "@" not in body:
            raise SourceError(f"hf source {text!r} is not pinned to a revision", _HF_PIN_HINT)
        location, revision = body.rsplit("@", 1)
        if not _HF_REVISION.match(revision):
            raise SourceError(
                f"hf source {text!r} is pinned to {revision!r}, which is not a 40-hex commit sha",
                _HF_PIN_HINT,
            )
        parts = location.split("/")
        if len(parts) < 2 or not all(_HF_NAME.match(p) for p in parts[:2]):
            raise SourceError(
                f"hf source {text!r} does not name a repository",
                "write hf:<org>/<repo>[/<file in repo>]@<revision>",
            )
        path_parts = parts[2:]
        if any(p in ("", ".", "..") or "@" in p or any(c.isspace() for c in p) for p in path_parts):
            raise SourceError(
                f"hf source {text!r} has an empty, '.', '..' or unusual component in its file path",
                "write the path inside the repository, e.g. hf:org/repo/vae/model.safetensors@<revision>",
            )
        return ParsedSource(
            "hf", text, repo="/".join(parts[:2]), path="/".join(path_parts) or None, revision=revision
        )
    if text.startswith("https://"):
        parts = urlsplit(text)
        if not parts.hostname or any(c.isspace() for c in text):
            raise SourceError(f"https source {text!r} is not a valid URL", "write https://<host>/<path>")
        no_secrets = (
            "the source is copied into dvc.lock, fuseline.json and the release manifest, so it must hold no "
            "credentials: use civitai:<modelVersionId> (the key comes from CIVITAI_API_KEY) or copy the file "
            "to a bucket and use s3://<bucket>/<key> (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
        )
        if "@" in parts.netloc:
            # Named without the password: this message is printed and logged.
            raise SourceError(
                f"https source for host {parts.hostname!r} has a user:password@ part", no_secrets
            )
        secret = [
            name
            for name, sep, _ in (p.partition("=") for p in re.split(r"[&;]", parts.query))
            if sep and name.lower() in SECRET_QUERY_PARAMS
        ]
        if secret:
            raise SourceError(
                f"https source {parts.scheme}://{parts.netloc}{parts.path} has a secret-looking query "
                f"parameter {secret[0]!r}",
                no_secrets,
            )
        return ParsedSource("https", text, url=text)
    if text.startswith("s3://"):
        bucket, _, key = text[len("s3://") :].partition("/")
        if not _S3_BUCKET.match(bucket) or not key or any(c.isspace() for c in key):
            raise SourceError(
                f"s3 source {text!r} does not name a bucket and an object key",
                "write s3://<bucket>/<key> (bucket: 3-63 lowercase letters, digits, dots, hyphens)",
            )
        return ParsedSource("s3", text, bucket=bucket, key=key)
    if text.startswith("file:"):
        path = text[len("file:") :]
        if path.startswith("//"):
            raise SourceError(
                f"file source {text!r} is written as a file:// URL",
                "write file:<path> (relative to the catalog's folder) or file:/absolute/path",
            )
        if not path:
            raise SourceError(f"file source {text!r} names no path", "write file:<path>")
        if path != path.strip():
            raise SourceError(f"file source {text!r} has whitespace after file:", "write file:<path>")
        return ParsedSource("file", text, path=path)
    scheme = text.split(":", 1)[0] if ":" in text else ""
    if scheme == "http":
        raise SourceError(
            f"source {text!r} uses plain http", "use https:// so the download cannot be tampered with"
        )
    named = f"unknown source scheme {scheme!r}" if scheme else "no source scheme"
    raise SourceError(f"{named} in {text!r}", f"write one of {_SOURCE_FORMS}")


# --------------------------------------------------------------------------------------------------------
# The model

_STRICT = ConfigDict(strict=True, extra="forbid")


def _check_id(value: str) -> str:
    """Validate a checkpoint or template id (a dict key) and say why a bad one is bad."""
    reasons = []
    if not value:
        reasons.append("it is empty")
    if len(value) > ID_MAX_LENGTH:
        reasons.append(f"it is {len(value)} characters long (at most {ID_MAX_LENGTH})")
    if "." in value:
        reasons.append("dots break DVC params paths (templates.<id> is split on dots)")
    if "/" in value or "\\" in value:
        reasons.append("slashes turn the id into nested paths under artifacts/")
    if any(c.isupper() for c in value):
        reasons.append("it has uppercase letters")
    if value.startswith("-") or value.endswith("-"):
        reasons.append("it starts or ends with a hyphen")
    if not reasons and not _ID.match(value):
        reasons.append("it has characters other than lowercase letters, digits and hyphens")
    if reasons:
        suggestion = re.sub(r"[^a-z0-9]+", "-", value.lower()).strip("-")[:ID_MAX_LENGTH].strip("-")
        hint = "use lowercase letters, digits and hyphens only, 1-64 characters"
        if suggestion and suggestion != value:
            hint += f", e.g. {suggestion!r}"
        raise _fail("id_invalid", f"id {value!r} is not allowed: {'; '.join(reasons)}", hint)
    return value


Id = Annotated[str, AfterValidator(_check_id)]


class Source(BaseModel):
    """Where a file (or, for `file:`, a folder) comes from, and how it is pinned."""

    model_config = _STRICT

    source: str = Field(
        description="Where to get it: civitai:<modelVersionId>, hf:<org>/<repo>[/<file>]@<40-hex revision>, "
        "https://..., s3://<bucket>/<key> or file:<path> (relative to the catalog's folder).",
        json_schema_extra={"pattern": SOURCE_PATTERN},
    )
    sha256: str | None = Field(
        default=None,
        description="SHA-256 of the file (64 hex digits). A download that does not match fails. "
        "hf: sources are pinned by revision; file: sources need none.",
        json_schema_extra={"pattern": SHA256_PATTERN},
    )
    allow_pickle: bool = Field(
        default=False,
        description="Allow a pickle-based file (.ckpt, .pt, .pth, .bin), which can run code when loaded.",
    )

    @field_validator("source")
    @classmethod
    def _source_parses(cls, value: str) -> str:
        try:
            parse_source(value)
        except SourceError as exc:
            raise _fail("source_invalid", exc.problem, exc.hint) from None
        return value

    @field_validator("sha256")
    @classmethod
    def _sha256_is_hex(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not _SHA256.match(value):
            raise _fail(
                "sha256_invalid",
                f"sha256 must be 64 hex digits, got {value!r} ({len(value)} characters)",
                "paste the full SHA-256 (sha256sum FILE, or the SHA256 shown on the Civitai/Hugging Face "
                "file page), not the short AutoV2 hash",
            )
        return value.lower()

    @model_validator(mode="after")
    def _pickle_needs_consent(self) -> Source:
        if parse_source(self.source).is_pickle and not self.allow_pickle:
            raise _pickle_error(self.source)
        return self

    @property
    def parsed(self) -> ParsedSource:
        return parse_source(self.source)


def _pickle_error(source: str) -> PydanticCustomError:
    return _fail(
        "pickle_not_allowed",
        f"source {source!r} is a pickle-based file, which can run arbitrary code when loaded",
        'prefer a .safetensors file; if you trust this one, add "allow_pickle": true',
        at=("source",),
    )


class VaeSpec(Source):
    """The VAE every template's export uses (typically the fp16-fix SDXL VAE). Absent: keep each
    checkpoint's own VAE."""


class Checkpoint(Source):
    """A base SDXL checkpoint: a single-file .safetensors, or a diffusers-layout folder."""

    prediction: Literal["epsilon", "v_prediction"] = Field(
        default="epsilon",
        description="What the UNet predicts: epsilon (most SDXL models) or v_prediction (NoobAI-style). "
        "diffusers cannot detect it from an SDXL single file, so the catalog says it.",
    )
    config: str | None = Field(
        default=None,
        description="hf: or file: source of a diffusers-layout config folder (model_index.json, component "
        "configs, both tokenizers) used to convert the checkpoint offline. Absent: SDXL base's.",
        json_schema_extra={"pattern": SOURCE_PATTERN},
    )

    @field_validator("config")
    @classmethod
    def _config_is_folder_source(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            parsed = parse_source(value)
        except SourceError as exc:
            raise _fail("source_invalid", exc.problem, exc.hint) from None
        if parsed.scheme not in ("hf", "file"):
            raise _fail(
                "config_scheme",
                f"config {value!r} must name a folder, as an hf: repository or a file: folder",
                "use hf:<org>/<repo>@<revision> or file:<folder>",
            )
        return value


BLOCK_WEIGHT_LIMIT = 4.0
_BLOCK_WEIGHT_ITEMS = {"type": "number", "minimum": -BLOCK_WEIGHT_LIMIT, "maximum": BLOCK_WEIGHT_LIMIT}


class LoraSpec(Source):
    """A LoRA fused into the template's checkpoint."""

    scale: float = Field(
        default=1.0,
        ge=-4,
        le=4,
        allow_inf_nan=False,
        description="Strength of the LoRA, a finite number from -4 to 4 (1.0 = as trained).",
    )
    block_weights: list[float] | str | None = Field(
        default=None,
        # Left out of the spec when absent, so that adding the field changed no template's spec hash.
        exclude_if=lambda value: value is None,
        description="Per-block strength (A1111 LoRA Block Weight convention for SDXL): 12 numbers (BASE, "
        "IN04, IN05, IN07, IN08, MID, OUT00-OUT05), 20 numbers (BASE, IN00-IN08, MID, OUT00-OUT08), or a "
        f"preset ({', '.join(block_weights.PRESETS)}). Each multiplies scale for the modules of its block; "
        "blocks a 12-value list leaves out get 0. Absent: every module at scale.",
        json_schema_extra={
            "anyOf": [
                {"type": "array", "items": _BLOCK_WEIGHT_ITEMS, "minItems": count, "maxItems": count}
                for count in block_weights.LAYOUTS
            ]
            + [{"enum": list(block_weights.PRESETS)}, {"type": "null"}]
        },
    )

    @field_validator("block_weights", mode="before")
    @classmethod
    def _block_weights_known(cls, value: Any) -> Any:
        if value is None:
            return None
        layouts = " or ".join(
            f"{count} numbers ({text})" for count, text in block_weights.LAYOUT_TEXT.items()
        )
        presets = ", ".join(block_weights.PRESETS)
        if isinstance(value, str):
            if value not in block_weights.PRESETS:
                close = difflib.get_close_matches(value, list(block_weights.PRESETS), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise _fail(
                    "block_weights_preset_unknown",
                    f"unknown block weight preset {value!r}",
                    f"{hint}use one of {presets}, or a list of {layouts}",
                )
            return value
        if not isinstance(value, list):
            raise _fail(
                "block_weights_type",
                f"block_weights must be a list of numbers or a preset name, got {_show(value)}",
                f"use a list of {layouts}, or one of {presets}",
            )
        if len(value) not in block_weights.LAYOUTS:
            sd1 = ", the extension's SD 1.x layout" if len(value) in block_weights.SD1_COUNTS else ""
            raise _fail(
                "block_weights_count",
                f"block_weights has {len(value)} values{sd1}; SDXL takes 12 or 20",
                f"use {layouts}",
            )
        for index, item in enumerate(value):
            number = isinstance(item, int | float) and not isinstance(item, bool)
            if not number or not -BLOCK_WEIGHT_LIMIT <= item <= BLOCK_WEIGHT_LIMIT:
                raise _fail(
                    "block_weights_value",
                    f"block weight {index} ({block_weights.LAYOUTS[len(value)][index]}) must be a finite "
                    f"number from {-BLOCK_WEIGHT_LIMIT:g} to {BLOCK_WEIGHT_LIMIT:g}, got {_show(item)}",
                    "use a number such as 0.5 (NaN, Infinity and true are not numbers)",
                    at=(index,),
                )
        return [float(item) for item in value]

    @property
    def resolved_block_weights(self) -> tuple[float, ...] | None:
        """The block weights as numbers (a preset's values for a preset name), or None when absent."""
        return None if self.block_weights is None else block_weights.resolve(self.block_weights)


class Defaults(BaseModel):
    """Generation defaults the worker uses when a request leaves a parameter out."""

    model_config = _STRICT

    steps: int = Field(default=24, ge=1, le=150, description="Denoising steps, 1-150.")
    guidance_scale: float = Field(
        default=4.5, ge=0, le=30, allow_inf_nan=False, description="Classifier-free guidance scale, 0-30."
    )
    width: int = Field(
        default=1024,
        ge=256,
        le=2048,
        multiple_of=8,
        description="Image width in pixels: a multiple of 8, 256-2048.",
    )
    height: int = Field(
        default=1024,
        ge=256,
        le=2048,
        multiple_of=8,
        description="Image height in pixels: a multiple of 8, 256-2048.",
    )
    negative_prompt: str = Field(default="", description="Negative prompt used when a request gives none.")
    scheduler: str | None = Field(
        default=None, description="Scheduler name; absent: the one the export writes for the checkpoint."
    )


class Template(BaseModel):
    """What a served model is: a checkpoint, the LoRAs fused into it, and generation defaults."""

    model_config = _STRICT

    checkpoint: str = Field(description="Id of an entry under checkpoints.")
    loras: list[LoraSpec] = Field(default_factory=list, description="LoRAs fused in this order.")
    defaults: Defaults = Field(default_factory=Defaults, description="Generation defaults for the worker.")


class Catalog(BaseModel):
    """templates.json, version 1: the checkpoints and the templates built from them."""

    model_config = ConfigDict(strict=True, extra="forbid", title="fuseline templates.json")

    version: Literal[1] = Field(description="Catalog format version; this fuseline reads 1.")
    vae: VaeSpec = Field(
        description="VAE for every export (for SDXL the fp16-fix VAE: exports are fp16 and SDXL's own "
        "VAE overflows in fp16). Required: the pipeline converts it once and every merge uses it."
    )
    checkpoints: dict[Id, Checkpoint] = Field(
        description="Base checkpoints by id (converted once, shared by templates).",
        json_schema_extra={"propertyNames": {"pattern": ID_PATTERN, "maxLength": ID_MAX_LENGTH}},
    )
    templates: dict[Id, Template] = Field(
        min_length=1,
        description="Templates by id; each becomes one merged model.",
        json_schema_extra={"propertyNames": {"pattern": ID_PATTERN, "maxLength": ID_MAX_LENGTH}},
    )

    _path: Path | None = PrivateAttr(default=None)
    _warnings: list[Problem] = PrivateAttr(default_factory=list)

    @field_validator("version", mode="before")
    @classmethod
    def _version_not_bool(cls, value: Any) -> Any:
        # JSON `true` would otherwise pass as 1 (bool is an int in Python).
        if isinstance(value, bool):
            raise _fail(
                "version_unsupported",
                f"version must be the number 1, got {json.dumps(value)}",
                'set "version": 1',
            )
        return value

    @model_validator(mode="after")
    def _templates_name_existing_checkpoints(self) -> Catalog:
        for template_id, template in self.templates.items():
            if template.checkpoint not in self.checkpoints:
                raise _unknown_checkpoint(template_id, template.checkpoint, list(self.checkpoints))
        return self

    @property
    def path(self) -> Path | None:
        """The file this catalog was loaded from (absolute), or None when parsed from text."""
        return self._path

    @property
    def warnings(self) -> list[Problem]:
        """Things that do not stop a build but are probably mistakes (an unused checkpoint, ...)."""
        return self._warnings

    def template_spec(self, template_id: str) -> dict[str, Any]:
        """Everything that defines the template's build, as plain JSON (defaults filled in, so writing a
        default value out or leaving it implicit gives the same spec)."""
        if template_id not in self.templates:
            raise KeyError(
                f"no template {template_id!r} in the catalog; templates: {', '.join(sorted(self.templates))}"
            )
        template = self.templates[template_id]
        checkpoint = self.checkpoints[template.checkpoint]
        return {
            "id": template_id,
            "template": template.model_dump(mode="json"),
            "checkpoint": {"id": template.checkpoint, **checkpoint.model_dump(mode="json")},
            "vae": self.vae.model_dump(mode="json") if self.vae is not None else None,
        }

    def spec_hash(self, template_id: str) -> str:
        """SHA-256 (hex) of the canonical JSON of `template_spec` (sorted keys, no spaces)."""
        canonical = json.dumps(
            self.template_spec(template_id), sort_keys=True, separators=(",", ":"), allow_nan=False
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def resolve_file(self, source: str | ParsedSource) -> Path:
        """The absolute path a `file:` source names: relative paths are taken from the catalog's folder
        (the current directory for a catalog parsed from text)."""
        parsed = source if isinstance(source, ParsedSource) else parse_source(source)
        if parsed.scheme != "file" or parsed.path is None:
            raise ValueError(f"{parsed.raw!r} is not a file: source")
        base = self._path.parent if self._path is not None else Path.cwd()
        return (base / Path(parsed.path).expanduser()).resolve()

    def iter_sources(self) -> Iterator[tuple[str, Source]]:
        """Every source object in the catalog with its JSON path, in document order."""
        if self.vae is not None:
            yield "vae", self.vae
        for checkpoint_id, checkpoint in self.checkpoints.items():
            yield format_path(("checkpoints", checkpoint_id)), checkpoint
        for template_id, template in self.templates.items():
            for index, lora in enumerate(template.loras):
                yield format_path(("templates", template_id, "loras", index)), lora


def _unknown_checkpoint(template_id: str, name: str, existing: list[str]) -> PydanticCustomError:
    close = difflib.get_close_matches(name, existing, n=1)
    if existing:
        hint = f"use one of: {', '.join(existing)}"
        if close:
            hint = f"did you mean {close[0]!r}? " + hint
        hint += f" (or add {name!r} under checkpoints)"
    else:
        hint = f"add {name!r} under checkpoints"
    return _fail(
        "checkpoint_unknown",
        f"template {template_id!r} names checkpoint {name!r}, which is not in checkpoints",
        hint,
        at=("templates", template_id, "checkpoint"),
    )


def catalog_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of templates.json v1, generated from the model. It checks shape,
    types, ranges and the syntax of ids and sources; `fuseline validate` also checks what a schema cannot
    (that each template's checkpoint exists, pinned hf revisions, pickle consent)."""
    schema = Catalog.model_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **schema,
    }


# --------------------------------------------------------------------------------------------------------
# Loading and error translation


class _JsonObject(dict):
    """A parsed JSON object that remembers which keys appeared more than once (json keeps the last)."""

    duplicates: list[str]


def _object_pairs(pairs: list[tuple[str, Any]]) -> _JsonObject:
    obj = _JsonObject()
    obj.duplicates = []
    for key, value in pairs:
        if key in obj and key not in obj.duplicates:
            obj.duplicates.append(key)
        obj[key] = value
    return obj


def _duplicate_problems(node: Any, loc: tuple[str | int, ...], file: str) -> Iterator[Problem]:
    if isinstance(node, dict):
        for key in getattr(node, "duplicates", []):
            yield Problem(
                file,
                format_path((*loc, key)),
                f"key {key!r} appears more than once in this object; JSON keeps only the last one",
                "remove or rename the duplicate (two templates or checkpoints need two different ids)",
                code="duplicate_key",
            )
        for key, value in node.items():
            yield from _duplicate_problems(value, (*loc, key), file)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _duplicate_problems(value, (*loc, index), file)


def _show(value: Any) -> str:
    """A short JSON rendering of a value for messages (NaN and Infinity shown as such)."""
    try:
        text = json.dumps(value, allow_nan=True, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# What each field must be, and how to fix it, for translating pydantic's type and range errors.
_FIELD_RULES: dict[str, tuple[str, str]] = {
    "version": ("the number 1", 'set "version": 1'),
    "vae": (
        'an object like {"source": "hf:madebyollin/sdxl-vae-fp16-fix@<revision>"} (the fp16-fix VAE)',
        'write "vae": {"source": "hf:madebyollin/sdxl-vae-fp16-fix@<revision>"}',
    ),
    "checkpoints": (
        "an object mapping checkpoint ids to checkpoints",
        'write "checkpoints": {"<id>": {...}}',
    ),
    "templates": ("an object mapping template ids to templates", 'write "templates": {"<id>": {...}}'),
    "source": ("a source string", f"write one of {_SOURCE_FORMS}"),
    "sha256": ("a string of 64 hex digits", "paste the file's full SHA-256"),
    "allow_pickle": ("true or false", "write true or false, without quotes"),
    "prediction": ('"epsilon" or "v_prediction"', 'use "epsilon" unless the model card says v-prediction'),
    "config": ("a source string naming a config folder", "use hf:<org>/<repo>@<revision> or file:<folder>"),
    "scale": (
        "a finite number from -4 to 4",
        "use a number such as 0.8 (NaN, Infinity and true are not numbers)",
    ),
    "checkpoint": ("a checkpoint id (a string)", "name one of the ids under checkpoints"),
    "loras": ("a list of LoRA objects", 'write "loras": [{"source": "...", "scale": 1.0}]'),
    "defaults": ("an object of generation defaults", 'write "defaults": {"steps": 24, ...}'),
    "steps": ("an integer from 1 to 150", "use a whole number such as 24"),
    "guidance_scale": ("a finite number from 0 to 30", "use a number such as 4.5"),
    "width": ("a multiple of 8 from 256 to 2048", "use a value such as 1024 (SDXL works in 8-pixel latents)"),
    "height": (
        "a multiple of 8 from 256 to 2048",
        "use a value such as 1024 (SDXL works in 8-pixel latents)",
    ),
    "negative_prompt": ("a string", 'write "" for none'),
    "scheduler": ("a scheduler name (a string)", "remove it to use the export's scheduler"),
}


def _model_at(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The model class that validates the object at `loc` (to list its valid keys)."""
    if loc == ():
        return Catalog
    if loc == ("vae",):
        return VaeSpec
    if len(loc) == 2 and loc[0] == "checkpoints":
        return Checkpoint
    if len(loc) == 2 and loc[0] == "templates":
        return Template
    if len(loc) == 4 and loc[0] == "templates" and loc[2] == "loras":
        return LoraSpec
    if len(loc) == 3 and loc[0] == "templates" and loc[2] == "defaults":
        return Defaults
    return None


def _translate(error: dict[str, Any], file: str) -> Problem:
    """Turn one pydantic error into a Problem with a JSON path, a plain message and a fix."""
    kind = error["type"]
    loc = tuple(error["loc"])
    ctx = error.get("ctx") or {}
    value = error.get("input")
    if "message" in ctx:  # one of ours
        if loc and loc[-1] == "[key]":  # a bad dict key: point at the key itself
            loc = loc[:-1]
        loc = (*loc, *ctx.get("at", ()))
        return Problem(file, format_path(loc), ctx["message"], ctx.get("hint", ""), code=kind)
    if kind == "extra_forbidden":
        key = str(loc[-1])
        model = _model_at(loc[:-1])
        valid = list(model.model_fields) if model else []
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        hint += f"valid keys here: {', '.join(valid)}" if valid else "remove it"
        return Problem(file, format_path(loc), f"unknown key {key!r}", hint, code="unknown_key")
    if kind == "missing":
        key = str(loc[-1])
        if key == "version":
            hint = 'add "version": 1 at the top of the file'
        elif key in _FIELD_RULES:
            hint = f"add {key!r}: {_FIELD_RULES[key][0]}"
        else:
            hint = f"add {key!r}"
        return Problem(file, format_path(loc), f"required key {key!r} is missing", hint, code="missing_key")
    if kind in ("model_type", "model_attributes_type", "dict_type") and (
        not loc or not isinstance(loc[-1], str) or loc[-1] not in _FIELD_RULES
    ):
        what = "the catalog" if not loc else "this entry"
        return Problem(
            file,
            format_path(loc),
            f"{what} must be a JSON object, got {_show(value)}",
            "write it as {...}",
            code="not_an_object",
        )
    if kind == "literal_error" and loc == ("version",):
        return Problem(
            file,
            "version",
            f"unsupported catalog version {_show(value)}; this fuseline reads version {CATALOG_VERSION}",
            f'set "version": {CATALOG_VERSION} (or upgrade fuseline if the file was written for a newer one)',
            code="version_unsupported",
        )
    if kind == "too_short" and loc == ("templates",):
        return Problem(
            file,
            "templates",
            "templates is empty; there is nothing to build",
            'add at least one template: "templates": {"<id>": {"checkpoint": "<checkpoint id>"}}',
            code="templates_empty",
        )
    field = next((part for part in reversed(loc) if isinstance(part, str)), "")
    if field in _FIELD_RULES:
        rule, hint = _FIELD_RULES[field]
        return Problem(file, format_path(loc), f"{field} must be {rule}, got {_show(value)}", hint, code=kind)
    return Problem(
        file, format_path(loc), f"invalid value {_show(value)}", "see docs/templates.md", code=kind
    )


def _raw_sources(data: dict[str, Any]) -> Iterator[tuple[tuple[str | int, ...], dict[str, Any]]]:
    if isinstance(data.get("vae"), dict):
        yield ("vae",), data["vae"]
    if isinstance(data.get("checkpoints"), dict):
        for key, value in data["checkpoints"].items():
            if isinstance(value, dict):
                yield ("checkpoints", key), value
    if isinstance(data.get("templates"), dict):
        for key, template in data["templates"].items():
            if isinstance(template, dict) and isinstance(template.get("loras"), list):
                for index, value in enumerate(template["loras"]):
                    if isinstance(value, dict):
                        yield ("templates", key, "loras", index), value


def _cross_field_problems(data: dict[str, Any], file: str) -> Iterator[Problem]:
    """Checks that span fields, run on the raw data so that they are reported even when other parts of
    the catalog fail validation (pydantic runs a model's own cross-field check only when its fields are
    valid). The model runs the same checks, so a catalog built in code gets them too."""
    for loc, obj in _raw_sources(data):
        source = obj.get("source")
        try:
            pickle = isinstance(source, str) and parse_source(source).is_pickle
        except SourceError:
            pickle = False
        if pickle and obj.get("allow_pickle") is not True:
            err = _pickle_error(source)
            yield Problem(
                file,
                format_path((*loc, "source")),
                err.context["message"],
                err.context["hint"],
                code=err.type,
            )
    checkpoints = data.get("checkpoints")
    templates = data.get("templates")
    if not isinstance(checkpoints, dict) or not isinstance(templates, dict):
        return
    for template_id, template in templates.items():
        if isinstance(template, dict) and isinstance(template.get("checkpoint"), str):
            name = template["checkpoint"]
            if name not in checkpoints:
                err = _unknown_checkpoint(template_id, name, list(checkpoints))
                yield Problem(
                    file,
                    format_path(("templates", template_id, "checkpoint")),
                    err.context["message"],
                    err.context["hint"],
                    code=err.type,
                )


def _warning_problems(catalog: Catalog, file: str, check_files: bool) -> Iterator[Problem]:
    used = {template.checkpoint for template in catalog.templates.values()}
    for checkpoint_id in catalog.checkpoints:
        if checkpoint_id not in used:
            yield Problem(
                file,
                format_path(("checkpoints", checkpoint_id)),
                f"checkpoint {checkpoint_id!r} is not used by any template (dvc repro still converts it)",
                'remove it, or name it in a template\'s "checkpoint"',
                "warning",
                "checkpoint_unused",
            )
    for path, source in catalog.iter_sources():
        parsed = source.parsed
        if parsed.scheme in ("civitai", "https", "s3") and source.sha256 is None:
            yield Problem(
                file,
                f"{path}.sha256",
                f"{parsed.scheme} source {source.source!r} has no sha256: a changed upload goes unnoticed",
                'add "sha256": "<64 hex digits>" (sha256sum FILE)',
                "warning",
                "sha256_missing",
            )
        if check_files and parsed.scheme == "file" and not catalog.resolve_file(parsed).exists():
            yield Problem(
                file,
                f"{path}.source",
                f"{source.source!r} does not exist ({catalog.resolve_file(parsed)})",
                "file: paths are relative to the catalog's folder; fix the path or create the file",
                "warning",
                "file_missing",
            )


_LAST_STEP = re.compile(r"(\.[^.\[]+|\[[^\]]*\])$")


def _in_document_order(problems: list[Problem], data: Any) -> list[Problem]:
    """Sort problems the way their places appear in the file, so the report reads top to bottom (a
    problem about a key that is not in the file, e.g. a missing one, sorts with its parent)."""
    order: dict[str, int] = {}

    def walk(node: Any, loc: tuple[str | int, ...]) -> None:
        order.setdefault(format_path(loc), len(order))
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, (*loc, key))
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, (*loc, index))

    walk(data, ())

    def position(problem: Problem) -> int:
        path = problem.path
        while path not in order and path:
            parent = _LAST_STEP.sub("", path)
            path = parent if parent != path else ""  # a top-level key: its parent is the root
        return order.get(path, 0)

    return sorted(problems, key=position)


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen: set[tuple[str, str, str]] = set()
    out = []
    for problem in problems:
        key = (problem.path, problem.code, problem.message)
        if key not in seen:
            seen.add(key)
            out.append(problem)
    return out


def _parse(text: str, file: str, path: Path | None) -> Catalog:
    try:
        data = json.loads(text, object_pairs_hook=_object_pairs)
    except json.JSONDecodeError as exc:
        raise CatalogError(
            [
                Problem(
                    file,
                    "",
                    f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                    "fix the JSON syntax there (usually a missing comma or quote, or a trailing comma)",
                    code="invalid_json",
                )
            ]
        ) from None
    problems = list(_duplicate_problems(data, (), file))
    catalog: Catalog | None = None
    try:
        catalog = Catalog.model_validate(data)
    except ValidationError as exc:
        problems.extend(_translate(error, file) for error in exc.errors())
    if isinstance(data, dict):
        problems.extend(_cross_field_problems(data, file))
    if catalog is not None:
        catalog._path = path
        problems.extend(_warning_problems(catalog, file, check_files=path is not None))
    problems = _in_document_order(_dedupe(problems), data)
    if catalog is None or any(p.severity == "error" for p in problems):
        raise CatalogError(problems)
    catalog._warnings = problems
    return catalog


def parse_catalog(text: str, file: str = "templates.json") -> Catalog:
    """Parse and validate catalog text; `file` names it in problems. Raises CatalogError with every
    problem found; warnings end up on `catalog.warnings`."""
    return _parse(text, file, None)


def load_catalog(path: str | Path) -> Catalog:
    """Read, parse and validate a templates.json. Raises CatalogError with every problem found."""
    path = Path(path)
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CatalogError(
            [
                Problem(
                    file,
                    "",
                    "file not found",
                    "create it (see docs/templates.md) or pass its path",
                    code="not_found",
                )
            ]
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogError(
            [Problem(file, "", f"cannot read the file: {exc}", "save it as UTF-8 text", code="unreadable")]
        ) from None
    return _parse(text, file, path.absolute())
