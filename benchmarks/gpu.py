"""B6: SDXL inference speed on one GPU, random full-size weights built on the device from the kept configs.

`python -m benchmarks.gpu [--quick] [--budget-s S] [--steps N] [--size PX] [--compile-mode MODE]
                        [--max-autotune-mode MODE] [--skip ...]`

Sections, each in its own try/except (one failing option never loses the others), in this order:
  env            torch/CUDA/device facts
  matmul         the card's measured dense matmul rate, 8192^3 in bf16 (the yardstick) and fp16
  build          SDXL from fuseline/configs/sdxl-base, constructed on the GPU, weights redrawn like
                 benchmarks.synth_sdxl (N(0, 1/fan_in), norms 1, biases 0), fp16, SDPA attention
  plain          1024x1024, 24 steps, CFG: seconds per image (denoise + VAE decode), steps/s, peak VRAM
  flops          FLOPs of one UNet step (CFG batch of 2) by torch.utils.flop_counter.FlopCounterMode;
                 achieved TFLOP/s of each variant as a fraction of the measured bf16 matmul rate
  channels_last  UNet and VAE in channels_last (FUSELINE_SPEED=channels_last: worker/speed.py's code)
  fuse_qkv       diffusers' fused QKV projections (FUSELINE_SPEED=fuse_qkv)
  worker         worker.generate.generate on the same pipeline (only where the worker package imports)
  batch          images per GPU-second at num_images 1, 2 and 4 (the plain pipeline, one prompt)
  compile        channels_last + torch.compile(unet) (mode --compile-mode;
                 FUSELINE_SPEED=channels_last,compile); compile time reported
  max_autotune   fuse_qkv + channels_last + torch.compile(unet, mode --max-autotune-mode, default
                 "max-autotune": inductor's autotuned kernels and CUDA graphs;
                 FUSELINE_SPEED=fuse_qkv,channels_last,compile FUSELINE_COMPILE_MODE=max-autotune)
  disk_load      save_pretrained(variant="fp16") to local disk, then time from_pretrained (warm page cache);
                 then the volume's read rate with the folder's pages dropped from the page cache
                 (posix_fadvise DONTNEED), and a fresh process's time from its start to its first image
                 from that folder (imports, load, one full generation) against the floor bytes / read rate
  fp8            fuse_qkv + fp8 + channels_last + compile (FUSELINE_SPEED=fuse_qkv,fp8,channels_last,compile;
                 torchao): images compared with the plain path under FP8_TOLERANCE. On a device without fp8
                 matmuls (the CPU of --quick) it records the worker's refusal (CONFIG_INVALID) instead.
                 Last: quantising replaces the UNet's layers in place.
Every variant's latents and images are checked for NaN/Inf and compared with the plain path's (same seed).

Prints progress lines, then one JSON summary; writes it to $OUT/gpu.json when OUT is set (rewritten after
every section, so a run cut short still leaves what it measured). Stops starting sections once --budget-s
would be exceeded. Imports only torch, diffusers, transformers and the worker's modules (worker.speed for the
speed options, the rest for the worker section).
`--quick` runs the same code on CPU at the test kit's tiny size (seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent.parent / "fuseline" / "configs" / "sdxl-base"
PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 35mm film"
NEGATIVE_PROMPT = "blurry, low quality"
GUIDANCE_SCALE = 4.5
TARGET_SECONDS_PER_IMAGE = 1.0
TARGET_FRACTION_OF_MATMUL = 0.5
# Same seed, different kernels: fp16 results differ by rounding, which 24 denoising steps amplify a little.
# Relative L2 tolerances for "unchanged"; the measured values are reported next to them.
TOLERANCE = {"unet_step_rel_l2": 1e-2, "latents_rel_l2": 5e-2, "image_mean_abs_255": 2.0}
# fp8 changes the arithmetic itself (3 mantissa bits per operand, per-row scales): a UNet step stays within a
# few percent, and the 24 steps drift further; the image is "the same picture" within ~4/255 on average.
FP8_TOLERANCE = {"unet_step_rel_l2": 0.1, "latents_rel_l2": 0.25, "image_mean_abs_255": 8.0}
BATCH_SIZES = (1, 2, 4)
SECTIONS = (
    "env",
    "matmul",
    "build",
    "plain",
    "flops",
    "channels_last",
    "fuse_qkv",
    "worker",
    "batch",
    "compile",
    "max_autotune",
    "disk_load",
    "fp8",
)
# Seconds a section needs at least (full size): a section is skipped when less budget is left.
NEEDS_S = {
    "env": 0,
    "matmul": 10,
    "build": 40,
    "plain": 20,
    "flops": 10,
    "channels_last": 20,
    "fuse_qkv": 20,
    "worker": 20,
    "batch": 30,
    "compile": 120,
    "max_autotune": 240,
    "disk_load": 90,
    "fp8": 120,
}


def log(message: str) -> None:
    print(f"[gpu-bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Run:
    """Budget, results and the JSON summary of one benchmark run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.perf_counter()
        self.summary: dict[str, Any] = {
            "benchmark": "b6_gpu",
            "quick": args.quick,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "settings": {
                "size": args.size,
                "steps": args.steps,
                "guidance_scale": GUIDANCE_SCALE,
                "repeats": args.repeats,
                "compile_mode": args.compile_mode,
                "compile_backend": args.compile_backend,
                "max_autotune_mode": args.max_autotune_mode,
                "budget_s": args.budget_s,
            },
            "targets": {
                "seconds_per_image": TARGET_SECONDS_PER_IMAGE,
                "fraction_of_bf16_matmul": TARGET_FRACTION_OF_MATMUL,
            },
            "tolerance": TOLERANCE,
            "fp8_tolerance": FP8_TOLERANCE,
            "sections": {},
        }
        out = os.environ.get("OUT")
        self.json_path = Path(out) / "gpu.json" if out else None

    def left_s(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.started)

    def save(self) -> None:
        self.summary["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        if self.json_path is not None:
            try:
                self.json_path.parent.mkdir(parents=True, exist_ok=True)
                self.json_path.write_text(
                    json.dumps(self.summary, indent=2, sort_keys=True, default=str) + "\n"
                )
            except OSError as exc:
                log(f"cannot write {self.json_path}: {exc}")

    def section(self, name: str, body, *args) -> Any:
        """Run one section: skipped when asked or out of budget, errors recorded, never raised."""
        record: dict[str, Any]
        need = 0 if self.args.quick else NEEDS_S[name]
        if name in self.args.skip:
            record = {"status": "skipped", "why": "--skip"}
        elif self.left_s() < need:
            record = {"status": "skipped", "why": f"budget: {self.left_s():.0f} s left, needs ~{need} s"}
        else:
            log(f"{name}: start ({self.left_s():.0f} s of budget left)")
            t0 = time.perf_counter()
            try:
                result = body(*args)
                record = {"status": "ok", **(result or {})}
            except Exception as exc:  # one failing option must not lose the rest
                record = {
                    "status": "error",
                    "error": f"{type(exc).__name__}: {exc}"[:2000],
                    "traceback": traceback.format_exc()[-4000:],
                }
                result = None
                _free_device_memory()
            record["section_s"] = round(time.perf_counter() - t0, 2)
            self.summary["sections"][name] = record
            log(f"{name}: {record['status']} in {record['section_s']} s")
            if record["status"] == "error":
                log(record["traceback"])
            self.save()
            return result
        self.summary["sections"][name] = record
        log(f"{name}: {record['status']} ({record['why']})")
        self.save()
        return None


def _free_device_memory() -> None:
    """After a failed section (often out of memory), return cached blocks so later sections can run."""
    try:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception as exc:  # cleanup must never mask the section's own error
        log(f"could not free device memory: {exc}")


# ---- helpers --------------------------------------------------------------------------------------------


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rel_l2(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- sections ---------------------------------------------------------------------------------------------


def env_section(state: dict) -> dict:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": state["device"],
        "dtype": str(state["dtype"]),
    }
    for package in ("diffusers", "transformers", "accelerate", "safetensors"):
        try:
            info[package] = __import__(package).__version__
        except Exception as exc:  # a missing optional package is a fact to report, not a failure
            info[package] = f"unavailable ({type(exc).__name__})"
    if state["device"].startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            gpu_memory_bytes=props.total_memory,
            multiprocessors=props.multi_processor_count,
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        info["cpu_threads"] = torch.get_num_threads()
    return info


def matmul_rate(n: int, dtype, device: str, iters: int) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        torch.mm(a, b)
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def matmul_section(state: dict) -> dict:
    import torch

    n, iters = (256, 3) if state["quick"] else (8192, 50)
    bf16 = matmul_rate(n, torch.bfloat16, state["device"], iters)
    fp16 = matmul_rate(n, torch.float16, state["device"], iters)
    state["bf16_tflops"] = bf16
    return {"n": n, "iters": iters, "bf16_tflops": round(bf16, 4), "fp16_tflops": round(fp16, 4)}


def _configs(quick: bool) -> dict[str, Any]:
    """Component configs: the kit's tiny ones (--quick) or SDXL base's kept in the repo."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer

    if quick:
        from testkit import models as kit
        from testkit.tokenizers import build_tokenizers

        tokenizer, tokenizer_2 = build_tokenizers()
        return {
            "unet": dict(kit.UNET_CONFIG),
            "vae": dict(kit.VAE_CONFIG),
            "text_encoder": kit._text_encoder_config(kit.TEXT_ENCODER_CONFIG),
            "text_encoder_2": kit._text_encoder_config(kit.TEXT_ENCODER_2_CONFIG),
            "scheduler": dict(kit.SCHEDULER_CONFIG),
            "tokenizer": tokenizer,
            "tokenizer_2": tokenizer_2,
        }
    return {
        "unet": UNet2DConditionModel.load_config(CONFIG_DIR / "unet"),
        "vae": AutoencoderKL.load_config(CONFIG_DIR / "vae"),
        "text_encoder": CLIPTextConfig.from_pretrained(CONFIG_DIR / "text_encoder"),
        "text_encoder_2": CLIPTextConfig.from_pretrained(CONFIG_DIR / "text_encoder_2"),
        "scheduler": EulerDiscreteScheduler.load_config(CONFIG_DIR / "scheduler"),
        # model_max_length is in the kept tokenizer_config.json (77).
        "tokenizer": CLIPTokenizer.from_pretrained(CONFIG_DIR / "tokenizer"),
        "tokenizer_2": CLIPTokenizer.from_pretrained(CONFIG_DIR / "tokenizer_2"),
    }


def randomize_(module, seed: int, device: str) -> None:
    """Redraw every parameter as benchmarks.synth_sdxl draws them: N(0, 1/fan_in) for matrices, kernels and
    embeddings, 1 for norm weights, 0 for biases (keeps every activation O(1), so fp16 stays finite)."""
    import torch

    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            if param.ndim >= 2:
                param.normal_(0.0, math.prod(param.shape[1:]) ** -0.5, generator=generator)
            elif name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()


def build_section(state: dict) -> dict:
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    device, dtype = state["device"], state["dtype"]
    configs = _configs(state["quick"])
    t0 = time.perf_counter()
    # Built in fp32 on the device (initialisers run there), redrawn, then cast: no host copy, no disk.
    with torch.device(device):
        models = {
            "unet": UNet2DConditionModel.from_config(configs["unet"]),
            "vae": AutoencoderKL.from_config(configs["vae"]),
            "text_encoder": CLIPTextModel(configs["text_encoder"]),
            "text_encoder_2": CLIPTextModelWithProjection(configs["text_encoder_2"]),
        }
    for index, model in enumerate(models.values()):
        randomize_(model, state["seed"] + index, device)
        model.to(dtype=dtype).eval().requires_grad_(False)
    # Run the VAE in fp16 as the worker does with the fp16-fix VAE (SDXL base's own config says upcast).
    models["vae"].register_to_config(force_upcast=False)
    pipe = StableDiffusionXLPipeline(
        **models,
        tokenizer=configs["tokenizer"],
        tokenizer_2=configs["tokenizer_2"],
        scheduler=EulerDiscreteScheduler.from_config(configs["scheduler"]),
    )
    pipe.set_progress_bar_config(disable=True)
    sync(device)
    state["pipe"] = pipe
    params = {name: count_params(model) for name, model in models.items()}
    return {
        "build_s": round(time.perf_counter() - t0, 2),
        "params": params,
        "params_total": sum(params.values()),
        "attention_processor": type(next(iter(pipe.unet.attn_processors.values()))).__name__,
    }


def generate_latents(state: dict, steps: int):
    import torch

    device = state["device"]
    generator = torch.Generator(device).manual_seed(state["seed"])
    return state["pipe"](
        prompt=PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        num_inference_steps=steps,
        guidance_scale=GUIDANCE_SCALE,
        height=state["size"],
        width=state["size"],
        generator=generator,
        output_type="latent",
    ).images


def decode(state: dict, latents):
    import torch

    vae = state["pipe"].vae
    with torch.no_grad():
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]


def unet_inputs(state: dict):
    """One CFG step's UNet inputs at the benchmark size (batch 2: negative and positive prompt)."""
    import torch

    pipe, device, dtype = state["pipe"], state["device"], state["dtype"]
    generator = torch.Generator(device).manual_seed(state["seed"] + 100)
    latent = state["size"] // pipe.vae_scale_factor
    unet_config = pipe.unet.config
    text_dim = pipe.text_encoder_2.config.projection_dim
    sample = torch.randn(2, unet_config.in_channels, latent, latent, generator=generator, device=device)
    hidden = torch.randn(2, 77, unet_config.cross_attention_dim, generator=generator, device=device)
    text_embeds = torch.randn(2, text_dim, generator=generator, device=device)
    size = float(state["size"])
    time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]] * 2, device=device)
    return {
        "sample": sample.to(dtype),
        # 0-d float32, as the pipeline passes Euler timesteps: the compiled UNet must not recompile for it.
        "timestep": torch.tensor(500.0, device=device),
        "encoder_hidden_states": hidden.to(dtype),
        "added_cond_kwargs": {"text_embeds": text_embeds.to(dtype), "time_ids": time_ids.to(dtype)},
    }


