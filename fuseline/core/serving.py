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
