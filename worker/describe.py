"""The `describe` action (`{"input": {"action": "describe"}}`): what this worker serves, so that a front end
can build its form: the templates with their defaults and add-ons, the add-ons' scale ranges, the scheduler
names, the limits a job must keep, and the job input's JSON Schema. Read from files on the volume and from
the settings only: no pipeline is loaded and nothing is generated, so it works on a worker with no template
loaded (docs/operations.md, "Discovery").
"""

from __future__ import annotations

from typing import Any

from fuseline import __version__
from fuseline.core.serving import DEFAULT_SCHEDULER, MAX_SIZE, SCHEDULER_NAMES, SDXL_CLIP_SKIP, SIZE_MULTIPLE
from worker.addons import volume_addons
from worker.errors import InvalidInput, WorkerError
from worker.fallback import resolve_template
from worker.folders import TemplateFolder, available_templates
from worker.inputs import GenerationInput, OutputOptions
from worker.settings import WorkerSettings

ACTIONS = ("describe",)


def is_action(raw_input: Any) -> bool:
    """Whether a job input asks for an action instead of images."""
    return isinstance(raw_input, dict) and "action" in raw_input


def check_action(raw_input: dict[str, Any]) -> str:
    """The action a job asks for; InvalidInput for an unknown one, or one with other fields."""
    action = raw_input["action"]
    if action not in ACTIONS:
        raise InvalidInput(f"1 problem(s): action: unknown action {action!r}; valid: {', '.join(ACTIONS)}")
    extra = sorted(set(raw_input) - {"action"})
    if extra:
        raise InvalidInput(
            f"1 problem(s): action {action!r} takes no other fields; remove {', '.join(extra)} "
            "(or leave out `action` to generate)"
        )
    return action


def field_bounds(model: type, name: str) -> dict[str, Any]:
    """The numeric and length bounds pydantic enforces on `model.<name>` (read from the model itself, so
    this answer follows any change to the input's rules)."""
    # pydantic keeps each constraint as a small object (annotated_types.Ge, .Le, .MaxLen, ...) with one
    # attribute named after it.
    names = {"ge": "min", "gt": "min", "le": "max", "lt": "max", "min_length": "min_length"}
    names["max_length"] = "max_length"
    bounds: dict[str, Any] = {}
    for rule in model.model_fields[name].metadata:
        for attribute, key in names.items():
            if getattr(rule, attribute, None) is not None:
                bounds[key] = getattr(rule, attribute)
    return bounds


def limits(settings: WorkerSettings) -> dict[str, Any]:
    size = {"min": settings.min_size, "max": MAX_SIZE, "multiple_of": SIZE_MULTIPLE}
    numeric = ("steps", "guidance_scale", "seed", "num_images", "clip_skip", "prompt", "negative_prompt")
    return {
        "width": size,
        "height": size,
        "max_pixels": settings.max_pixels,
        **{name: field_bounds(GenerationInput, name) for name in numeric},
        "loras": {"max_items": field_bounds(GenerationInput, "loras").get("max_length")},
        "output": {
            "format": list(OutputOptions.model_fields["format"].annotation.__args__),
            "quality": field_bounds(OutputOptions, "quality"),
            "return": ["base64", "s3"] if settings.output_bucket else ["base64"],
        },
    }


def _template(settings: WorkerSettings, folder: TemplateFolder, addons: list[str]) -> dict[str, Any]:
    manifest, defaults = folder.manifest, folder.defaults
    return {
        "available": True,
        # Served by the runtime-LoRA fallback (base checkpoint + LoRAs at run time), not its merged model.
        "degraded": folder.degraded_reason is not None,
        "model_hash": manifest.spec_hash,
        "checkpoint": manifest.checkpoint.source,
        "prediction_type": manifest.prediction_type,
        "loras": [{"source": lora.source, "scale": lora.scale} for lora in manifest.loras],
        "embeddings": [embedding.token for embedding in manifest.embeddings or ()],
        # The SDXL refiner a job may hand the end of a text-to-image denoising to (None: none).
        "refiner": manifest.refiner,
        # What a job that leaves a field out gets (the template's defaults, else the global ones).
        "defaults": {
            "steps": defaults.steps,
            "guidance_scale": defaults.guidance_scale,
            "width": defaults.width,
            "height": defaults.height,
            "negative_prompt": defaults.negative_prompt,
            "scheduler": defaults.scheduler or DEFAULT_SCHEDULER,
            "clip_skip": defaults.clip_skip or SDXL_CLIP_SKIP,
            "timestep_spacing": defaults.timestep_spacing,
            "karras_sigmas": defaults.karras_sigmas,
            "refiner": None if defaults.refiner is None else defaults.refiner.model_dump(),
        },
        "addons": addons,
    }


def describe(settings: WorkerSettings, loaded: list[str] | None = None) -> dict[str, Any]:
    """The answer to `{"action": "describe"}`. `loaded`: the templates whose pipelines are in memory."""
    addons, broken = volume_addons(settings)
    templates: dict[str, Any] = {}
    for template_id in available_templates(settings):
        try:
            folder = resolve_template(settings, template_id)
        except WorkerError as exc:
            templates[template_id] = {"available": False, "error": str(exc)}
            continue
        offered = sorted(name for name, addon in addons.items() if addon.offered_with(template_id))
        templates[template_id] = _template(settings, folder, offered)
        templates[template_id]["loaded"] = template_id in (loaded or ())
    return {
        "fuseline_version": __version__,
        "default_template": settings.default_template,
        "templates": templates,
        "addons": {
            name: {
                "default_scale": addon.manifest.default_scale,
                "min_scale": addon.manifest.min_scale,
                "max_scale": addon.manifest.max_scale,
                "templates": addon.manifest.templates,
                "source": addon.manifest.source,
                "sha256": addon.manifest.sha256,
            }
            for name, addon in addons.items()
        },
        # Add-on folders on the volume that cannot be used, and why (a damaged addon.json).
        "addons_unavailable": broken,
        "schedulers": list(SCHEDULER_NAMES),
        "limits": limits(settings),
        "input_schema": GenerationInput.model_json_schema(),
    }
