"""Building the scheduler a job asks for, from the serving table's names (fuseline.core.serving: the same
table the catalog checks template defaults against). Every scheduler is built from the model folder's own
scheduler config, so the prediction type (epsilon / v-prediction) and timestep settings carry over.
"""

from __future__ import annotations

from typing import Any

from fuseline.core.serving import DEFAULT_SCHEDULER, SCHEDULERS


def build_scheduler(name: str, base_config: dict[str, Any]):
    """A fresh scheduler `name` from the model folder's scheduler config (its class for "default")."""
    import diffusers

    if name == DEFAULT_SCHEDULER:
        class_name, overrides = base_config["_class_name"], {}
    else:
        class_name, overrides = SCHEDULERS[name]
    cls = getattr(diffusers, class_name)
    return cls.from_config(base_config, **overrides)
