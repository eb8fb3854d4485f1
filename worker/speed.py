"""Speed options of the worker, switched by FUSELINE_SPEED (issue #9, B6); off by default. Parsed at start
as worker.settings.SpeedOptions, applied here to each loaded pipeline.

    FUSELINE_SPEED=channels_last,fuse_qkv,compile
    FUSELINE_COMPILE_MODE=max-autotune-no-cudagraphs   # torch.compile mode (default: torch's default)
    FUSELINE_COMPILE_BACKEND=inductor                  # torch.compile backend (default: inductor)

- `channels_last`: UNet and VAE weights in channels-last memory format (cuDNN's preferred layout for the
  convolutions; measured 2.14 -> 2.06 s/image on an H100, docs/benchmarks.md B6).
- `fuse_qkv`: diffusers' `fuse_qkv_projections()`: one matmul for Q, K and V of each self-attention
  instead of three (same values, concatenated weights).
- `compile`: `torch.compile` of the UNet (2.06 -> 1.66 s/image on an H100 with channels_last). The first
  job after a load pays the compile time (tens of seconds on a GPU): with a default template the start
  runs one 1-step generation at its default width x height (Worker.warm_up, event `template.warmed`), so
  that cost lands before the first job at that size. Shapes are static per request size: each new size
  recompiles once (the default in torch recompiles on shape change, then marks it dynamic).

Every option leaves the images unchanged within the rounding of the fp16/fp32 arithmetic it reorders:
tests/worker/test_speed.py compares each against the plain path on the kit model.
"""

from __future__ import annotations

import logging
from typing import Any

from fuseline.core.logs import log_event
from worker.settings import SpeedOptions

log = logging.getLogger("fuseline.worker")


def apply_speed_options(pipe: Any, speed: SpeedOptions) -> list[str]:
    """Apply `speed` to a loaded SDXL pipeline in place; returns what was applied (for the logs)."""
    import torch

    applied: list[str] = []
    if "fuse_qkv" in speed.options:
        # Before channels_last and compile: it replaces the attention weights the others would touch.
        pipe.fuse_qkv_projections()
        applied.append("fuse_qkv")
    if "channels_last" in speed.options:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        applied.append("channels_last")
    if "compile" in speed.options:
        kwargs: dict[str, Any] = {"backend": speed.compile_backend}
        if speed.compile_mode:
            kwargs["mode"] = speed.compile_mode
        pipe.unet = torch.compile(pipe.unet, **kwargs)
        applied.append(f"compile({', '.join(str(v) for v in kwargs.values())})")
    if applied:
        log_event(log, "speed.applied", f"speed options applied: {', '.join(applied)}", options=applied)
    return applied