def unet_step(state: dict):
    import torch

    with torch.no_grad():
        return state["pipe"].unet(**unet_inputs(state), return_dict=False)[0]


def timed_variant(state: dict, name: str, tolerance: dict[str, float] = TOLERANCE) -> dict:
    """Warm-up call (compiles where compiled), then `repeats` timed generations; checks and compares."""
    import torch

    device, steps = state["device"], state["steps"]
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    generate_latents(state, state["warm_steps"])
    sync(device)
    warm_s = time.perf_counter() - t0
    denoise, decoding = [], []
    latents = image = None
    for _ in range(state["repeats"]):
        t0 = time.perf_counter()
        latents = generate_latents(state, steps)
        sync(device)
        t1 = time.perf_counter()
        image = decode(state, latents)
        sync(device)
        denoise.append(t1 - t0)
        decoding.append(time.perf_counter() - t1)
    step_out = unet_step(state)
    denoise_s, decode_s = statistics.median(denoise), statistics.median(decoding)
    result: dict[str, Any] = {
        "warm_s": round(warm_s, 2),
        "denoise_s": round(denoise_s, 3),
        "decode_s": round(decode_s, 3),
        "seconds_per_image": round(denoise_s + decode_s, 3),
        "steps_per_s": round(steps / denoise_s, 2),
        "denoise_runs_s": [round(x, 3) for x in denoise],
        "latents_finite": bool(torch.isfinite(latents).all()),
        "image_finite": bool(torch.isfinite(image).all()),
        "image_std": round(float(image.float().std()), 4),
    }
    if cuda:
        result["peak_vram_bytes"] = torch.cuda.max_memory_allocated()
        result["peak_vram_reserved_bytes"] = torch.cuda.max_memory_reserved()
    if state.get("flops_per_step"):
        achieved = state["flops_per_step"] * steps / denoise_s / 1e12
        result["achieved_tflops"] = round(achieved, 3)
        if state.get("bf16_tflops"):
            result["fraction_of_bf16_matmul"] = round(achieved / state["bf16_tflops"], 3)
    reference = state.get("reference")
    if reference is None:
        state["reference"] = {"latents": latents, "image": image, "step": step_out}
    else:
        diffs = {
            "unet_step_rel_l2": rel_l2(step_out, reference["step"]),
            "latents_rel_l2": rel_l2(latents, reference["latents"]),
            "latents_max_abs": float((latents.float() - reference["latents"].float()).abs().max()),
            "image_mean_abs_255": float((image.float() - reference["image"].float()).abs().mean() * 127.5),
        }
        result["vs_plain"] = {k: round(v, 6) for k, v in diffs.items()}
        result["tolerance"] = tolerance
        result["unchanged_within_tolerance"] = all(diffs[k] <= tol for k, tol in tolerance.items())
    state.setdefault("variants", {})[name] = result
    return result


