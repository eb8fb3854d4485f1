"""The catalog model: templates.json (version 1) as pydantic models, with the checks one entry can make."""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from fuseline.core import block_weights, serving
from fuseline.core.catalog.problems import Problem, fail, format_path, show_value
from fuseline.core.catalog.sources import (
    SHA256_PATTERN,
    SOURCE_PATTERN,
    ParsedSource,
    SourceStringError,
    parse_source,
)

CATALOG_VERSION = 1

# Ids become DVC params paths (`templates.<id>`, split on dots) and folder names (`artifacts/models/<id>`),
# so only characters that are safe in both are allowed.
ID_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$"
ID_MAX_LENGTH = 64

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
    if not reasons and not re.match(ID_PATTERN, value):
        reasons.append("it has characters other than lowercase letters, digits and hyphens")
    if reasons:
        suggestion = re.sub(r"[^a-z0-9]+", "-", value.lower()).strip("-")[:ID_MAX_LENGTH].strip("-")
        hint = "use lowercase letters, digits and hyphens only, 1-64 characters"
        if suggestion and suggestion != value:
            hint += f", e.g. {suggestion!r}"
        raise fail("ID_INVALID", f"id {value!r} is not allowed: {'; '.join(reasons)}", hint)
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
        description="Allow a pickle-based file (.ckpt, .pt, .pth, .bin, .pkl), which can run code when "
        "loaded.",
    )

    @field_validator("source")
    @classmethod
    def _source_parses(cls, value: str) -> str:
        try:
            parse_source(value)
        except SourceStringError as exc:
            raise fail("SOURCE_INVALID", exc.problem, exc.hint) from None
        return value

    @field_validator("sha256")
    @classmethod
    def _sha256_is_hex(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.match(SHA256_PATTERN, value):
            raise fail(
                "SHA256_INVALID",
                f"sha256 must be 64 hex digits, got {value!r} ({len(value)} characters)",
                "paste the full SHA-256 (sha256sum FILE, or the SHA256 shown on the Civitai/Hugging Face "
                "file page), not the short AutoV2 hash",
            )
        return value.lower()

    @model_validator(mode="after")
    def _pickle_needs_consent(self) -> Source:
        if parse_source(self.source).is_pickle and not self.allow_pickle:
            raise pickle_error(self.source)
        return self

    @property
    def parsed(self) -> ParsedSource:
        return parse_source(self.source)


def pickle_error(source: str) -> PydanticCustomError:
    return fail(
        "PICKLE_NOT_ALLOWED",
        f"source {source!r} is a pickle-based file, which can run arbitrary code when loaded",
        'prefer a .safetensors file; if you trust this one, add "allow_pickle": true',
        at=("source",),
    )


class VaeSpec(Source):
    """The VAE every template's export uses (typically the fp16-fix SDXL VAE). Absent: keep each
    checkpoint's own VAE."""


class Checkpoint(Source):
    """A base SDXL checkpoint (or an SDXL refiner, named by templates' `refiner`): a single-file
    .safetensors, or a diffusers-layout folder."""

    prediction: Literal["epsilon", "v_prediction"] = Field(
        default="epsilon",
        description="What the UNet predicts: epsilon (most SDXL models) or v_prediction (NoobAI-style). "
        "diffusers cannot detect it from an SDXL single file, so the catalog says it.",
    )
    config: str | None = Field(
        default=None,
        description="hf: or file: source of a diffusers-layout config folder (model_index.json, component "
        "configs, both tokenizers) used to convert the checkpoint offline. Absent: SDXL base's (SDXL "
        "refiner's for a refiner).",
        json_schema_extra={"pattern": SOURCE_PATTERN},
    )

    @field_validator("config")
    @classmethod
    def _config_is_folder_source(cls, value: str | None) -> str | None:
        return _config_folder(value)


def _config_folder(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        parsed = parse_source(value)
    except SourceStringError as exc:
        raise fail("SOURCE_INVALID", exc.problem, exc.hint) from None
    if parsed.scheme not in ("hf", "file"):
        raise fail(
            "CONFIG_SCHEME",
            f"config {value!r} must name a folder, as an hf: repository or a file: folder",
            "use hf:<org>/<repo>@<revision> or file:<folder>",
        )
    return value


# A weighted sum is an interpolation between two models; add difference's multiplier is commonly 0-1, and
# larger values are still a meaningful (if strong) transfer.
WEIGHTED_SUM_RANGE = (0.0, 1.0)
ADD_DIFFERENCE_LIMIT = 4.0


class RecipeInput(Source):
    """One checkpoint a recipe merges: a single-file SDXL checkpoint (.safetensors, SGM key layout)."""


class Recipe(BaseModel):
    """How a checkpoint is computed from others, key by key in fp32 (the A1111 checkpoint merger's modes):
    weighted_sum `(1 - alpha) * a + alpha * b`, add_difference `a + alpha * (b - c)`."""

    model_config = _STRICT

    method: Literal["weighted_sum", "add_difference"] = Field(
        description="weighted_sum: (1 - alpha) * a + alpha * b. add_difference: a + alpha * (b - c) (e.g. "
        "a = your model, b = an inpainting or style model, c = the base b was trained from)."
    )
    a: RecipeInput = Field(
        description="The primary model; its tensors not in b (and c) are kept as they are."
    )
    b: RecipeInput = Field(description="The second model.")
    c: RecipeInput | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="add_difference only: the model subtracted from b.",
    )
    alpha: float = Field(
        allow_inf_nan=False,
        description="weighted_sum: the share of b, 0-1. add_difference: the multiplier of (b - c), a finite "
        f"number from {-ADD_DIFFERENCE_LIMIT:g} to {ADD_DIFFERENCE_LIMIT:g}.",
    )

    @model_validator(mode="after")
    def _inputs_and_alpha_fit_method(self) -> Recipe:
        if self.method == "add_difference" and self.c is None:
            raise fail(
                "RECIPE_INPUT_MISSING",
                "add_difference needs a third model c (the result is a + alpha * (b - c))",
                'add "c": {"source": ...} (typically the base model b was trained from)',
                at=("c",),
            )
        if self.method == "weighted_sum" and self.c is not None:
            raise fail(
                "RECIPE_INPUT_UNUSED",
                "weighted_sum merges a and b only; c would be ignored",
                'remove "c", or use "method": "add_difference"',
                at=("c",),
            )
        low, high = (
            WEIGHTED_SUM_RANGE
            if self.method == "weighted_sum"
            else (-ADD_DIFFERENCE_LIMIT, ADD_DIFFERENCE_LIMIT)
        )
        if not low <= self.alpha <= high:
            raise fail(
                "RECIPE_ALPHA_RANGE",
                f"{self.method} alpha must be from {low:g} to {high:g}, got {self.alpha:g}",
                "weighted_sum's alpha is the share of b (0.3 = 70% a, 30% b)"
                if self.method == "weighted_sum"
                else f"use a multiplier from {-ADD_DIFFERENCE_LIMIT:g} to {ADD_DIFFERENCE_LIMIT:g} "
                "(1.0 = the full difference)",
                at=("alpha",),
            )
        return self

    def inputs(self) -> dict[str, RecipeInput]:
        """The models merged, by role (a, b and, for add_difference, c)."""
        found = {"a": self.a, "b": self.b}
        if self.c is not None:
            found["c"] = self.c
        return found

    @property
    def identity(self) -> str:
        """`recipe:<sha256>` of the recipe's canonical JSON: what stands for a source where one is named (the
        model manifest's checkpoint source, the fallback's checkpoint folder)."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return "recipe:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class RecipeCheckpoint(BaseModel):
    """A checkpoint computed from other checkpoints by a recipe (the convert stage merges, then converts)."""

    model_config = _STRICT

    recipe: Recipe = Field(description="How to compute the checkpoint from others.")
    prediction: Literal["epsilon", "v_prediction"] = Field(
        default="epsilon", description="What the merged UNet predicts (that of its inputs)."
    )
    config: str | None = Field(
        default=None,
        description="hf: or file: source of a diffusers-layout config folder used to convert the merged "
        "checkpoint offline. Absent: SDXL base's.",
        json_schema_extra={"pattern": SOURCE_PATTERN},
    )

    @field_validator("config")
    @classmethod
    def _config_is_folder_source(cls, value: str | None) -> str | None:
        return _config_folder(value)


# pydantic reports a tagged union's errors under the tag; loading.py drops these from the JSON paths.
SOURCE_CHECKPOINT_TAG = "source-checkpoint"
RECIPE_CHECKPOINT_TAG = "recipe-checkpoint"


def _checkpoint_tag(value: Any) -> str:
    if isinstance(value, RecipeCheckpoint) or (isinstance(value, dict) and "recipe" in value):
        return RECIPE_CHECKPOINT_TAG
    return SOURCE_CHECKPOINT_TAG


AnyCheckpoint = Annotated[
    Annotated[Checkpoint, Tag(SOURCE_CHECKPOINT_TAG)]
    | Annotated[RecipeCheckpoint, Tag(RECIPE_CHECKPOINT_TAG)],
    Discriminator(_checkpoint_tag),
]


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
                raise fail(
                    "BLOCK_WEIGHTS_PRESET_UNKNOWN",
                    f"unknown block weight preset {value!r}",
                    f"{hint}use one of {presets}, or a list of {layouts}",
                )
            return value
        if not isinstance(value, list):
            raise fail(
                "BLOCK_WEIGHTS_TYPE",
                f"block_weights must be a list of numbers or a preset name, got {show_value(value)}",
                f"use a list of {layouts}, or one of {presets}",
            )
        if len(value) not in block_weights.LAYOUTS:
            sd1 = ", the extension's SD 1.x layout" if len(value) in block_weights.SD1_COUNTS else ""
            raise fail(
                "BLOCK_WEIGHTS_COUNT",
                f"block_weights has {len(value)} values{sd1}; SDXL takes 12 or 20",
                f"use {layouts}",
            )
        for index, item in enumerate(value):
            number = isinstance(item, int | float) and not isinstance(item, bool)
            if not number or not -BLOCK_WEIGHT_LIMIT <= item <= BLOCK_WEIGHT_LIMIT:
                raise fail(
                    "BLOCK_WEIGHTS_VALUE",
                    f"block weight {index} ({block_weights.LAYOUTS[len(value)][index]}) must be a finite "
                    f"number from {-BLOCK_WEIGHT_LIMIT:g} to {BLOCK_WEIGHT_LIMIT:g}, got {show_value(item)}",
                    "use a number such as 0.5 (NaN, Infinity and true are not numbers)",
                    at=(index,),
                )
        return [float(item) for item in value]

    @property
    def resolved_block_weights(self) -> tuple[float, ...] | None:
        """The block weights as numbers (a preset's values for a preset name), or None when absent."""
        return None if self.block_weights is None else block_weights.resolve(self.block_weights)


# A textual-inversion token: what prompts write to use the embedding. No spaces or A1111 prompt syntax
# (parentheses, brackets, colons, backslashes), and no `_<digits>` ending: diffusers names the extra vectors
# of a multi-vector embedding `<token>_1`, `<token>_2`, ...
TOKEN_PATTERN = r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$"
_VECTOR_SUFFIX = re.compile(r"_[0-9]+$")


class EmbeddingSpec(Source):
    """A textual-inversion embedding for SDXL (a safetensors file with `clip_l` and `clip_g` tensors), loaded
    into both text encoders with the template, its token usable in prompts and negative prompts."""

    token: str = Field(
        description="The word prompts use for the embedding (e.g. negativeXL_D): a letter, then letters, "
        "digits, '_', '.', '-', 1-64 characters, not ending in _<digits>.",
        json_schema_extra={"pattern": TOKEN_PATTERN},
    )

    @field_validator("token")
    @classmethod
    def _token_usable(cls, value: str) -> str:
        if not re.match(TOKEN_PATTERN, value) or _VECTOR_SUFFIX.search(value):
            suggestion = re.sub(r"[^A-Za-z0-9_.-]+", "_", value).lstrip("0123456789_.-")[:64]
            suggestion = _VECTOR_SUFFIX.sub(lambda m: m.group(0).replace("_", "v"), suggestion)
            hint = "use a letter, then letters, digits, '_', '.' or '-' (no spaces or prompt syntax)"
            if suggestion and suggestion != value:
                hint += f", e.g. {suggestion!r}"
            raise fail(
                "TOKEN_INVALID",
                f"embedding token {value!r} cannot be written in a prompt as one word (spaces, A1111 prompt "
                "syntax such as ( ) [ ] : \\, a leading digit, or a _<digits> ending, which names the extra "
                "vectors of a multi-vector embedding)",
                hint,
            )
        return value


ADDON_SCALE_LIMIT = 4.0


def addon_pickle_error(source: str) -> PydanticCustomError:
    return fail(
        "ADDON_PICKLE",
        f"add-on source {source!r}: an add-on is loaded by the worker, which never loads pickle files",
        'use the .safetensors release of this LoRA (and no "allow_pickle")',
        at=("source",),
    )


class AddonSpec(Source):
    """A LoRA that is not fused but that a job may ask for by name, applied on top of the merged template
    at run time (diffusers adapters) and removed after the job."""

    default_scale: float = Field(
        default=1.0,
        ge=-ADDON_SCALE_LIMIT,
        le=ADDON_SCALE_LIMIT,
        allow_inf_nan=False,
        description="Strength used when a job names the add-on without a scale.",
    )
    min_scale: float = Field(
        default=0.0,
        ge=-ADDON_SCALE_LIMIT,
        le=ADDON_SCALE_LIMIT,
        allow_inf_nan=False,
        description="Lowest strength a job may ask for (negative values for slider LoRAs).",
    )
    max_scale: float = Field(
        default=1.0,
        ge=-ADDON_SCALE_LIMIT,
        le=ADDON_SCALE_LIMIT,
        allow_inf_nan=False,
        description="Highest strength a job may ask for; above it the job is refused (INVALID_INPUT).",
    )
    templates: list[Id] | None = Field(
        default=None,
        min_length=1,
        description="Ids of the templates it is offered with; absent: every template.",
        json_schema_extra={"items": {"pattern": ID_PATTERN, "maxLength": ID_MAX_LENGTH}},
    )

    @model_validator(mode="after")
    def _scales_ordered(self) -> AddonSpec:
        if not self.min_scale <= self.default_scale <= self.max_scale:
            raise fail(
                "ADDON_SCALES",
                f"min_scale {self.min_scale:g} <= default_scale {self.default_scale:g} <= max_scale "
                f"{self.max_scale:g} does not hold",
                "order them so that min_scale <= default_scale <= max_scale",
                at=("default_scale",),
            )
        return self

    @model_validator(mode="after")
    def _pickle_needs_consent(self) -> AddonSpec:
        # Replaces Source's check of the same name: no consent helps here, the worker loads add-ons itself
        # and never unpickles (a job must not be able to run code).
        if self.allow_pickle or parse_source(self.source).is_pickle:
            raise addon_pickle_error(self.source)
        return self


class RefinerOptions(BaseModel):
    """The ensemble-of-experts split: the base denoises the first `switch_at` of the schedule, the refiner
    the rest (diffusers' `denoising_end` / `denoising_start`)."""

    model_config = _STRICT

    switch_at: float = Field(
        default=0.8,
        gt=0,
        le=1,
        allow_inf_nan=False,
        description="Share of the denoising done by the base before the refiner takes over, above 0 and at "
        "most 1 (0.8: the refiner does the last 20%; 1: the refiner does nothing).",
    )


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
        default=None,
        description='Scheduler name (a Civitai/A1111 sampler name such as "DPM++ 2M SDE Karras" is '
        "accepted and stored as the name it stands for); absent: the one the export writes for the "
        "checkpoint.",
    )
    clip_skip: int | None = Field(
        default=None,
        ge=serving.CLIP_SKIP_MIN,
        le=serving.CLIP_SKIP_MAX,
        # Left out when absent, so that adding the field changed no template's spec hash or manifest.
        exclude_if=lambda value: value is None,
        description="Clip skip in the A1111/Civitai numbering, 1-12: both text encoders use the hidden state "
        "N layers from the end; 1 and 2 are SDXL's own penultimate layer (docs/templates.md). Absent: 2.",
    )
    # The fields below are left out of the spec and the manifest when absent, so that adding them changed
    # no template's spec hash and no manifest's bytes.
    timestep_spacing: Literal["leading", "linspace", "trailing"] | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="How the scheduler spaces its timesteps (diffusers' timestep_spacing): trailing for "
        "few-step models (SDXL Lightning, Hyper-SD); absent: the scheduler config's own.",
    )
    karras_sigmas: bool | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="Karras noise levels (diffusers' use_karras_sigmas), for schedulers that take them; "
        "absent: what the scheduler name says.",
    )
    refiner: RefinerOptions | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="Hand the last part of the denoising to the template's refiner (the template must name "
        "one); absent: no refiner unless a request asks for it.",
    )

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler_by_its_name(cls, value: Any) -> Any:
        return serving.canonical_scheduler(value) if isinstance(value, str) else value


