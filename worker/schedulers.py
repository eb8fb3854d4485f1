"""The scheduler names a request may use, mapped to diffusers classes and config overrides.

A table of data, kept apart from the code that builds schedulers, so docs and validation read it too.
Names follow the A1111/ComfyUI sampler names users know. Every scheduler is built from the model folder's
own scheduler config, so the prediction type (epsilon / v-prediction) and timestep settings carry over.
"""

from __future__ import annotations

from typing import Any

# "default": the scheduler saved in the model folder (what the export chose for the checkpoint).
DEFAULT_SCHEDULER = "default"

SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "heun": ("HeunDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
    ),
    "dpmpp_2m_sde_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "dpmpp_sde": ("DPMSolverSinglestepScheduler", {}),
}

SCHEDULER_NAMES: tuple[str, ...] = (DEFAULT_SCHEDULER, *SCHEDULERS)


def build_scheduler(name: str, base_config: dict[str, Any]):
    """A fresh scheduler `name` from the model folder's scheduler config (its class for "default")."""
    import diffusers

    if name == DEFAULT_SCHEDULER:
        class_name, overrides = base_config["_class_name"], {}
    else:
        class_name, overrides = SCHEDULERS[name]
    cls = getattr(diffusers, class_name)
    return cls.from_config(base_config, **overrides)
