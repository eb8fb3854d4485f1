"""B1: merge one template (two LoRAs) into full-size SDXL: fuseline vs the disk floor and the naive path.

`python -m benchmarks.b1_merge [--quick] [--root DIR] [--only fuseline,cp,naive] [--profile]`

Each contender runs as its own subprocess, one after the other, on the same synthetic inputs
(benchmarks.synth_sdxl, generated first if missing), with its wall time measured by this process and its
peak RSS taken from wait4()'s rusage (ru_maxrss: what the 2 GB target is about). While each runs, its
/proc status is sampled to split peak RSS into anonymous memory and mapped file pages (page-cache pages of
a memory-mapped input count in RSS while mapped, yet are not memory the process needs).

  fuseline  stages.merge.merge_template: streaming fuse + fp16 export (what `python -m stages.merge` runs);
            its reader and writer threads overlap I/O with the fuse, so cProfile (--profile) sees only
            the fuse and the imports
  cp        the disk floor: `cp -r base/ OUT/` (writes the same number of bytes the export writes) plus
            `cat` of both LoRA files to /dev/null (reads every input byte once), then `sync`
  naive     diffusers: from_pretrained in fp32, load_lora_weights x2, set_adapters, fuse_lora,
            unload_lora_weights, to(fp16), save_pretrained(variant="fp16")

Every contender ends with `sync`, inside its timed region, so written bytes reach the disk; before each, all
dirty pages are synced and the inputs are read once (`cat` to /dev/null), so every contender starts with
warm inputs (dropping the page cache needs root). The outputs of fuseline and naive are compared tensor by
tensor at the end. Prints one JSON summary with ratios against the targets: fuseline <= 1.5x cp wall time,
fuseline peak RSS <= 2 GB.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks import code_version, save_summary, synth_sdxl

CONTENDERS = ("cp", "fuseline", "naive")
LORA_SCALES = {"style": 0.8, "detail": 0.5}
TARGET_TIME_RATIO = 1.5
TARGET_PEAK_RSS_BYTES = 2_000_000_000
SHARD_SIZE_MB = 2000  # params.yaml merge.shard_size_mb
PROFILE_TOP = 25
BENCH_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DIFFUSERS_OFFLINE": "1"}


# ---- the contenders' bodies (run inside the child process) -----------------------------------------------


def run_fuseline(
    data: synth_sdxl.SynthPaths, out: Path, shard_size_mb: float = SHARD_SIZE_MB, threads: int | None = None
) -> dict:
    from fuseline.core.manifest import CheckpointRef, VaeRef
    from stages.lora import LoraInput
    from stages.merge import TemplateIdentity, merge_template

    identity = TemplateIdentity(
        template="bench",
        checkpoint=CheckpointRef(id="sdxl-synth", source=f"file:{data.base_dir}"),
        vae=VaeRef(source="checkpoint"),
        spec_hash="0" * 64,
    )
    loras = [
        LoraInput(path=data.loras[name], scale=scale, name=f"file:{data.loras[name]}")
        for name, scale in LORA_SCALES.items()
    ]
    result = merge_template(
        data.base_dir,
        data.base_dir / "vae",
        loras,
        out,
        identity=identity,
        prediction_type="epsilon",
        shard_size_mb=shard_size_mb,
        threads=threads,
    )
    return {"fused_tensors": result.fused_tensors, "files": result.files}


def run_naive(data: synth_sdxl.SynthPaths, out: Path) -> dict:
    import torch
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(
        data.base_dir, torch_dtype=torch.float32, local_files_only=True
    )
    for name in LORA_SCALES:
        pipe.load_lora_weights(str(data.loras[name]), adapter_name=name)
    pipe.set_adapters(list(LORA_SCALES), list(LORA_SCALES.values()))
    pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"])
    pipe.unload_lora_weights()
    pipe.to(torch.float16)
    pipe.save_pretrained(out, variant="fp16", safe_serialization=True)
    return {}


def child_main(
    contender: str,
    root: Path,
    out: Path,
    profile: Path | None,
    shard_size_mb: float = SHARD_SIZE_MB,
    fuse_threads: int | None = None,
) -> None:
    """Entry point of one contender's subprocess: run it, sync, print one JSON line."""
    data = synth_sdxl.synth_paths(root)
    if contender == "fuseline":
        body = functools.partial(run_fuseline, shard_size_mb=shard_size_mb, threads=fuse_threads)
    else:
        body = run_naive
    started = time.perf_counter()
    if profile is not None:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        details = profiler.runcall(body, data, out)
        os.sync()
        with open(profile, "w") as handle:
            # Cumulative shows which step dominates; internal time shows which primitive does the work.
            for order in ("cumulative", "tottime"):
                pstats.Stats(profiler, stream=handle).sort_stats(order).print_stats(PROFILE_TOP)
    else:
        details = body(data, out)
        os.sync()
    details["work_s"] = round(time.perf_counter() - started, 2)
    print("B1-RESULT " + json.dumps(details), flush=True)