class Template(BaseModel):
    """What a served model is: a checkpoint, the LoRAs fused into it, and generation defaults."""

    model_config = _STRICT

    checkpoint: str = Field(description="Id of an entry under checkpoints.")
    loras: list[LoraSpec] = Field(default_factory=list, description="LoRAs fused in this order.")
    embeddings: list[EmbeddingSpec] | None = Field(
        default=None,
        # Left out of the spec when absent, so that adding the field changed no template's spec hash.
        exclude_if=lambda value: value is None,
        description="Textual-inversion embeddings (SDXL: clip_l and clip_g tensors) loaded into both text "
        "encoders with the template; their tokens are usable in prompts and negative prompts.",
    )
    refiner: str | None = Field(
        default=None,
        # Left out of the spec when absent: templates written before the field keep their hash.
        exclude_if=lambda value: value is None,
        description="Id of an entry under checkpoints that is an SDXL refiner; the worker may hand it the "
        "last part of the denoising (defaults.refiner, or a request's refiner).",
    )
    defaults: Defaults = Field(
        default_factory=Defaults,
        description="Generation defaults for the worker.",
        # What the worker serves (core.serving), narrower than what a Defaults value may hold: editors
        # reading the schema see the same rule `fuseline validate` applies.
        json_schema_extra={
            "properties": {
                "width": {"multipleOf": serving.SIZE_MULTIPLE},
                "height": {"multipleOf": serving.SIZE_MULTIPLE},
                "scheduler": {
                    "anyOf": [
                        {"enum": [*serving.SCHEDULER_NAMES, *serving.SCHEDULER_ALIASES]},
                        {"type": "null"},
                    ]
                },
            }
        },
    )

    @field_validator("embeddings")
    @classmethod
    def _tokens_unique(cls, embeddings: list[EmbeddingSpec] | None) -> list[EmbeddingSpec] | None:
        # CLIP's tokenizer lowercases prompts: tokens differing only in case would be one word.
        seen: set[str] = set()
        for index, embedding in enumerate(embeddings or ()):
            if embedding.token.lower() in seen:
                raise fail(
                    "TOKEN_DUPLICATE",
                    f"token {embedding.token!r} names two embeddings of this template (tokens are matched "
                    "ignoring case)",
                    "give each embedding its own token",
                    at=(index, "token"),
                )
            seen.add(embedding.token.lower())
        return embeddings

    @field_validator("defaults")
    @classmethod
    def _defaults_the_worker_serves(cls, defaults: Defaults) -> Defaults:
        # Defaults is what a fuseline.json may carry; the worker serves a narrower set (core.serving). A
        # default outside it would build, verify and publish, then fail every job that relies on it.
        # (`fuseline validate` reports every such problem, from the raw file: loading.py.)
        for error in serving_errors(defaults.model_dump()):
            raise error
        return defaults

    @model_validator(mode="after")
    def _refiner_options_need_a_refiner(self) -> Template:
        if self.defaults.refiner is not None and self.refiner is None:
            raise refiner_missing()
        return self


