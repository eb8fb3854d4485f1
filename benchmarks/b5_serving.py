"""B5: the worker's serving overhead: a job through `worker.handler.handler` against a bare diffusers call.

`python -m benchmarks.b5_serving [--quick] [--size PX] [--steps N] [--repeats R] [--root DIR] [--json-out F]
                                 [--profile]`

One model folder as the export writes it (the test kit's tiny SDXL saved fp16 with `variant="fp16"`, plus
a fuseline.json) on a scratch volume; both contenders run in this one process, on the CPU, with one torch
thread (OMP_NUM_THREADS=1 unless set), on the same inputs:

  handler  `handler({"id": ..., "input": {...}})`, exactly as RunPod calls it: input validation, the
           manifest check, parameter resolution, the pipeline cache, the worker's prompt encoding,
           scheduler, seeded denoising, checked VAE decode, PNG encoding and base64.
  bare     `StableDiffusionXLPipeline.from_pretrained(folder, variant="fp16", dtype=float32,
           local_files_only=True)` (how the worker loads a folder on the CPU), called with the prompt,
           seed (a CPU generator), steps, size and guidance scale, with the folder's own scheduler, then
           the image encoded to PNG and base64 as well, so that both do the same work on the result.

Both are warmed first (the handler's first job loads its pipeline into the cache; that job is not
timed), then timed alternately (handler, bare, handler, bare, ...). Each job's wall time and the process's
CPU time (all threads) are taken; with one torch thread the CPU time is the work done and barely moves when
other processes share the cores, so on a shared machine it is the steadier of the two. Reported: medians
of both, the ratios handler / bare (target <= 1.05), the overhead in ms per job (difference of the medians,
and the median of the paired differences), and whether the two paths produced the same PNG bytes.

Then the image modes' memory (`modes_memory`, issue 17): peak memory of a txt2img, an img2img and an
inpaint job through the handler, each the first of its mode (so the img2img and inpaint pipelines are
built from the cached template's components during the measured job), against the target that an image
mode's job peaks within 10% of a txt2img job's. On a GPU that is torch.cuda.max_memory_allocated; this
benchmark runs on the CPU, where torch keeps no such counter, so a job's peak is measured the same way
from torch's own allocator: the bytes of every tensor the cached pipelines hold (unique storages, weights
and buffers) before the job, plus the highest level the job's allocations reach above that (torch's
profiler with profile_memory: every allocation and free of the job, in time order). A reference shows what
the measure sees when weights are not shared: an img2img pipeline loaded again from the folder for one job
(what sharing the components avoids).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks import save_summary

DEFAULT_ROOT = Path("/tmp/fuseline-bench")
TARGET_RATIO = 1.05
TEMPLATE = "b5-tiny"
PROMPT = "a lighthouse on a cliff at dusk, dramatic clouds, oil painting"
SEED = 1234
GUIDANCE = 5.0
# 256 px (a 32x32 latent) and 12 steps: the tiny UNet's work then dominates a job, as the full UNet's does
# on a GPU at 1024 px; --quick keeps the test fast.
FULL = {"size": 256, "steps": 12, "repeats": 9}
QUICK = {"size": 128, "steps": 4, "repeats": 3}


class _Clock:
    """Wall time and this process's CPU time (all threads) since creation, in ms. With one torch thread
    the CPU time is the work done, barely moved by other processes on the cores; wall time is not."""

    def __init__(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def stop(self) -> dict[str, float]:
        return {
            "wall_ms": round((time.perf_counter() - self._wall) * 1000, 1),
            "cpu_ms": round((time.process_time() - self._cpu) * 1000, 1),
        }


def build_volume(root: Path, kit_dir: Path) -> Path:
    """`root`/models/TEMPLATE: the kit's pipeline saved as the export saves it, with a manifest."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from fuseline.core.manifest import CheckpointRef, ModelManifest, VaeRef
    from testkit.models import build_kit

    kit = build_kit(kit_dir)
    folder = root / "models" / TEMPLATE
    if (folder / "fuseline.json").is_file():
        return root
    pipe = StableDiffusionXLPipeline.from_pretrained(kit.diffusers_dir, local_files_only=True)
    pipe.to(torch.float16).save_pretrained(folder, variant="fp16", safe_serialization=True)
    manifest = ModelManifest(
        template=TEMPLATE,
        checkpoint=CheckpointRef(id="sdxl-tiny", source=f"file:{kit.single_file}"),
        loras=[],
        vae=VaeRef(source="checkpoint"),
        prediction_type="epsilon",
        spec_hash="0" * 64,
        fuseline_version="bench",
    )
    # Written last: its presence marks the folder complete.
    (folder / "fuseline.json").write_text(manifest.model_dump_json(indent=2))
    return root