def plain_section(state: dict) -> dict:
    return timed_variant(state, "plain")


def flops_section(state: dict) -> dict:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    # Kernels the flop counter knows (cuDNN attention may not be registered in every torch release).
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    inputs = unet_inputs(state)
    with sdpa_kernel(backends), FlopCounterMode(display=False) as counter, torch.no_grad():
        state["pipe"].unet(**inputs, return_dict=False)
    total = counter.get_total_flops()
    state["flops_per_step"] = total
    by_op = counter.get_flop_counts().get("Global", {})
    result: dict[str, Any] = {
        "unet_flops_per_step": total,
        "unet_tflop_per_step": round(total / 1e12, 3),
        "by_op_tflop": {
            str(op): round(n / 1e12, 4) for op, n in sorted(by_op.items(), key=lambda kv: -kv[1])
        },
    }
    # The plain variant ran before the FLOPs were known: fill in its achieved rate now.
    plain = state.get("variants", {}).get("plain")
    if plain:
        achieved = total * state["steps"] / plain["denoise_s"] / 1e12
        plain["achieved_tflops"] = round(achieved, 3)
        result["plain_achieved_tflops"] = round(achieved, 3)
        if state.get("bf16_tflops"):
            plain["fraction_of_bf16_matmul"] = round(achieved / state["bf16_tflops"], 3)
            result["plain_fraction_of_bf16_matmul"] = plain["fraction_of_bf16_matmul"]
    return result


