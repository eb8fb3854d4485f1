"""What the worker serves: its scheduler names, its image size rules and its modes per kind of checkpoint,
one table for the catalog, the build and the worker alike (the catalog refuses a template default the
worker would refuse; the worker applies the same rules to requests and to the defaults a fuseline.json
carries).

Data only: the diffusers classes are named here as strings and built by worker/schedulers.py.
"""

from __future__ import annotations

from typing import Any

# "default": the scheduler saved in the model folder (what the export chose for the checkpoint).
DEFAULT_SCHEDULER = "default"

# Names follow the A1111/ComfyUI sampler names users know: name -> (diffusers class, config overrides).
# The class/override pairs are the ones diffusers' scheduler docs give for each A1111 sampler.
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
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_2m_sde_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "dpmpp_3m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    "dpmpp_3m_sde_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "use_karras_sigmas": True},
    ),
    "dpmpp_sde": ("DPMSolverSinglestepScheduler", {}),
    "dpmpp_sde_karras": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
    # Few-step samplers for distilled models and their LoRAs (LCM, Hyper-SD, TCD).
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}

# The sampler names Civitai pages and A1111 show ("DPM++ 2M SDE Karras"), matched without regard to case:
# a setting copied from a model page is accepted as the name it stands for.
SCHEDULER_ALIASES: dict[str, str] = {
    "Euler": "euler",
    "Euler a": "euler_a",
    "Euler Karras": "euler_karras",
    "Heun": "heun",
    "DDIM": "ddim",
    "UniPC": "unipc",
    "DPM++ 2M": "dpmpp_2m",
    "DPM++ 2M Karras": "dpmpp_2m_karras",
    "DPM++ 2M SDE": "dpmpp_2m_sde",
    "DPM++ 2M SDE Karras": "dpmpp_2m_sde_karras",
    "DPM++ 3M SDE": "dpmpp_3m_sde",
    "DPM++ 3M SDE Karras": "dpmpp_3m_sde_karras",
    "DPM++ SDE": "dpmpp_sde",
    "DPM++ SDE Karras": "dpmpp_sde_karras",
    "LCM": "lcm",
    "TCD": "tcd",
}
_ALIASES_FOLDED = {alias.casefold(): name for alias, name in SCHEDULER_ALIASES.items()}

# Scheduler options a template's defaults may set (`timestep_spacing`, `karras_sigmas`), and the diffusers
# classes whose timesteps follow each (their config key): Lightning/Hyper LoRAs want "trailing" spacing,
# many Civitai pages Karras sigmas. LCM and TCD take `timestep_spacing` in their config but place their few
# steps on their own schedule and never read it, so they are not listed. tests/worker/test_schedulers.py
# checks this table against the classes' `set_timesteps` code.
TIMESTEP_SPACINGS: tuple[str, ...] = ("leading", "linspace", "trailing")
SCHEDULER_OPTIONS: dict[str, str] = {
    "timestep_spacing": "timestep_spacing",
    "karras_sigmas": "use_karras_sigmas",
}
OPTION_CLASSES: dict[str, frozenset[str]] = {
    "timestep_spacing": frozenset(
        {
            "EulerDiscreteScheduler",
            "EulerAncestralDiscreteScheduler",
            "HeunDiscreteScheduler",
            "DDIMScheduler",
            "UniPCMultistepScheduler",
            "DPMSolverMultistepScheduler",
        }
    ),
    "karras_sigmas": frozenset(
        {
            "EulerDiscreteScheduler",
            "HeunDiscreteScheduler",
            "UniPCMultistepScheduler",
            "DPMSolverMultistepScheduler",
            "DPMSolverSinglestepScheduler",
        }
    ),
}

SCHEDULER_NAMES: tuple[str, ...] = (DEFAULT_SCHEDULER, *SCHEDULERS)

# SDXL's trained resolutions (1024x1024, 1152x896, 1344x768, ...) are all multiples of 64, and 64 keeps the
# latent grid divisible through every UNet downsampling level.
SIZE_MULTIPLE = 64
# SDXL's trained range; a worker's FUSELINE_MIN_SIZE may lower the floor (tests use tiny models at 64 px).
DEFAULT_MIN_SIZE = 256
MAX_SIZE = 2048
# 1536x1536 = 2048x1152: the largest images SDXL is commonly run at without tiling artefacts. A worker's
# FUSELINE_MAX_PIXELS may change it.
DEFAULT_MAX_PIXELS = 1536 * 1536


