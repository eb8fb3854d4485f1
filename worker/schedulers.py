"""Building the scheduler a job asks for, from the serving table's names (fuseline.core.serving: the same
table the catalog checks template defaults against). Every scheduler is built from the model folder's own
scheduler config, so the prediction type (epsilon / v-prediction) and timestep settings carry over; a
template's scheduler options (timestep spacing, Karras sigmas) are applied on top where the class takes them.
"""

from __future__ import annotations

from typing import Any

from fuseline.core.serving import DEFAULT_SCHEDULER, OPTION_CLASSES, SCHEDULER_OPTIONS, SCHEDULERS


def scheduler_overrides(
    name: str, base_config: dict[str, Any], options: dict[str, Any] | None = None
) -> tuple[str, dict[str, Any]]:
    """(diffusers class name, config overrides) for scheduler `name` with the template's `options`
    ({"timestep_spacing": ..., "karras_sigmas": ...}; None values are unset). An option goes only to a
    class whose timesteps follow it (core.serving.OPTION_CLASSES): the catalog refuses one a named
    scheduler lacks, and the model folder's own scheduler ("default") or a request's other scheduler simply
    does not take it."""
    if name == DEFAULT_SCHEDULER:
        class_name, overrides = base_config["_class_name"], {}
    else:
        class_name, overrides = SCHEDULERS[name]
    overrides = dict(overrides)
    for option, value in (options or {}).items():
        if value is not None and class_name in OPTION_CLASSES[option]:
            overrides[SCHEDULER_OPTIONS[option]] = value
    return class_name, overrides


def build_scheduler(name: str, base_config: dict[str, Any], options: dict[str, Any] | None = None):
    """A fresh scheduler `name` from the model folder's scheduler config (its class for "default"), with
    the template's scheduler `options` where the class takes them."""
    import diffusers

    class_name, overrides = scheduler_overrides(name, base_config, options)
    return getattr(diffusers, class_name).from_config(base_config, **overrides)