def _set_channels_last(state: dict, enabled: bool) -> None:
    import torch

    fmt = torch.channels_last if enabled else torch.contiguous_format
    state["pipe"].unet.to(memory_format=fmt)
    state["pipe"].vae.to(memory_format=fmt)


def _apply_worker_options(state: dict, *options: str, compile_mode: str | None = None) -> list[str]:
    """Switch options on exactly as the worker does for FUSELINE_SPEED (worker/speed.py), so the figures
    are those of the worker's own code path. worker.speed imports only the standard library and torch."""
    from worker.settings import SpeedOptions
    from worker.speed import apply_speed_options

    if "compile" in options:
        # Each compiled variant starts from a clean dynamo state: no cache-size limit carried over from the
        # previous variant's graphs, and its compile time is its own.
        import torch

        torch._dynamo.reset()
    speed = SpeedOptions(
        options=options,
        compile_mode=compile_mode or state["compile_mode"],
        compile_backend=state["compile_backend"],
    )
    return apply_speed_options(state["pipe"], speed)


def _unfuse_qkv(state: dict) -> None:
    pipe = state["pipe"]
    pipe.unfuse_qkv_projections()
    # diffusers restores the processors but keeps the fused Linear modules, which would then be saved
    # (and compared) by the disk_load section: drop them so the pipeline is the plain one again.
    for component in (pipe.unet, pipe.vae):
        for module in component.modules():
            for name in ("to_qkv", "to_kv"):
                if name in module._modules:
                    del module._modules[name]