def refiner_missing() -> PydanticCustomError:
    return fail(
        "REFINER_MISSING",
        "defaults.refiner hands denoising to a refiner, but the template names none",
        'add "refiner": "<id of an SDXL refiner under checkpoints>" to the template, or remove '
        "defaults.refiner",
        at=("defaults", "refiner"),
    )


def _valid_default(name: str, value: Any) -> bool:
    try:
        Defaults.model_validate({name: value})
    except ValidationError:
        return False
    return True


def serving_errors(defaults: dict[str, Any]) -> Iterator[PydanticCustomError]:
    """Each default the worker would refuse (a size it does not serve, a scheduler it does not know), as an
    error located at its field, from a defaults object's values (parsed or raw JSON)."""
    for name in ("width", "height"):
        value = defaults.get(name)
        if value is None or not _valid_default(name, value):
            continue  # absent, or refused by Defaults' own check (reported once, by it)
        rule = serving.size_problem(value)
        if rule is not None:
            nearest = max(serving.DEFAULT_MIN_SIZE, min(serving.MAX_SIZE, value))
            nearest = serving.SIZE_MULTIPLE * round(nearest / serving.SIZE_MULTIPLE)
            yield fail(
                "SIZE_NOT_SERVED",
                f"{name} {value} is not a size the worker serves ({rule})",
                f"use {nearest} or another multiple of {serving.SIZE_MULTIPLE}",
                at=(name,),
            )
    scheduler = defaults.get("scheduler")
    if isinstance(scheduler, str):
        scheduler = serving.canonical_scheduler(scheduler)
        if serving.scheduler_problem(scheduler) is not None:
            close = difflib.get_close_matches(scheduler, serving.SCHEDULER_NAMES, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            hint += f"use {serving.scheduler_problem(scheduler)}, or remove it for the export's own"
            message = f"scheduler {scheduler!r} is not one the worker knows"
            yield fail("SCHEDULER_UNKNOWN", message, hint, at=("scheduler",))
            return
    for option in serving.SCHEDULER_OPTIONS:
        value = defaults.get(option)
        if not _valid_default(option, value):
            continue  # refused by Defaults' own check
        problem = serving.option_problem(scheduler if isinstance(scheduler, str) else None, option, value)
        if problem is not None:
            hint = f"remove {option}, or pick a scheduler that takes it"
            yield fail("SCHEDULER_OPTION_UNSUPPORTED", problem, hint, at=(option,))


class Catalog(BaseModel):
    """templates.json, version 1: the checkpoints and the templates built from them."""

    model_config = ConfigDict(strict=True, extra="forbid", title="fuseline templates.json")

    version: Literal[1] = Field(description="Catalog format version; this fuseline reads 1.")
    vae: VaeSpec = Field(
        description="VAE for every export (for SDXL the fp16-fix VAE: exports are fp16 and SDXL's own "
        "VAE overflows in fp16). Required: the pipeline converts it once and every merge uses it."
    )
    checkpoints: dict[Id, AnyCheckpoint] = Field(
        description="Checkpoints by id (converted once, shared by templates): a source, or a recipe merging "
        "other checkpoints.",
        json_schema_extra={"propertyNames": {"pattern": ID_PATTERN, "maxLength": ID_MAX_LENGTH}},
    )
    templates: dict[Id, Template] = Field(
        min_length=1,
        description="Templates by id; each becomes one merged model.",
        json_schema_extra={"propertyNames": {"pattern": ID_PATTERN, "maxLength": ID_MAX_LENGTH}},
    )
    addons: dict[Id, AddonSpec] = Field(
        default_factory=dict,
        # Left out of a dump when empty: catalogs without add-ons dump as they did before the field.
        exclude_if=lambda value: not value,
        description="Add-on LoRAs by name: not fused, applied at run time when a job asks for them "
        '("loras": [{"name": ..., "scale": ...}]). Not part of any template\'s spec.',
        json_schema_extra={"propertyNames": {"pattern": ID_PATTERN, "maxLength": ID_MAX_LENGTH}},
    )

    _path: Path | None = PrivateAttr(default=None)
    _warnings: list[Problem] = PrivateAttr(default_factory=list)

    @field_validator("version", mode="before")
    @classmethod
    def _version_not_bool(cls, value: Any) -> Any:
        # JSON `true` would otherwise pass as 1 (bool is an int in Python).
        if isinstance(value, bool):
            raise fail(
                "VERSION_UNSUPPORTED",
                f"version must be the number 1, got {json.dumps(value)}",
                'set "version": 1',
            )
        return value

    @model_validator(mode="after")
    def _templates_name_existing_checkpoints(self) -> Catalog:
        for template_id, template in self.templates.items():
            if template.checkpoint not in self.checkpoints:
                raise unknown_checkpoint(template_id, template.checkpoint, list(self.checkpoints))
        for error in checkpoint_role_errors(
            {t: (template.checkpoint, template.refiner) for t, template in self.templates.items()},
            {c: isinstance(checkpoint, RecipeCheckpoint) for c, checkpoint in self.checkpoints.items()},
        ):
            raise error
        return self

    @model_validator(mode="after")
    def _addons_name_existing_templates(self) -> Catalog:
        for addon_id, addon in self.addons.items():
            for index, name in enumerate(addon.templates or ()):
                if name not in self.templates:
                    raise unknown_addon_template(addon_id, index, name, list(self.templates))
        return self

    def addon_templates(self, addon_id: str) -> list[str]:
        """The templates an add-on is offered with (its `templates`, else every template), sorted."""
        named = self.addons[addon_id].templates
        return sorted(self.templates if named is None else set(named))

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

    def checkpoint_spec_hash(self, checkpoint_id: str) -> str:
        """SHA-256 (hex) of a checkpoint entry's canonical JSON: what a refiner folder's manifest records
        (a refiner is published on its own, not inside a template's spec)."""
        spec = {"id": checkpoint_id, **self.checkpoints[checkpoint_id].model_dump(mode="json")}
        canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def refiners(self) -> dict[str, list[str]]:
        """{refiner checkpoint id: the templates naming it}, in catalog order."""
        found: dict[str, list[str]] = {}
        for template_id, template in self.templates.items():
            if template.refiner is not None:
                found.setdefault(template.refiner, []).append(template_id)
        return found

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
            if isinstance(checkpoint, RecipeCheckpoint):
                for role, model in checkpoint.recipe.inputs().items():
                    yield format_path(("checkpoints", checkpoint_id, "recipe", role)), model
            else:
                yield format_path(("checkpoints", checkpoint_id)), checkpoint
        for template_id, template in self.templates.items():
            for index, lora in enumerate(template.loras):
                yield format_path(("templates", template_id, "loras", index)), lora
            for index, embedding in enumerate(template.embeddings or ()):
                yield format_path(("templates", template_id, "embeddings", index)), embedding
        for addon_id, addon in self.addons.items():
            yield format_path(("addons", addon_id)), addon


def unknown_checkpoint(template_id: str, name: str, existing: list[str]) -> PydanticCustomError:
    close = difflib.get_close_matches(name, existing, n=1)
    if existing:
        hint = f"use one of: {', '.join(existing)}"
        if close:
            hint = f"did you mean {close[0]!r}? " + hint
        hint += f" (or add {name!r} under checkpoints)"
    else:
        hint = f"add {name!r} under checkpoints"
    return fail(
        "CHECKPOINT_UNKNOWN",
        f"template {template_id!r} names checkpoint {name!r}, which is not in checkpoints",
        hint,
        at=("templates", template_id, "checkpoint"),
    )


def unknown_addon_template(addon_id: str, index: int, name: str, existing: list[str]) -> PydanticCustomError:
    close = difflib.get_close_matches(name, existing, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    hint += f'use one of: {", ".join(existing)}, or remove "templates" to offer it with every template'
    return fail(
        "TEMPLATE_UNKNOWN",
        f"add-on {addon_id!r} names template {name!r}, which is not in templates",
        hint,
        at=("addons", addon_id, "templates", index),
    )


def checkpoint_role_errors(
    templates: dict[str, tuple[Any, Any]], checkpoints: dict[str, bool]
) -> Iterator[PydanticCustomError]:
    """Each template whose refiner is not a usable refiner entry: unknown, a recipe (recipes merge base
    checkpoints), or also some template's base checkpoint (a file is one or the other). `templates`:
    {id: (checkpoint, refiner)} as written (raw JSON values too); `checkpoints`: {id: is a recipe}."""
    bases = {checkpoint for checkpoint, _ in templates.values() if isinstance(checkpoint, str)}
    for template_id, (_, refiner) in templates.items():
        if not isinstance(refiner, str):
            continue
        at = ("templates", template_id, "refiner")
        if refiner not in checkpoints:
            close = difflib.get_close_matches(refiner, list(checkpoints), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            yield fail(
                "REFINER_UNKNOWN",
                f"template {template_id!r} names refiner {refiner!r}, which is not in checkpoints",
                hint + f"add the SDXL refiner under checkpoints as {refiner!r}",
                at=at,
            )
        elif checkpoints[refiner]:
            yield fail(
                "REFINER_INVALID",
                f"refiner {refiner!r} is a recipe; recipes merge base checkpoints, not refiners",
                "name a checkpoint whose source is an SDXL refiner file",
                at=at,
            )
        elif refiner in bases:
            users = sorted(t for t, (checkpoint, _) in templates.items() if checkpoint == refiner)
            yield fail(
                "REFINER_INVALID",
                f"checkpoint {refiner!r} is the base checkpoint of {', '.join(users)} and the refiner of "
                f"{template_id!r}; a file is either an SDXL base or an SDXL refiner",
                "give the refiner a checkpoint entry of its own",
                at=at,
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