# ---- measuring (parent process) ----------------------------------------------------------------------------


class StatusSampler(threading.Thread):
    """Polls /proc/<pid>/status of a process and its children for the peak RssAnon and RssFile, in KiB."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        self._done = threading.Event()

    def _pids(self) -> list[int]:
        try:
            children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        except OSError:
            children = []
        return [self.pid, *map(int, children)]

    def run(self) -> None:
        while not self._done.is_set():
            for pid in self._pids():
                try:
                    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
                except OSError:
                    continue
                for line in lines:
                    key, _, value = line.partition(":")
                    if key in self.peak:
                        self.peak[key] = max(self.peak[key], int(value.split()[0]))
            self._done.wait(self.interval)

    def stop(self) -> dict[str, int]:
        self._done.set()
        self.join()
        return self.peak


def input_files(data: synth_sdxl.SynthPaths) -> list[Path]:
    return sorted(p for p in data.base_dir.rglob("*") if p.is_file()) + list(data.loras.values())


def warm_inputs(data: synth_sdxl.SynthPaths) -> None:
    """Sync pending writes (untimed), then read every input once so each contender finds them cached."""
    os.sync()
    for path in input_files(data):
        with open(path, "rb") as handle:
            while handle.read(1 << 24):
                pass


def pressure_totals() -> dict[str, int]:
    """Linux PSI: microseconds during which some task waited for CPU / for I/O, since boot (0 if absent)."""
    totals = {}
    for resource in ("cpu", "io"):
        try:
            some = Path(f"/proc/pressure/{resource}").read_text().splitlines()[0]
            totals[resource] = int(some.rsplit("total=", 1)[1])
        except (OSError, IndexError, ValueError):
            totals[resource] = 0
    return totals


def measure(command: list[str], env: dict[str, str] | None = None) -> dict:
    """Run `command` as a subprocess: wall seconds, peak RSS (wait4 rusage), sampled anon/file RSS peaks, and
    how much of the time any task on the machine waited for CPU or I/O (other load makes times noisy)."""
    pressure = pressure_totals()
    load = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    sampler = StatusSampler(proc.pid)
    sampler.start()
    # Read the pipes on threads so a chatty child never blocks; wait4 must reap it to get its rusage.
    chunks: dict[str, list[str]] = {"stdout": [], "stderr": []}
    readers = [
        threading.Thread(target=lambda s=stream, k=key: chunks[k].append(s.read()), daemon=True)
        for key, stream in (("stdout", proc.stdout), ("stderr", proc.stderr))
    ]
    for reader in readers:
        reader.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    peaks = sampler.stop()
    for reader in readers:
        reader.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = "".join(chunks["stdout"]), "".join(chunks["stderr"])
    result = {
        "wall_s": round(wall, 2),
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "peak_rss_anon_bytes": peaks["RssAnon"] * 1024,
        "peak_rss_file_bytes": peaks["RssFile"] * 1024,
        "user_s": round(usage.ru_utime, 2),
        "sys_s": round(usage.ru_stime, 2),
        "returncode": proc.returncode,
        "load_avg_1min_before": round(load, 2),
        "load_avg_1min_after": round(os.getloadavg()[0], 2),
        "cpu_pressure_pct": round((pressure_totals()["cpu"] - pressure["cpu"]) / 1e4 / max(wall, 1e-9), 1),
        "io_pressure_pct": round((pressure_totals()["io"] - pressure["io"]) / 1e4 / max(wall, 1e-9), 1),
    }
    for line in stdout.splitlines():
        if line.startswith("B1-RESULT "):
            result.update(json.loads(line.removeprefix("B1-RESULT ")))
    if proc.returncode != 0:
        result["error"] = stderr[-3000:]
    return result


def contender_command(
    contender: str,
    data: synth_sdxl.SynthPaths,
    out: Path,
    profile: Path | None,
    shard_size_mb: float = SHARD_SIZE_MB,
    fuse_threads: int | None = None,
) -> list[str]:
    if contender == "cp":
        loras = " ".join(f"'{p}'" for p in data.loras.values())
        return ["bash", "-c", f"cp -r '{data.base_dir}' '{out}' && cat {loras} > /dev/null && sync"]
    command = [sys.executable, "-m", "benchmarks.b1_merge", "--child", contender, "--root", str(data.root)]
    command += ["--out", str(out), "--shard-size-mb", str(shard_size_mb)]
    if fuse_threads is not None:
        command += ["--fuse-threads", str(fuse_threads)]
    if profile is not None:
        command += ["--profile-to", str(profile)]
    return command


def tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def folder_tensors(folder: Path) -> dict[str, dict[str, Path]]:
    """component -> tensor name -> file, for the fp16 variant files of an exported folder."""
    from safetensors import safe_open

    out: dict[str, dict[str, Path]] = {}
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        files = sorted((folder / component).glob("*.fp16*.safetensors"))
        names: dict[str, Path] = {}
        for path in files:
            with safe_open(str(path), framework="pt") as handle:
                names.update(dict.fromkeys(handle.keys(), path))
        out[component] = names
    return out


def compare_exports(ours: Path, theirs: Path) -> dict:
    """Max |difference| (in fp16 ulps of the larger value) over every tensor the two exports share, and the
    names only one of them has."""
    import torch
    from safetensors import safe_open

    a, b = folder_tensors(ours), folder_tensors(theirs)
    worst_abs, worst_ulp, compared, only = 0.0, 0.0, 0, []
    for component in a:
        only += [f"{component}/{n}" for n in sorted(a[component].keys() ^ b[component].keys())]
        for name in sorted(a[component].keys() & b[component].keys()):
            with (
                safe_open(str(a[component][name]), framework="pt") as ha,
                safe_open(str(b[component][name]), framework="pt") as hb,
            ):
                x, y = ha.get_tensor(name).float(), hb.get_tensor(name).float()
            if x.shape != y.shape:
                only.append(f"{component}/{name} (shape {tuple(x.shape)} vs {tuple(y.shape)})")
                continue
            diff = (x - y).abs()
            # fp16 ulp at magnitude m is 2^(floor(log2 m) - 10) for normal numbers.
            ulp = torch.exp2(torch.floor(torch.log2(torch.maximum(x.abs(), y.abs()).clamp_min(2**-14))) - 10)
            worst_abs = max(worst_abs, diff.max().item())
            worst_ulp = max(worst_ulp, (diff / ulp).max().item())
            compared += 1
    return {
        "tensors_compared": compared,
        "max_abs_diff": worst_abs,
        "max_ulp_diff": worst_ulp,
        "unmatched": only[:20],
    }


def run_benchmark(
    root: Path,
    quick: bool,
    contenders: list[str],
    profile: bool,
    seed: int = 0,
    repeats: int = 1,
    shard_size_mb: float = SHARD_SIZE_MB,
    fuse_threads: int | None = None,
) -> dict:
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    load_at_start = os.getloadavg()
    t0 = time.perf_counter()
    generated = not synth_sdxl.is_complete(synth_sdxl.synth_paths(root), quick, seed)
    data = synth_sdxl.ensure(root, quick, seed, log=log)
    how = "generated" if generated else "reused"
    log(f"inputs ready in {time.perf_counter() - t0:.1f} s ({how}) at {root}")
    outputs = root / "b1-out"
    shutil.rmtree(outputs, ignore_errors=True)
    outputs.mkdir()
    env = {**os.environ, **BENCH_ENV}
    results: dict[str, dict] = {}
    for contender in contenders:
        out = outputs / contender
        runs = []
        for attempt in range(repeats):
            # The last run's output is kept for the comparison below; earlier ones make room for the next.
            shutil.rmtree(out, ignore_errors=True)
            warm_inputs(data)
            log(f"running {contender} ({attempt + 1}/{repeats}) ...")
            command = contender_command(contender, data, out, None, shard_size_mb, fuse_threads)
            runs.append(measure(command, env))
            if out.exists():
                runs[-1]["output_bytes"] = tree_bytes(out)
            log(f"{contender}: {json.dumps(runs[-1])[:800]}")
        if contender == "cp":
            # Nothing compares cp's copy: removing it frees its 6.9 GB of page cache, so the next contender
            # does not pay for reclaiming the floor's leftovers.
            shutil.rmtree(out, ignore_errors=True)
        # Report the run with the median wall time, and every run's time and peak RSS beside it.
        result = dict(sorted(runs, key=lambda r: r["wall_s"])[(len(runs) - 1) // 2])
        if repeats > 1:
            result["wall_runs_s"] = [r["wall_s"] for r in runs]
            result["peak_rss_runs_bytes"] = [r["peak_rss_bytes"] for r in runs]
        results[contender] = result

    summary: dict = {
        "benchmark": "b1_merge",
        "quick": quick,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "code": code_version(),
        "inputs": {
            "root": str(root),
            "base_bytes": tree_bytes(data.base_dir),
            "lora_bytes": {name: path.stat().st_size for name, path in data.loras.items()},
            "lora_scales": LORA_SCALES,
            "warm": True,
        },
        "repeats": repeats,
        "shard_size_mb": shard_size_mb,
        "fuse_threads": fuse_threads if fuse_threads is not None else "automatic",
        "load_avg_start": [round(x, 2) for x in load_at_start],
        "results": results,
        "targets": {"time_vs_cp": TARGET_TIME_RATIO, "peak_rss_bytes": TARGET_PEAK_RSS_BYTES},
    }
    ratios: dict = {}
    fl = results.get("fuseline", {})
    if "cp" in results and fl.get("returncode") == 0:
        ratios["fuseline_vs_cp_wall"] = round(fl["wall_s"] / results["cp"]["wall_s"], 2)
        ratios["fuseline_time_target_met"] = ratios["fuseline_vs_cp_wall"] <= TARGET_TIME_RATIO
    if fl.get("returncode") == 0:
        ratios["fuseline_peak_rss_vs_target"] = round(fl["peak_rss_bytes"] / TARGET_PEAK_RSS_BYTES, 2)
        ratios["fuseline_rss_target_met"] = fl["peak_rss_bytes"] <= TARGET_PEAK_RSS_BYTES
    if "naive" in results and fl.get("returncode") == 0 and results["naive"].get("returncode") == 0:
        ratios["naive_vs_fuseline_wall"] = round(results["naive"]["wall_s"] / fl["wall_s"], 2)
        ratios["naive_vs_fuseline_peak_rss"] = round(
            results["naive"]["peak_rss_bytes"] / fl["peak_rss_bytes"], 2
        )
        summary["fuseline_vs_naive_output"] = compare_exports(outputs / "fuseline", outputs / "naive")
    summary["ratios"] = ratios

    if profile and "fuseline" in contenders:
        profile_path = root / "b1-fuseline.prof.txt"
        shutil.rmtree(outputs / "fuseline-profiled", ignore_errors=True)
        warm_inputs(data)
        log("profiling fuseline (cProfile) ...")
        profiled = measure(
            contender_command(
                "fuseline", data, outputs / "fuseline-profiled", profile_path, shard_size_mb, fuse_threads
            ),
            env,
        )
        summary["profile"] = {"path": str(profile_path), "wall_s": profiled["wall_s"]}
        if profile_path.exists():
            summary["profile"]["top"] = profile_path.read_text()
    shutil.rmtree(outputs, ignore_errors=True)
    return summary


def machine() -> dict:
    import platform

    memory = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "memory_bytes": memory,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.b1_merge", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="the test kit's tiny sizes (seconds)")
    parser.add_argument(
        "--root", type=Path, help="synthetic inputs and scratch outputs (default /tmp/fuseline-bench/...)"
    )
    parser.add_argument(
        "--only", default=",".join(CONTENDERS), help="comma-separated subset of cp,fuseline,naive"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also run fuseline once under cProfile (main thread only: the export's reader and writer "
        "threads do not appear)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="runs per contender; the median is reported")
    parser.add_argument(
        "--shard-size-mb",
        type=float,
        default=SHARD_SIZE_MB,
        help="fuseline's export shard size (params.yaml)",
    )
    parser.add_argument(
        "--fuse-threads",
        type=int,
        help="threads fusing each weight in fuseline (default: stages.export.fuse_threads(), every CPU here)",
    )
    parser.add_argument("--json-out", type=Path, help="also write the summary here")
    # Internal: run one contender's body in this process.
    parser.add_argument("--child", choices=("fuseline", "naive"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--profile-to", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in BENCH_ENV.items():
        os.environ.setdefault(key, value)
    root = args.root or synth_sdxl.default_root(args.quick)
    if args.child:
        child_main(args.child, root, args.out, args.profile_to, args.shard_size_mb, args.fuse_threads)
        return
    contenders = [c for c in args.only.split(",") if c]
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        parser.error(f"--only: unknown contenders {sorted(unknown)}; choose from {','.join(CONTENDERS)}")
    summary = run_benchmark(
        root,
        args.quick,
        contenders,
        args.profile,
        args.seed,
        max(1, args.repeats),
        args.shard_size_mb,
        args.fuse_threads,
    )
    print(save_summary(summary, args.json_out), flush=True)


if __name__ == "__main__":
    main()