# Clip skip in the A1111/Civitai numbering, for SDXL as Forge applies it to both text encoders: N takes the
# hidden state N layers from the end (hidden_states[-N]), with 1 and 2 both SDXL's own penultimate layer (it
# was trained on it). At most CLIP-L's 12 layers. docs/templates.md ("Clip skip") compares the UIs.
CLIP_SKIP_MIN = 1
CLIP_SKIP_MAX = 12
SDXL_CLIP_SKIP = 2


def hidden_state_index(clip_skip: int | None) -> int:
    """The index into a CLIP encoder's `hidden_states` that `clip_skip` selects (None: SDXL's -2)."""
    return -max(SDXL_CLIP_SKIP, clip_skip or SDXL_CLIP_SKIP)


def size_problem(value: int, min_size: int = DEFAULT_MIN_SIZE) -> str | None:
    """Why a width or height is not one the worker serves, or None when it is."""
    if value % SIZE_MULTIPLE or not min_size <= value <= MAX_SIZE:
        return f"a multiple of {SIZE_MULTIPLE} between {min_size} and {MAX_SIZE}"
    return None


def canonical_scheduler(name: str) -> str:
    """The table's name for `name`: itself when it is one, the name a Civitai/A1111 sampler name stands for
    (any case), else `name` unchanged (for scheduler_problem to refuse)."""
    if name in SCHEDULER_NAMES:
        return name
    return _ALIASES_FOLDED.get(name.strip().casefold(), name)


def nearest_sizes(value: int, min_size: int = DEFAULT_MIN_SIZE) -> tuple[int, ...]:
    """The served sizes nearest to `value`, for a hint: the multiples of SIZE_MULTIPLE on either side of it,
    kept between `min_size` and MAX_SIZE (one value when both sides land on the same one)."""
    lower = value // SIZE_MULTIPLE * SIZE_MULTIPLE
    upper = -(-value // SIZE_MULTIPLE) * SIZE_MULTIPLE
    return tuple(sorted({max(min_size, min(MAX_SIZE, size)) for size in (lower, upper)}))


def scheduler_problem(name: str) -> str | None:
    """Why a scheduler name is not one the worker knows, or None when it is."""
    if name not in SCHEDULER_NAMES:
        return f"one of {', '.join(SCHEDULER_NAMES)}"
    return None


# What a job does, named by what it sends: a prompt alone, an image to restyle, an image and a mask.
MODES: tuple[str, ...] = ("txt2img", "img2img", "inpaint")
# UNet input channels: an ordinary SDXL checkpoint's (4 latent channels) and an inpainting checkpoint's
# (SDXL inpainting 0.1's layout: 4 latent + 1 mask + 4 masked-image latent channels).
UNET_IN_CHANNELS = 4
INPAINT_UNET_IN_CHANNELS = 9
# The kind of checkpoint a fuseline.json records (`checkpoint.kind`; absent: an ordinary SDXL checkpoint)
# -> the modes the worker serves with it. diffusers' SDXL text-to-image and img2img pipelines cannot drive a
# 9-channel UNet; its inpainting pipeline drives both kinds.
CHECKPOINT_KIND_BY_IN_CHANNELS: dict[int, str | None] = {
    UNET_IN_CHANNELS: None,
    INPAINT_UNET_IN_CHANNELS: "inpaint",
}
MODES_BY_CHECKPOINT_KIND: dict[str | None, tuple[str, ...]] = {None: MODES, "inpaint": ("inpaint",)}


def option_problem(scheduler: str | None, option: str, value: Any) -> str | None:
    """Why a scheduler option (`timestep_spacing`, `karras_sigmas`) cannot go with the named scheduler, or
    None when it can. The model folder's own scheduler ("default", absent) is not known here: the worker
    applies an option to it when its class takes it."""
    if value is None or scheduler is None or scheduler == DEFAULT_SCHEDULER or scheduler not in SCHEDULERS:
        return None
    class_name, overrides = SCHEDULERS[scheduler]
    if class_name not in OPTION_CLASSES[option]:
        takers = sorted(n for n, (c, _) in SCHEDULERS.items() if c in OPTION_CLASSES[option])
        return (
            f"scheduler {scheduler!r} ({class_name}) has no {option}; schedulers that do: {', '.join(takers)}"
        )
    key = SCHEDULER_OPTIONS[option]
    if key in overrides and overrides[key] != value:
        return f"scheduler {scheduler!r} sets {key} to {overrides[key]!r} itself"
    return None
