"""The pipeline a job's mode runs: the loaded template's own for txt2img, and img2img and inpainting
pipelines built from that pipeline's components (the same module objects: no reload, no second copy of
any weight), kept on the template's cache entry so they are built once and evicted with it.

Built with the pipeline classes' constructors from `pipe.components`, as diffusers documents for reusing
components, rather than `from_pipe`: from_pipe ends with `.to(dtype)` (float32 unless told otherwise),
which on a GPU would cast the shared fp16 modules in place, and it refuses a compiled UNet
(FUSELINE_SPEED=compile) whose type is not UNet2DConditionModel.
"""

from __future__ import annotations

from typing import Any

from fuseline.core.serving import CHECKPOINT_KIND_BY_IN_CHANNELS
from worker.modes import Mode, check_mode_served
from worker.pipelines import LoadedTemplate


def _pipeline_classes() -> dict[str, Any]:
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

    return {"img2img": StableDiffusionXLImg2ImgPipeline, "inpaint": StableDiffusionXLInpaintPipeline}


def checkpoint_kind(pipe: Any) -> str | None:
    """The kind of checkpoint a loaded pipeline's UNet is ("inpaint": 9 input channels; None: 4)."""
    channels = pipe.unet.config.in_channels
    return CHECKPOINT_KIND_BY_IN_CHANNELS.get(channels, f"unknown ({channels} channels)")


def mode_pipeline(loaded: LoadedTemplate, mode: Mode) -> Any:
    """The pipeline that runs `mode` for this template; ModeUnsupported when its checkpoint cannot (an
    inpainting checkpoint's 9-channel UNet serves inpainting only). Judged from the loaded UNet, so the
    runtime-LoRA fallback's base checkpoint is held to the same rule as a merged folder."""
    check_mode_served(loaded.template_id, checkpoint_kind(loaded.pipe), mode)
    if mode == "txt2img":
        return loaded.pipe
    pipeline_class = _pipeline_classes()[mode]
    if isinstance(loaded.pipe, pipeline_class):
        return loaded.pipe
    pipe = loaded.mode_pipes.get(mode)
    if pipe is None:
        base = loaded.pipe
        pipe = pipeline_class(
            **base.components,
            force_zeros_for_empty_prompt=base.config.get("force_zeros_for_empty_prompt", True),
        )
        pipe.set_progress_bar_config(disable=True)
        loaded.mode_pipes[mode] = pipe
    return pipe