def job_input(size: int, steps: int) -> dict[str, Any]:
    return {
        "template": TEMPLATE,
        "prompt": PROMPT,
        "width": size,
        "height": size,
        "steps": steps,
        "guidance_scale": GUIDANCE,
        "seed": SEED,
        "output": {"format": "png"},
    }


def bare_job(pipe, size: int, steps: int) -> tuple[str, dict[str, float]]:
    """The same request straight through diffusers; returns (base64 PNG, timings in ms)."""
    import torch

    started = time.perf_counter()
    image = pipe(
        prompt=PROMPT,
        width=size,
        height=size,
        num_inference_steps=steps,
        guidance_scale=GUIDANCE,
        generator=torch.Generator("cpu").manual_seed(SEED),
    ).images[0]
    inference = time.perf_counter()
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    done = time.perf_counter()
    return data, {"inference": (inference - started) * 1000, "encode": (done - inference) * 1000}


def compare_images(handler_b64: str, bare_b64: str) -> dict[str, Any]:
    """Equal PNG bytes, or how far apart the decoded pixels are."""
    import numpy as np
    from PIL import Image

    a, b = base64.b64decode(handler_b64), base64.b64decode(bare_b64)
    result: dict[str, Any] = {"png_bytes_equal": a == b, "png_bytes": [len(a), len(b)]}
    if a != b:
        pa = np.asarray(Image.open(io.BytesIO(a)), dtype=np.int16)
        pb = np.asarray(Image.open(io.BytesIO(b)), dtype=np.int16)
        result["same_shape"] = pa.shape == pb.shape
        if pa.shape == pb.shape:
            diff = np.abs(pa - pb)
            result["pixels_equal"] = bool(diff.max() == 0)
            result["max_abs_diff"] = int(diff.max())
            result["fraction_differing"] = float((diff > 0).mean())
    return result


