"""Recipes for the runtime-LoRA fallback, and where its files lie on the volume: what sync writes (first
thing for each template, before any download can fail) and the worker's fallback reads.

    .fuseline/recipes/<template>.json        the recipe: the template's checkpoint, LoRAs, spec hash
    sources/checkpoints/<checkpoint dir>/    the base checkpoint as a diffusers SDXL folder (safetensors)
    sources/loras/<sha256>.safetensors       each LoRA file, named by its content hash
    sources/embeddings/<sha256>.safetensors  each textual-inversion embedding, named by its content hash

Files and JSON only (no torch): the volume layout is sync's business; loading is worker/fallback.py's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fuseline.core.catalog.model import ID_PATTERN, Defaults
from fuseline.core.files import atomic_write
from fuseline.core.release import ReleasedTemplate
from fuseline.core.safetensors_io import PICKLE_SUFFIXES
from worker.sync.errors import SyncError

RECIPE_FORMAT = 1
RECIPES_DIR = Path(".fuseline") / "recipes"
CHECKPOINTS_DIR = Path("sources") / "checkpoints"
LORAS_DIR = Path("sources") / "loras"
EMBEDDINGS_DIR = Path("sources") / "embeddings"
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
# Longest checkpoint folder name kept as is; longer sources get a hash suffix (filesystems stop at 255).
MAX_DIR_NAME = 120


class RecipeInvalid(SyncError):
    """A recipe on the volume that cannot be used (unreadable, malformed, another template's, stale)."""

    code = "RECIPE_INVALID"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RecipeLora(_Frozen):
    source: str
    sha256: str = Field(description="SHA-256 of the LoRA file; also its name under sources/loras/.")
    scale: float

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        # Joined into a path: only 64 lowercase hex digits can name a file there.
        if not SHA256_PATTERN.match(value):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, got {value!r}")
        return value


class RecipeEmbedding(_Frozen):
    token: str
    source: str
    sha256: str = Field(description="SHA-256 of the embedding file; also its name under sources/embeddings/.")

    _hex = field_validator("sha256")(lambda value: RecipeLora._hex(value))


class Recipe(_Frozen):
    """What the merged folder was built from, kept apart from it so the template survives its loss."""

    format: Literal[1] = RECIPE_FORMAT
    template: str
    spec_hash: str
    checkpoint: str = Field(description="Catalog source of the checkpoint (names its folder, see below).")
    loras: list[RecipeLora] = Field(default_factory=list, description="In fusing order.")
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    defaults: Defaults | None = Field(default=None, description="Absent: the worker's global defaults.")
    embeddings: list[RecipeEmbedding] | None = Field(
        default=None, description="Textual-inversion embeddings loaded into both text encoders."
    )

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_none=True), indent=2, sort_keys=True) + "\n"


def recipe_path(volume: Path, template_id: str) -> Path:
    return Path(volume) / RECIPES_DIR / f"{template_id}.json"


def recipe_from_release(template_id: str, released: ReleasedTemplate) -> Recipe:
    """The recipe of a release entry (it carries no defaults: the global ones apply)."""
    return Recipe(
        template=template_id,
        spec_hash=released.spec_hash,
        checkpoint=released.checkpoint,
        loras=[RecipeLora(source=x.source, sha256=x.sha256, scale=x.scale) for x in released.loras],
        prediction_type=released.prediction_type,
        embeddings=None
        if released.embeddings is None
        else [RecipeEmbedding(token=x.token, source=x.source, sha256=x.sha256) for x in released.embeddings],
    )


def write_recipe(volume: Path, recipe: Recipe) -> bool:
    """Write `.fuseline/recipes/<template>.json` atomically unless it already holds these bytes; returns
    whether it wrote. Many workers may write the same recipe at once: each rename installs a complete file."""
    if not re.match(ID_PATTERN, recipe.template):
        raise ValueError(f"recipe template {recipe.template!r} is not a catalog id")
    path = recipe_path(volume, recipe.template)
    text = recipe.to_json()
    with contextlib.suppress(OSError):
        if path.read_text(encoding="utf-8") == text:
            return False
    atomic_write(path, text)
    return True