def channels_last_section(state: dict) -> dict:
    _apply_worker_options(state, "channels_last")
    try:
        return timed_variant(state, "channels_last")
    finally:
        _set_channels_last(state, False)


def fuse_qkv_section(state: dict) -> dict:
    _apply_worker_options(state, "fuse_qkv")
    try:
        return timed_variant(state, "fuse_qkv")
    finally:
        _unfuse_qkv(state)


def compile_section(state: dict) -> dict:
    pipe = state["pipe"]
    eager_unet = pipe.unet
    try:
        _apply_worker_options(state, "channels_last", "compile")
        result = timed_variant(state, "channels_last+compile")
        _compile_time_estimate(state, result)
        return result
    finally:
        pipe.unet = eager_unet
        _set_channels_last(state, False)


def _compile_time_estimate(state: dict, result: dict) -> None:
    """The warm-up call compiled; its excess over a plain call of the same steps is the compile time."""
    plain = state.get("variants", {}).get("plain")
    if plain:
        per_step = plain["denoise_s"] / state["steps"]
        result["compile_s_estimate"] = round(result["warm_s"] - per_step * state["warm_steps"], 1)


def max_autotune_section(state: dict) -> dict:
    pipe = state["pipe"]
    eager_unet = pipe.unet
    mode = state["max_autotune_mode"]
    try:
        applied = _apply_worker_options(state, "fuse_qkv", "channels_last", "compile", compile_mode=mode)
        result = timed_variant(state, "fuse_qkv+channels_last+compile_max_autotune")
        _compile_time_estimate(state, result)
        result["applied"] = applied
        return result
    finally:
        pipe.unet = eager_unet
        _set_channels_last(state, False)
        _unfuse_qkv(state)


def fp8_section(state: dict) -> dict:
    """fp8 linear layers where the device has fp8 matmuls; elsewhere the worker's refusal, as it answers."""
    from fuseline.core.errors import FuselineError
    from worker.settings import SpeedOptions
    from worker.speed import check_speed_options, fp8_problem

    problem = fp8_problem(state["device"])
    if problem is not None:
        try:
            check_speed_options(SpeedOptions(options=("fp8",)), state["device"])
        except FuselineError as exc:
            return {"available": False, "refused": {"code": exc.code, "message": str(exc)}}
        raise RuntimeError(f"fp8 should be refused on {state['device']} ({problem}) but was accepted")
    applied = _apply_worker_options(state, "fuse_qkv", "fp8", "channels_last", "compile")
    # No restore: torchao replaced the UNet's Linear layers in place (this section runs last).
    result = timed_variant(state, "fuse_qkv+fp8+channels_last+compile", tolerance=FP8_TOLERANCE)
    _compile_time_estimate(state, result)
    return {"available": True, "applied": applied, **result}


