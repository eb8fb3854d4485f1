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

- `fp8`: the UNet's linear layers in fp8 (torchao's `Float8DynamicActivationFloat8WeightConfig`, per-row
  scales: weights stored in float8_e4m3, activations quantised per call, fp8 tensor-core matmuls). Needs an
  NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper) and the `torchao` package; anywhere else the
  worker refuses to start with CONFIG_INVALID naming the device. Not measured on a GPU yet (B6,
  docs/benchmarks.md); unlike the others it changes the arithmetic itself (8-bit values), so B6 compares
  its images with the plain path's under a stated tolerance instead of expecting them unchanged.

`FUSELINE_COMPILE_MODE=max-autotune` with `compile` is inductor's autotuned kernels plus CUDA graphs (B6
measures it as its own variant).

Every option but `fp8` leaves the images unchanged within the rounding of the fp16/fp32 arithmetic it
reorders: tests/worker/test_speed.py compares each against the plain path on the kit model.
"""

from __future__ import annotations

import logging
from typing import Any

from fuseline.core.errors import ConfigInvalid
from fuseline.core.logs import log_event
from worker.settings import SpeedOptions

log = logging.getLogger("fuseline.worker")

# fp8 tensor-core matmuls (float8_e4m3 x float8_e4m3): compute capability 8.9 (Ada) and 9.0 (Hopper) on.
FP8_MIN_CAPABILITY = (8, 9)


def fp8_problem(device: str) -> str | None:
    """Why `device` cannot run the fp8 option, or None when it can."""
    if not device.startswith("cuda"):
        return f"device {device!r} has no fp8 matmuls (fp8 needs an NVIDIA GPU of compute capability 8.9+)"
    import torch

    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return (
            f"{name} has compute capability {capability[0]}.{capability[1]}; fp8 matmuls need 8.9 or newer "
            "(L4/L40/RTX 4090, H100/H200)"
        )
    try:
        import torchao.quantization  # noqa: F401
    except ImportError as exc:
        return f"torchao is not importable ({exc}); it is in requirements/worker.in"
    return None


def check_speed_options(speed: SpeedOptions, device: str) -> None:
    """Refuse options the device cannot run, at the worker's start (CONFIG_INVALID, a deployment problem)."""
    if "fp8" in speed.options and (problem := fp8_problem(device)) is not None:
        raise ConfigInvalid(f"FUSELINE_SPEED includes fp8, but {problem}; remove fp8 from FUSELINE_SPEED")


def apply_speed_options(pipe: Any, speed: SpeedOptions) -> list[str]:
    """Apply `speed` to a loaded SDXL pipeline in place; returns what was applied (for the logs)."""
    import torch

    check_speed_options(speed, str(pipe.unet.device))
    applied: list[str] = []
    if "fuse_qkv" in speed.options:
        # Before the others: it replaces the attention weights they would touch.
        pipe.fuse_qkv_projections()
        applied.append("fuse_qkv")
    if "fp8" in speed.options:
        # After fuse_qkv (its fused projections are quantised too: concatenating fp8 weights is not
        # supported), before channels_last and compile, which then work on the fp8 layers.
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        quantize_(pipe.unet, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
        applied.append("fp8")
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
