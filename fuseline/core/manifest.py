"""`fuseline.json`: what an exported model folder is (template, sources and their sha256, scales, spec hash).

The build writes it next to the weights; the worker reads it and refuses a folder whose manifest does not
match the template it was asked to serve. Only pydantic and the standard library here (the worker imports
it). The file is written with sorted keys and no timestamps, so the same inputs give the same bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fuseline.core.catalog.model import Defaults
from fuseline.core.errors import FuselineError

MANIFEST_NAME = "fuseline.json"
MANIFEST_FORMAT = 1


class ManifestError(FuselineError):
    """A model folder without a readable, valid manifest. Its callers name their own code (the worker's
    MODEL_INVALID, the verify stage's MANIFEST_INVALID, publishing's BAD_MANIFEST): str() is the message."""

    code = "MANIFEST_INVALID"

    def __str__(self) -> str:
        return self.message


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CheckpointRef(_Frozen):
    id: str
    source: str = Field(description="Catalog source, or `recipe:<sha256>` (Recipe.identity) for a recipe.")
    sha256: str | None = None
    kind: Literal["inpaint"] | None = Field(
        default=None,
        # Absent from the file for an ordinary checkpoint, so those manifests stay byte-identical.
        exclude_if=lambda value: value is None,
        description="`inpaint`: an inpainting checkpoint (9-channel UNet, detected by the convert stage); "
        "the worker serves it inpaint jobs only. Absent: an ordinary SDXL checkpoint.",
    )
    recipe: dict[str, Any] | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="The recipe (method, inputs, alpha) of a checkpoint merged from others.",
    )


class VaeRef(_Frozen):
    source: str = Field(description="Catalog source of the VAE, or `checkpoint` when the checkpoint's own.")
    sha256: str | None = None


class LoraRef(_Frozen):
    source: str
    sha256: str = Field(description="SHA-256 of the LoRA file that was fused (computed while reading it).")
    scale: float
    placed_keys: dict[str, int] = Field(
        description="Keys of the LoRA file placed on each component (unet, text_encoder, text_encoder_2); "
        "together they are every key of the file."
    )
    block_weights: list[float] | None = Field(
        default=None,
        # Absent from the file when unused, so manifests of LoRAs without block weights stay byte-identical.
        exclude_if=lambda value: value is None,
        description="The per-block strengths fused (12 or 20 values in the A1111 LoRA Block Weight order, "
        "a preset resolved to its values); absent: one strength for every module.",
    )


EMBEDDINGS_DIR = "embeddings"


class EmbeddingRef(_Frozen):
    token: str = Field(description="The word prompts use for the embedding.")
    source: str
    sha256: str = Field(description="SHA-256 of the embedding file (the copy in the folder is that file).")
    vectors: int = Field(ge=1, description="Vectors per text encoder (tokens the word stands for).")
    file: str = Field(
        description="The file in the model folder, embeddings/<token>.safetensors.",
        # Joined onto the folder by the worker: one file directly under embeddings/, nothing else.
        pattern=r"^embeddings/[A-Za-z0-9_.-]+\.safetensors$",
    )


class ModelManifest(_Frozen):
    format: Literal[1] = MANIFEST_FORMAT
    template: str
    checkpoint: CheckpointRef
    loras: list[LoraRef] = Field(description="In fusing order.")
    vae: VaeRef
    prediction_type: Literal["epsilon", "v_prediction"]
    dtype: Literal["float16"] = "float16"
    variant: Literal["fp16"] = "fp16"
    spec_hash: str = Field(
        description="Catalog.spec_hash(template): the resolved spec this folder was built from."
    )
    fuseline_version: str
    defaults: Defaults | None = Field(
        default=None,
        description="The template's generation defaults from the catalog; the worker serves them when a "
        "request leaves a setting out (absent: the worker's global defaults).",
    )
    embeddings: list[EmbeddingRef] | None = Field(
        default=None,
        # Absent when the template has none, so manifests written before the field stay byte-identical.
        exclude_if=lambda value: value is None,
        description="Textual-inversion embeddings copied into the folder; the worker loads them into both "
        "text encoders when it loads the pipeline.",
    )
    refiner: str | None = Field(
        default=None,
        # Absent from the file when unused, so manifests of templates without a refiner stay byte-identical.
        exclude_if=lambda value: value is None,
        description="Checkpoint id of the template's SDXL refiner: the worker loads `refiners/<id>/` beside "
        "the model (its own RefinerManifest says what it is).",
    )

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"

    def write(self, folder: str | os.PathLike[str]) -> Path:
        path = Path(folder) / MANIFEST_NAME
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def read(cls, folder: str | os.PathLike[str]) -> ModelManifest:
        path = Path(folder) / MANIFEST_NAME
        try:
            return cls.model_validate_json(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ManifestError(
                f"{path}: no manifest; the folder is not a fuseline export (re-run the merge)"
            ) from None
        except ValidationError as exc:
            raise ManifestError(f"{path}: invalid manifest ({exc.error_count()} problems):\n{exc}") from None


ADDON_MANIFEST_NAME = "addon.json"
ADDON_LORA_NAME = "lora.safetensors"
ADDON_MANIFEST_FORMAT = 1


class AddonManifest(_Frozen):
    """`addon.json`: what an add-on folder (`artifacts/addons/<name>/`, the add-on stage's output) holds: the
    LoRA file `lora.safetensors` and the rules a job's request for it must follow. Published and synced
    like a model folder; the worker reads it to offer, check and load the add-on."""

    format: Literal[1] = ADDON_MANIFEST_FORMAT
    name: str
    source: str
    sha256: str = Field(description="SHA-256 of lora.safetensors.")
    default_scale: float
    min_scale: float
    max_scale: float
    templates: list[str] | None = Field(
        description="Templates it is offered with; null: every template of the release."
    )
    placed_keys: dict[str, int] = Field(
        description="Keys of the LoRA file placed on each component of the base checkpoint(s) it was checked "
        "against; together they are every key of the file."
    )
    checked_on: list[str] = Field(
        description="Checkpoint ids it was placed on, key by key, at build time (those of its templates)."
    )
    fuseline_version: str

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"

    def write(self, folder: str | os.PathLike[str]) -> Path:
        path = Path(folder) / ADDON_MANIFEST_NAME
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def read(cls, folder: str | os.PathLike[str]) -> AddonManifest:
        path = Path(folder) / ADDON_MANIFEST_NAME
        try:
            return cls.model_validate_json(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ManifestError(f"{path}: no add-on manifest; re-run the add-on stage and sync") from None
        except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            raise ManifestError(f"{path}: invalid add-on manifest: {' '.join(str(exc).split())}") from None


class RefinerManifest(_Frozen):
    """`fuseline.json` of a refiner folder: an SDXL refiner exported fp16, served beside the templates
    naming it (ModelManifest.refiner). Its keys differ from a ModelManifest's, so neither reads as the
    other: a refiner folder is never taken for a template's model."""

    format: Literal[1] = MANIFEST_FORMAT
    kind: Literal["refiner"] = "refiner"
    refiner: str = Field(description="The refiner's checkpoint id in the catalog.")
    checkpoint: CheckpointRef
    prediction_type: Literal["epsilon", "v_prediction"]
    dtype: Literal["float16"] = "float16"
    variant: Literal["fp16"] = "fp16"
    spec_hash: str = Field(description="Catalog.checkpoint_spec_hash(refiner): the entry it was built from.")
    fuseline_version: str

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"

    def write(self, folder: str | os.PathLike[str]) -> Path:
        path = Path(folder) / MANIFEST_NAME
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def read(cls, folder: str | os.PathLike[str]) -> RefinerManifest:
        path = Path(folder) / MANIFEST_NAME
        try:
            return cls.model_validate_json(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ManifestError(
                f"{path}: no manifest; the folder is not a fuseline refiner export (re-run convert)"
            ) from None
        except ValidationError as exc:
            raise ManifestError(
                f"{path}: not a refiner manifest ({exc.error_count()} problems; a template's model folder "
                f"is not a refiner):\n{exc}"
            ) from None