def batch_section(state: dict) -> dict:
    """Images per GPU-second with num_images 1, 2, 4 (num_images_per_prompt): denoise and decode of the
    whole batch, one prompt, the plain pipeline. Serverless bills per GPU-second: this is the cost."""
    import torch

    pipe, device = state["pipe"], state["device"]
    rows: dict[str, Any] = {}
    for n in BATCH_SIZES:
        runs = []
        for attempt in range(state["repeats"] + 1):  # the first at each size warms the allocator
            generator = torch.Generator(device).manual_seed(state["seed"])
            sync(device)
            t0 = time.perf_counter()
            images = pipe(
                prompt=PROMPT,
                negative_prompt=NEGATIVE_PROMPT,
                num_inference_steps=state["steps"] if attempt else state["warm_steps"],
                guidance_scale=GUIDANCE_SCALE,
                height=state["size"],
                width=state["size"],
                num_images_per_prompt=n,
                generator=generator,
                output_type="pt",
            ).images
            sync(device)
            if attempt:
                runs.append(time.perf_counter() - t0)
        seconds = statistics.median(runs)
        rows[str(n)] = {
            "seconds": round(seconds, 3),
            "images": int(images.shape[0]),
            "images_per_gpu_second": round(n / seconds, 4),
            "gpu_seconds_per_image": round(seconds / n, 4),
            "finite": bool(torch.isfinite(images).all()),
        }
    one = rows["1"]["images_per_gpu_second"]
    return {
        "by_num_images": rows,
        "speedup_vs_one": {n: round(r["images_per_gpu_second"] / one, 3) for n, r in rows.items()},
    }


def worker_section(state: dict) -> dict:
    """worker.generate.generate on the benchmark's pipeline, against the bare pipeline (plain variant).
    The worker draws noise on the CPU, so its latents are not compared, only its time."""
    try:
        from worker.generate import generate
        from worker.inputs import GenerationParameters
        from worker.pipelines import LoadedTemplate
    except Exception as exc:
        return {"available": False, "why": f"{type(exc).__name__}: {exc}"}
    pipe = state["pipe"]
    scheduler_config = {**pipe.scheduler.config, "_class_name": type(pipe.scheduler).__name__}
    # No model folder behind the benchmark's pipeline: the worker's code asks it only for the template's id.
    folder = SimpleNamespace(template_id="bench")
    loaded = LoadedTemplate(
        folder=folder, pipe=pipe, scheduler_config=scheduler_config, nbytes=0, load_ms=0.0
    )

    def params(steps: int):
        return GenerationParameters.model_construct(
            template="bench",
            prompt=PROMPT,
            negative_prompt=NEGATIVE_PROMPT,
            width=state["size"],
            height=state["size"],
            steps=steps,
            guidance_scale=GUIDANCE_SCALE,
            seed=state["seed"],
            num_images=1,
            scheduler="default",
            output=None,
        )

    generate(loaded, params(state["warm_steps"]))
    runs = []
    for _ in range(state["repeats"]):
        sync(state["device"])
        t0 = time.perf_counter()
        result = generate(loaded, params(state["steps"]))
        sync(state["device"])
        runs.append(time.perf_counter() - t0)
    seconds = statistics.median(runs)
    out: dict[str, Any] = {
        "available": True,
        "seconds_per_image": round(seconds, 3),
        "warnings": result.warnings,
    }
    plain = state.get("variants", {}).get("plain")
    if plain:
        out["vs_bare_pipeline"] = round(seconds / plain["seconds_per_image"], 3)
    return out