def run_benchmark(
    root: Path,
    quick: bool,
    size: int | None = None,
    steps: int | None = None,
    repeats: int | None = None,
    kit_dir: Path | None = None,
    profile: bool = False,
    log=print,
) -> dict[str, Any]:
    """Build the volume, point the handler at it through the environment (as on RunPod), measure; the
    environment, the handler's worker and torch's thread count are restored afterwards."""
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    import worker.handler

    # Loading progress bars and dtype notes would bury the figures (the worker's main() does the same).
    for library in (diffusers_logging, transformers_logging):
        library.disable_progress_bar()
        library.set_verbosity_error()
    preset = QUICK if quick else FULL
    size, steps, repeats = size or preset["size"], steps or preset["steps"], repeats or preset["repeats"]
    kit_dir = kit_dir or Path(os.environ.get("FUSELINE_KIT_DIR") or root / "kit")
    volume = build_volume(root / "b5-volume", kit_dir)
    env = {
        "FUSELINE_VOLUME": str(volume),
        "FUSELINE_DEFAULT_TEMPLATE": TEMPLATE,
        "FUSELINE_DEVICE": "cpu",
        "FUSELINE_MIN_SIZE": "64",
        "HF_HUB_OFFLINE": "1",
    }
    saved_env = {key: os.environ.get(key) for key in env}
    saved_threads, saved_worker = torch.get_num_threads(), worker.handler._worker
    try:
        os.environ.update(env)
        worker.handler._worker = None
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 1))
        summary = _measure(volume / "models" / TEMPLATE, quick, size, steps, repeats, log)
        summary["modes_memory"] = _measure_modes_memory(volume / "models" / TEMPLATE, size, log)
        if profile:
            summary["profile"] = _profile(volume / "models" / TEMPLATE, size, steps, repeats)
        return summary
    finally:
        worker.handler._worker = saved_worker
        torch.set_num_threads(saved_threads)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _measure(folder: Path, quick: bool, size: int, steps: int, repeats: int, log) -> dict[str, Any]:
    import torch
    from diffusers import StableDiffusionXLPipeline

    from benchmarks.b2_rebuild import code_version
    from worker.handler import handler

    job = {"id": "b5-job", "input": job_input(size, steps)}
    bare_pipe = StableDiffusionXLPipeline.from_pretrained(
        folder, variant="fp16", dtype=torch.float32, local_files_only=True
    ).to("cpu")
    bare_pipe.set_progress_bar_config(disable=True)

    def run_handler() -> tuple[dict[str, float], dict[str, Any]]:
        clock = _Clock()
        out = handler(job)
        if "error" in out:
            raise RuntimeError(f"handler failed on the benchmark job: {out['error']}")
        return clock.stop(), out

    def run_bare() -> tuple[dict[str, float], str, dict[str, float]]:
        clock = _Clock()
        data, timings = bare_job(bare_pipe, size, steps)
        return clock.stop(), data, timings

    # Warm-up: the handler's first job loads the pipeline into its cache (load reported, not timed).
    _, first = run_handler()
    run_bare()
    summary: dict[str, Any] = {
        "benchmark": "b5_serving",
        "quick": quick,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": os.getloadavg(),
        "code": code_version(("worker", "fuseline")),
        "job": job["input"],
        "handler_first_job_load_ms": first["timings_ms"]["load"],
    }
    log(f"warm; first job loaded the pipeline in {first['timings_ms']['load']} ms")

    runs: dict[str, list[dict[str, Any]]] = {"handler": [], "bare": []}
    images: dict[str, set[str]] = {"handler": set(), "bare": set()}
    for i in range(repeats):
        clock, out = run_handler()
        runs["handler"].append({**clock, "timings_ms": out["timings_ms"]})
        images["handler"].add(out["images"][0]["data"])
        clock_bare, data, timings = run_bare()
        runs["bare"].append({**clock_bare, "timings_ms": {k: round(v, 1) for k, v in timings.items()}})
        images["bare"].add(data)
        log(
            f"rep {i + 1}: handler {clock['wall_ms']:.0f} ms wall / {clock['cpu_ms']:.0f} ms CPU, "
            f"bare {clock_bare['wall_ms']:.0f} ms wall / {clock_bare['cpu_ms']:.0f} ms CPU"
        )

    medians = {
        name: {kind: statistics.median(r[kind] for r in results) for kind in ("wall_ms", "cpu_ms")}
        for name, results in runs.items()
    }
    pairs = list(zip(runs["handler"], runs["bare"], strict=True))
    comparison = compare_images(next(iter(images["handler"])), next(iter(images["bare"])))
    comparison["handler_deterministic"] = len(images["handler"]) == 1
    comparison["bare_deterministic"] = len(images["bare"]) == 1
    ratio = medians["handler"]["wall_ms"] / medians["bare"]["wall_ms"]
    ratio_cpu = medians["handler"]["cpu_ms"] / medians["bare"]["cpu_ms"]
    summary |= {
        "runs": runs,
        "median_ms": {name: {k: round(v, 1) for k, v in m.items()} for name, m in medians.items()},
        "image": comparison,
        "loadavg_end": os.getloadavg(),
        "ratios": {
            "handler_vs_bare": round(ratio, 4),
            "handler_vs_bare_cpu": round(ratio_cpu, 4),
            "target": TARGET_RATIO,
            "target_met": ratio <= TARGET_RATIO,
            "target_met_cpu": ratio_cpu <= TARGET_RATIO,
            "overhead_ms_per_job": round(medians["handler"]["wall_ms"] - medians["bare"]["wall_ms"], 1),
            "overhead_cpu_ms_per_job": round(medians["handler"]["cpu_ms"] - medians["bare"]["cpu_ms"], 1),
            "overhead_ms_per_job_paired_median": round(
                statistics.median(h["wall_ms"] - b["wall_ms"] for h, b in pairs), 1
            ),
            "overhead_cpu_ms_per_job_paired_median": round(
                statistics.median(h["cpu_ms"] - b["cpu_ms"] for h, b in pairs), 1
            ),
            "same_image": comparison["png_bytes_equal"],
        },
    }
    return summary


