"""Model folders on the volume as the worker serves them: a folder `<volume>/models/<template>/` counts only
if its `fuseline.json` names that template (and the expected spec hash, when one is configured): a folder
built for something else is a wrong model, not a fallback. Files only: nothing here loads a pipeline."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from fuseline.core.catalog.model import Defaults
from fuseline.core.manifest import MANIFEST_NAME, ManifestError, ModelManifest
from worker.errors import ModelInvalid, UnknownTemplate
from worker.settings import WorkerSettings
from worker.sync.recipes import ready_templates

# Pipeline components whose weights count toward the cache budget.
WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class TemplateFolder:
    """A checked model folder: its manifest and the generation defaults it carries."""

    template_id: str
    path: Path
    manifest: ModelManifest
    defaults: Defaults
    # Set when this is not the merged folder but the runtime-LoRA fallback's base checkpoint
    # (worker.fallback): why the merged model was unavailable.
    degraded_reason: str | None = None


def available_templates(settings: WorkerSettings) -> list[str]:
    """Template ids the worker can serve: a folder holding a fuseline.json under the volume's models/
    directory, or a recipe whose files are all on the volume (the runtime-LoRA fallback serves those)."""
    merged = set()
    if settings.models_dir.is_dir():
        # Names starting with "." are sync's version folders (`.<id>.<hash>`) behind the `<id>` links.
        merged = {
            p.name
            for p in settings.models_dir.iterdir()
            if not p.name.startswith(".") and (p / MANIFEST_NAME).is_file()
        }
    return sorted(merged | set(ready_templates(settings.volume, dict(settings.expected_spec_hashes))))


def read_manifest(path: Path) -> tuple[ModelManifest, Defaults]:
    """The folder's manifest and the template's defaults it carries (absent: the global defaults)."""
    manifest_path = path / MANIFEST_NAME
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{manifest_path}: no manifest; the folder is not a fuseline export") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{manifest_path}: unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{manifest_path}: expected a JSON object")
    try:
        manifest = ModelManifest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'manifest'}: {error['msg']}"
            for error in exc.errors()
        )
        raise ManifestError(f"{manifest_path}: invalid ({exc.error_count()} problems): {problems}") from None
    return manifest, manifest.defaults or Defaults()


def check_template_folder(
    settings: WorkerSettings, template_id: str, path: Path | None = None
) -> TemplateFolder:
    """The folder for `template_id` (default `models/<id>`; `path`: a leased version folder of it), refused
    unless its manifest names that template (and spec hash)."""
    path = path or settings.models_dir / template_id
    if not path.is_dir():
        available = available_templates(settings)
        raise UnknownTemplate(
            f"no template {template_id!r} in {settings.models_dir}; available: "
            + (", ".join(available) if available else "none (the volume holds no model folders)")
        )
    try:
        manifest, defaults = read_manifest(path)
    except ManifestError as exc:
        raise ModelInvalid(f"template {template_id!r}: {exc}; rebuild and re-sync this template") from None
    if manifest.template != template_id:
        raise ModelInvalid(
            f"{path / MANIFEST_NAME}: names template {manifest.template!r}, not {template_id!r}; the folder "
            f"holds another template's model: re-sync {template_id!r}"
        )
    expected = settings.expected_spec_hashes.get(template_id)
    if expected is not None and manifest.spec_hash != expected:
        raise ModelInvalid(
            f"{path / MANIFEST_NAME}: spec_hash {manifest.spec_hash!r} differs from the expected "
            f"{expected!r} (FUSELINE_SPEC_HASHES); the folder is stale: re-sync {template_id!r}"
        )
    return TemplateFolder(template_id, path, manifest, defaults)


def folder_weight_bytes(path: Path, bytes_per_value: int = 2) -> int:
    """Bytes the folder's fp16 weights take once loaded with `bytes_per_value` bytes per value."""
    return sum(f.stat().st_size for f in path.rglob("*.fp16.safetensors")) * bytes_per_value // 2