def disk_load_section(state: dict) -> dict:
    import torch
    from diffusers import StableDiffusionXLPipeline

    folder = Path(tempfile.mkdtemp(prefix="fuseline-gpu-bench-"))
    try:
        t0 = time.perf_counter()
        state["pipe"].save_pretrained(folder, variant="fp16", safe_serialization=True)
        os.sync()
        save_s = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        t0 = time.perf_counter()
        loaded = StableDiffusionXLPipeline.from_pretrained(
            folder, variant="fp16", dtype=state["dtype"], local_files_only=True
        ).to(state["device"])
        sync(state["device"])
        load_s = time.perf_counter() - t0
        same = all(
            torch.equal(a, b)
            for component in ("unet", "text_encoder_2")
            for a, b in zip(
                getattr(loaded, component).state_dict().values(),
                getattr(state["pipe"], component).state_dict().values(),
                strict=True,
            )
        )
        del loaded
        _free_device_memory()
        result: dict[str, Any] = {
            "folder_bytes": size,
            "save_s": round(save_s, 2),
            "load_to_device_s": round(load_s, 2),
            "page_cache": "warm (the folder was just written)",
            "weights_identical": same,
        }
        result["volume_read"] = volume_read_rate(folder)
        result["first_image"] = first_image_in_fresh_process(state, folder, result["volume_read"])
        return result
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _drop_from_page_cache(folder: Path) -> bool:
    """Ask the kernel to drop the folder's clean pages (posix_fadvise DONTNEED: no root needed), so reads
    come from the volume as on a worker's first start; False where the platform lacks it."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def volume_read_rate(folder: Path) -> dict:
    """Sequential read rate of the folder's files, pages dropped first: the floor of a load is bytes / it."""
    dropped = _drop_from_page_cache(folder)
    buffer = bytearray(16 << 20)
    total = 0
    t0 = time.perf_counter()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with path.open("rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    seconds = time.perf_counter() - t0
    return {
        "bytes": total,
        "seconds": round(seconds, 3),
        "mb_per_s": round(total / seconds / 1e6, 1) if seconds else None,
        "page_cache": "dropped (posix_fadvise DONTNEED)" if dropped else "not dropped (no posix_fadvise)",
    }


def first_image_in_fresh_process(state: dict, folder: Path, read: dict) -> dict:
    """A new Python process, as a worker starting on a volume that already holds the model: imports, fp16
    load from the folder (pages dropped again), to the device, one full generation and decode. Times are
    from the moment the process was spawned."""
    _drop_from_page_cache(folder)
    command = [
        sys.executable,
        "-m",
        "benchmarks.gpu",
        "--first-image",
        str(folder),
        "--size",
        str(state["size"]),
        "--steps",
        str(state["steps"]),
        "--seed",
        str(state["seed"]),
    ]
    if state["quick"]:
        command.append("--quick")
    spawned = time.time()
    done = subprocess.run(
        command,
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    wall = time.time() - spawned
    if done.returncode != 0:
        raise RuntimeError(f"first-image process failed ({done.returncode}): {done.stderr[-2000:]}")
    marks = json.loads(done.stdout.strip().splitlines()[-1])
    since = {k: round(v - spawned, 3) for k, v in marks.items() if k.endswith("_at")}
    floor = read["bytes"] / (read["mb_per_s"] * 1e6) if read.get("mb_per_s") else None
    result: dict[str, Any] = {
        "wall_s": round(wall, 3),
        "since_spawn_s": since,
        "load_s": round(marks["loaded_at"] - marks["imported_at"], 3),
        "image_s": round(marks["image_at"] - marks["loaded_at"], 3),
        "image_finite": marks["image_finite"],
    }
    if floor:
        result["read_floor_s"] = round(floor, 3)
        result["load_vs_read_floor"] = round(result["load_s"] / floor, 3)
        result["start_to_image_vs_read_floor_plus_plain_image"] = (
            round(since["image_at"] / (floor + state["variants"]["plain"]["seconds_per_image"]), 3)
            if "plain" in state.get("variants", {})
            else None
        )
    return result


def first_image_main(args: argparse.Namespace) -> None:
    """The child of first_image_in_fresh_process: prints one JSON line of absolute times (time.time())."""
    marks: dict[str, Any] = {}
    import torch
    from diffusers import StableDiffusionXLPipeline

    marks["imported_at"] = time.time()
    cuda = torch.cuda.is_available() and not args.quick
    device = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    pipe = StableDiffusionXLPipeline.from_pretrained(
        args.first_image, variant="fp16", dtype=dtype, local_files_only=True
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    sync(device)
    marks["loaded_at"] = time.time()
    images = pipe(
        prompt=PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        num_inference_steps=args.steps,
        guidance_scale=GUIDANCE_SCALE,
        height=args.size,
        width=args.size,
        generator=torch.Generator(device).manual_seed(args.seed),
        output_type="pt",
    ).images
    sync(device)
    marks["image_at"] = time.time()
    marks["image_finite"] = bool(torch.isfinite(images).all())
    print(json.dumps(marks), flush=True)


def summarize(state: dict, run: Run) -> None:
    variants = state.get("variants", {})
    ok = {name: v for name, v in variants.items() if v.get("latents_finite") and v.get("image_finite")}
    ratios: dict[str, Any] = {}
    if ok:
        best = min(ok, key=lambda name: ok[name]["seconds_per_image"])
        ratios["best_variant"] = best
        ratios["best_seconds_per_image"] = ok[best]["seconds_per_image"]
        ratios["seconds_per_image_vs_target"] = round(
            ok[best]["seconds_per_image"] / TARGET_SECONDS_PER_IMAGE, 3
        )
        ratios["seconds_target_met"] = ok[best]["seconds_per_image"] <= TARGET_SECONDS_PER_IMAGE
        fractions = {n: v["fraction_of_bf16_matmul"] for n, v in ok.items() if "fraction_of_bf16_matmul" in v}
        if fractions:
            top = max(fractions, key=fractions.get)
            ratios["best_fraction_of_bf16_matmul"] = fractions[top]
            ratios["best_fraction_variant"] = top
            ratios["fraction_vs_target"] = round(fractions[top] / TARGET_FRACTION_OF_MATMUL, 3)
            ratios["fraction_target_met"] = fractions[top] >= TARGET_FRACTION_OF_MATMUL
    ratios["all_images_finite"] = bool(variants) and all(
        v.get("latents_finite") and v.get("image_finite") for v in variants.values()
    )
    unchanged = {n: v["unchanged_within_tolerance"] for n, v in variants.items() if "vs_plain" in v}
    ratios["speed_options_unchanged"] = unchanged
    run.summary["variants"] = variants
    run.summary["ratios"] = ratios


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU, the kit's tiny sizes, seconds")
    parser.add_argument(
        "--budget-s", type=float, default=420.0, help="start no section past this (default 420)"
    )
    parser.add_argument("--size", type=int, help="image side in pixels (default 1024; --quick 64)")
    parser.add_argument("--steps", type=int, help="denoising steps (default 24; --quick 3)")
    parser.add_argument("--repeats", type=int, help="timed generations per variant (default 2; --quick 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compile-mode", default="default", help='torch.compile mode, e.g. "max-autotune-no-cudagraphs"'
    )
    parser.add_argument(
        "--compile-backend", help="torch.compile backend (default inductor; --quick aot_eager)"
    )
    parser.add_argument(
        "--max-autotune-mode",
        default="max-autotune",
        help='torch.compile mode of the max_autotune section (default "max-autotune": with CUDA graphs)',
    )
    parser.add_argument("--first-image", help=argparse.SUPPRESS)  # the child of the disk_load section
    parser.add_argument("--skip", default="", help=f"comma-separated sections to skip: {','.join(SECTIONS)}")
    args = parser.parse_args(argv)
    args.skip = {s for s in args.skip.split(",") if s}
    unknown = args.skip - set(SECTIONS)
    if unknown:
        parser.error(f"--skip: unknown sections {sorted(unknown)}")
    args.size = args.size or (64 if args.quick else 1024)
    args.steps = args.steps or (3 if args.quick else 24)
    args.repeats = args.repeats or (1 if args.quick else 2)
    # aot_eager traces through dynamo without generating C++/Triton code: seconds on a CPU.
    args.compile_backend = args.compile_backend or ("aot_eager" if args.quick else "inductor")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    if args.first_image:
        first_image_main(args)
        return {}
    run = Run(args)
    log(f"budget {args.budget_s:.0f} s; importing torch")
    import torch

    cuda = torch.cuda.is_available() and not args.quick
    if not cuda and not args.quick:
        log("no CUDA device: running at full size on the CPU will not finish; use --quick")
    state: dict[str, Any] = {
        "quick": args.quick,
        "device": "cuda" if cuda else "cpu",
        # fp16 is what the worker serves; the CPU (--quick) runs fp32, which every CPU kernel supports.
        "dtype": torch.float16 if cuda else torch.float32,
        "size": args.size,
        "steps": args.steps,
        "warm_steps": 2,
        "repeats": args.repeats,
        "seed": args.seed,
        "compile_mode": None if args.compile_mode == "default" else args.compile_mode,
        "compile_backend": args.compile_backend,
        "max_autotune_mode": args.max_autotune_mode,
    }
    run.section("env", env_section, state)
    run.section("matmul", matmul_section, state)
    run.section("build", build_section, state)
    if "pipe" in state:
        run.section("plain", plain_section, state)
        run.section("flops", flops_section, state)
        run.section("channels_last", channels_last_section, state)
        run.section("fuse_qkv", fuse_qkv_section, state)
        run.section("worker", worker_section, state)
        run.section("batch", batch_section, state)
        run.section("compile", compile_section, state)
        run.section("max_autotune", max_autotune_section, state)
        run.section("disk_load", disk_load_section, state)
        run.section("fp8", fp8_section, state)
    summarize(state, run)
    run.save()
    print(json.dumps(run.summary, indent=2, sort_keys=True, default=str), flush=True)
    return run.summary


if __name__ == "__main__":
    main(sys.argv[1:])