# Image modes' memory: an image mode's job peaks within this factor of a txt2img job's (issue 17).
MODES_MEMORY_TARGET = 1.10
# Denoising steps of the memory jobs: the peak is per step (and the decode), and profiling every
# allocation makes each step slow.
MODES_MEMORY_STEPS = 2
MODES_MEMORY_STRENGTH = 0.5


def held_tensor_bytes(entry) -> int:
    """Bytes of every tensor a cached template's pipelines hold (its own and its img2img/inpaint ones),
    each storage counted once: shared components count once, copies twice."""
    import itertools

    import torch

    storages: dict[int, int] = {}
    for pipe in (entry.pipe, *entry.mode_pipes.values()):
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                for tensor in itertools.chain(component.parameters(), component.buffers()):
                    storage = tensor.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def allocation_peak(run) -> tuple[int, Any]:
    """(highest level torch's CPU allocations reach above where they were when `run` started, its result),
    from torch's profiler: every allocation and free inside `run`, summed in time order."""
    import torch
    from torch.profiler import ProfilerActivity

    with torch.profiler.profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        result = run()
    level = peak = 0
    for event in sorted(profiler.events(), key=lambda e: e.time_range.start):
        level += event.self_cpu_memory_usage
        peak = max(peak, level)
    return peak, result