def read_recipe(volume: Path, template_id: str, expected_spec_hash: str | None = None) -> Recipe | None:
    """The template's recipe, None when there is none; RecipeInvalid when it is unusable (including a spec
    hash other than `expected_spec_hash`, when one is expected)."""
    path = recipe_path(volume, template_id)
    try:
        recipe = Recipe.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RecipeInvalid(f"{path}: unreadable ({exc})") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'recipe'}: {e['msg']}" for e in exc.errors()
        )
        raise RecipeInvalid(
            f"{path}: invalid recipe ({problems}); delete it and run the sync again to rewrite it"
        ) from None
    if recipe.template != template_id:
        raise RecipeInvalid(f"{path}: names template {recipe.template!r}, not {template_id!r}; delete it")
    if expected_spec_hash is not None and recipe.spec_hash != expected_spec_hash:
        raise RecipeInvalid(
            f"{path}: spec_hash {recipe.spec_hash!r} differs from the expected {expected_spec_hash!r} "
            f"(FUSELINE_SPEC_HASHES); the recipe is stale: run the sync of a release that has it"
        )
    return recipe


def checkpoint_dir_name(source: str) -> str:
    """The folder name of a checkpoint under sources/checkpoints/: its catalog source with every run of
    characters outside [A-Za-z0-9._-] turned into one '-' (`civitai:133005` -> `civitai-133005`)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", source).strip(".-")
    if not name or len(name) > MAX_DIR_NAME:
        digest = hashlib.sha256(source.encode()).hexdigest()[:16]
        name = f"{name[: MAX_DIR_NAME - 17].rstrip('.-')}-{digest}".lstrip("-")
    return name


def checkpoint_dir(volume: Path, source: str) -> Path:
    return Path(volume) / CHECKPOINTS_DIR / checkpoint_dir_name(source)


def lora_path(volume: Path, sha256: str) -> Path:
    return Path(volume) / LORAS_DIR / f"{sha256}.safetensors"


def embedding_path(volume: Path, sha256: str) -> Path:
    return Path(volume) / EMBEDDINGS_DIR / f"{sha256}.safetensors"


def missing_sources(volume: Path, recipe: Recipe) -> list[str]:
    """What the recipe needs that the volume lacks, one line each (empty: the fallback can load)."""
    missing = []
    base = checkpoint_dir(volume, recipe.checkpoint)
    if not (base / "model_index.json").is_file():
        missing.append(f"{base}/ (a diffusers SDXL folder of checkpoint {recipe.checkpoint!r})")
    for lora in recipe.loras:
        path = lora_path(volume, lora.sha256)
        if not path.is_file():
            # Extensions of torch.save/pickle files: never loaded (unpickling can run code), only named.
            pickles = [p.name for p in (path.with_suffix(s) for s in PICKLE_SUFFIXES) if p.exists()]
            note = f"; {', '.join(pickles)} there is a pickle file, refused: convert it" if pickles else ""
            missing.append(f"{path} (LoRA {lora.source!r}){note}")
    for embedding in recipe.embeddings or ():
        path = embedding_path(volume, embedding.sha256)
        if not path.is_file():
            missing.append(f"{path} (embedding {embedding.token!r}, {embedding.source!r})")
    return missing


def ready_templates(volume: Path, expected_spec_hashes: dict[str, str] | None = None) -> list[str]:
    """Ids of the recipes on the volume that the fallback can serve now (a valid recipe, every file it
    names present). Cheap: small JSON files and stat calls, no hashing."""
    expected_spec_hashes = expected_spec_hashes or {}
    out = []
    for path in sorted((Path(volume) / RECIPES_DIR).glob("*.json")):
        if not re.match(ID_PATTERN, path.stem):
            continue  # a write's temp file or a stray file
        try:
            recipe = read_recipe(volume, path.stem, expected_spec_hashes.get(path.stem))
        except RecipeInvalid:
            continue  # named by the fallback's own error when the template is asked for
        if recipe is not None and not missing_sources(volume, recipe):
            out.append(path.stem)
    return out