def _measure_modes_memory(folder: Path, size: int, log) -> dict[str, Any]:
    """Peak memory of one job per mode through the handler, and of an img2img pipeline loaded again."""
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from PIL import Image

    from worker.handler import get_worker, handler
    from worker.mode_pipelines import mode_pipeline

    base = job_input(size, MODES_MEMORY_STEPS)
    warm = handler({"id": "b5-modes-warm", "input": base})  # the template is cached before measuring
    if "error" in warm:
        raise RuntimeError(f"handler failed on the memory benchmark's job: {warm['error']}")
    picture = warm["images"][0]["data"]
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, size - size // 4, size - size // 4))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    jobs = {
        "txt2img": base,
        "img2img": {**base, "image": picture, "strength": MODES_MEMORY_STRENGTH},
        "inpaint": {
            **base,
            "image": picture,
            "mask": base64.b64encode(buffer.getvalue()).decode("ascii"),
            "strength": MODES_MEMORY_STRENGTH,
        },
    }
    entry, _ = get_worker().cache.get(TEMPLATE)
    results: dict[str, dict[str, Any]] = {}
    for mode, raw in jobs.items():
        held = held_tensor_bytes(entry)
        clock = _Clock()
        peak, out = allocation_peak(lambda raw=raw, mode=mode: handler({"id": f"b5-{mode}", "input": raw}))
        if "error" in out or out.get("mode") != mode:
            raise RuntimeError(f"{mode} job failed in the memory benchmark: {out.get('error') or out}")
        results[mode] = {
            "held_before_bytes": held,
            "peak_above_held_bytes": peak,
            "peak_bytes": held + peak,
            "held_after_bytes": held_tensor_bytes(entry),
            **clock.stop(),
        }
        log(f"{mode}: peak {(held + peak) / 2**20:.2f} MiB ({held / 2**20:.2f} MiB held before the job)")
    shared = all(
        getattr(mode_pipeline(entry, mode), name) is getattr(entry.pipe, name)
        for mode in ("img2img", "inpaint")
        for name in ("unet", "vae", "text_encoder", "text_encoder_2")
    )
    picture_pil = Image.open(io.BytesIO(base64.b64decode(picture)))

    def loaded_again():
        pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(
            folder, variant="fp16", dtype=torch.float32, local_files_only=True
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe(
            prompt=PROMPT,
            image=picture_pil,
            strength=MODES_MEMORY_STRENGTH,
            num_inference_steps=MODES_MEMORY_STEPS,
            guidance_scale=GUIDANCE,
            generator=torch.Generator("cpu").manual_seed(SEED),
        )

    held = held_tensor_bytes(entry)
    peak, _ = allocation_peak(loaded_again)
    reference = {"held_before_bytes": held, "peak_above_held_bytes": peak, "peak_bytes": held + peak}
    log(f"img2img pipeline loaded again (reference): peak {(held + peak) / 2**20:.2f} MiB")
    txt2img = results["txt2img"]["peak_bytes"]
    ratios = {mode: round(results[mode]["peak_bytes"] / txt2img, 4) for mode in ("img2img", "inpaint")}
    return {
        "method": "held tensor bytes + torch profiler allocation peak (CPU)",
        "size": size,
        "steps": MODES_MEMORY_STEPS,
        "strength": MODES_MEMORY_STRENGTH,
        "jobs": results,
        "reference_img2img_loaded_again": reference,
        "ratios": {
            "img2img_vs_txt2img": ratios["img2img"],
            "inpaint_vs_txt2img": ratios["inpaint"],
            "reference_vs_txt2img": round(reference["peak_bytes"] / txt2img, 4),
            "target": MODES_MEMORY_TARGET,
            "target_met": max(ratios.values()) <= MODES_MEMORY_TARGET,
        },
        "components_shared": shared,
    }


# What the handler does around the pipeline call, and the pipeline call itself, as cProfile names them.
_PROFILED = ("worker/", "pipeline_stable_diffusion_xl.py", "image_processor.py", "PIL/PngImagePlugin.py")


def _profile(folder: Path, size: int, steps: int, jobs: int) -> dict[str, Any]:
    """cProfile over `jobs` handler jobs and `jobs` bare jobs (after the timed runs: the pipelines are
    warm): cumulative ms per job of the worker's functions and of the pipeline's, largest first."""
    import cProfile
    import pstats

    import torch
    from diffusers import StableDiffusionXLPipeline

    from worker.handler import handler

    job = {"id": "b5-profile", "input": job_input(size, steps)}
    bare_pipe = StableDiffusionXLPipeline.from_pretrained(
        folder, variant="fp16", dtype=torch.float32, local_files_only=True
    )
    bare_pipe.set_progress_bar_config(disable=True)
    bare_job(bare_pipe, size, steps)
    result: dict[str, Any] = {"jobs": jobs}
    for name, run in (("handler", lambda: handler(job)), ("bare", lambda: bare_job(bare_pipe, size, steps))):
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(jobs):
            run()
        profiler.disable()
        stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
        rows = []
        for (path, line, function), (_cc, _nc, _tt, cumulative, _callers) in stats.items():
            if any(part in path for part in _PROFILED):
                where = path.split("site-packages/")[-1].split("/work/main/")[-1]
                rows.append((cumulative * 1000 / jobs, f"{where}:{line}({function})"))
        rows.sort(reverse=True)
        result[name] = [{"ms_per_job": round(ms, 2), "where": where} for ms, where in rows[:30]]
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.b5_serving", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK['size']} px, {QUICK['steps']} steps")
    parser.add_argument(
        "--size", type=int, help=f"image side in px, a multiple of 64 (default {FULL['size']})"
    )
    parser.add_argument("--steps", type=int, help=f"denoising steps (default {FULL['steps']})")
    parser.add_argument("--repeats", type=int, help=f"timed jobs per contender (default {FULL['repeats']})")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="work folder (default %(default)s)")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument(
        "--profile", action="store_true", help="then cProfile as many jobs of each; where the time goes"
    )
    args = parser.parse_args(argv)
    # Before torch starts its thread pool: one thread, as the worker tests run the tiny model.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    summary = run_benchmark(
        args.root,
        args.quick,
        args.size,
        args.steps,
        args.repeats,
        profile=args.profile,
        log=lambda line: print(line, flush=True),
    )
    save_summary(summary, args.json_out)
    print(
        json.dumps(
            {
                "median_ms": summary["median_ms"],
                **summary["ratios"],
                "image": summary["image"],
                "modes_memory": summary["modes_memory"]["ratios"],
            },
            indent=2,
        )
    )
    return summary


if __name__ == "__main__":
    main()
