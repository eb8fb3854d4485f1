"""B7: disk budget of a build: peak disk used by a cold build of one template in a fresh project, per DVC
cache type, against checkpoint + merged model (target: at most 2.2x).

`python -m benchmarks.b7_disk [--quick] [--cache-types copy,hardlink,symlink,reflink] [--root DIR]
[--interval S] [--json-out F]`

The build is the real one, as CI runs it on a fresh clone: a scratch DVC project (testkit.project: the repo's
dvc.yaml, params.yaml, stages/ and fuseline/; empty DVC cache, empty workspace) whose catalog has one
checkpoint, the synthetic SDXL single file (benchmarks/synth_sdxl; the kit-size set with --quick), and one
template with the synthetic "style" LoRA. The checkpoint and the LoRA are pinned `s3://` sources on a
SeaweedFS bucket (127.0.0.1), so the fetch stages download them into the build's download cache
(FUSELINE_CACHE_DIR) as they would from a real remote; the catalog VAE and the checkpoint's config folder
are `file:` sources used in place (small). `dvc repro merge@t1` then runs fetch-checkpoint, fetch-loras,
fetch-vae, convert, vae and merge (verify adds a metrics file and a preview, kilobytes, and at full size
would run SDXL on the CPU).

Disk is sampled every --interval seconds (default 0.2) while `dvc repro` runs, by a thread that walks the
build's own folder (project workspace, .dvc/cache, .dvc/tmp, the download cache and TMPDIR, all under one
folder) and adds up the blocks each file occupies on disk (`st_blocks`), counting a hard-linked inode once
and a symbolic link as the link itself: what the build really takes on the disk, unaffected by anyone else
writing to the same filesystem (statvfs would count them). Reported: the peak and its split at the peak
(download cache, DVC cache, workspace, temporary files), the final figures, the repro's wall time, and
checkpoint + merged model (the single file's size plus the merged folder's), whose ratio to the peak is the
figure the target is about.

Each cache type runs in a fresh project. After the build, one LoRA scale is edited and `dvc repro` runs
again (merge re-runs over the outputs DVC linked and protected read-only), then `dvc status` must be
clean: a cache type that breaks a stage shows up as an error in the JSON, not as a number. `reflink` needs
a filesystem with copy-on-write extents (btrfs, XFS with reflink=1); on ext4 DVC refuses it, which is
recorded as such.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import stat
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks import code_version, save_summary, synth_sdxl
from testkit.project import RUNNING_STAGE, DvcProject, make_dvc_project
from testkit.servers import SeaweedS3

DEFAULT_ROOT = Path("/tmp/fuseline-bench")
CACHE_TYPES = ("copy", "hardlink", "symlink", "reflink")
TARGET_RATIO = 2.2
CHECKPOINT = "synth"
TEMPLATE = "t1"
LORA = "style"
SCALES = (0.8, 0.6)  # the build, then the edit
# What the sampler splits the peak into (folders under the build's root; everything else is "other").
PARTS = ("download-cache", "dvc-cache", "workspace", "tmp")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


class DiskSampler(threading.Thread):
    """Every `interval` seconds, the bytes files under `root` occupy on disk (st_blocks x 512; a hard-linked
    inode once, a symbolic link as itself), split by `parts(path) -> name`; keeps the peak and its split."""

    def __init__(self, root: Path, parts: Any, interval: float = 0.2) -> None:
        super().__init__(daemon=True, name="b7-disk-sampler")
        self.root, self.parts, self.interval = root, parts, interval
        self.peak_bytes, self.peak_split, self.samples = 0, {}, 0
        self._stop_event = threading.Event()

    def measure(self) -> tuple[int, dict[str, int]]:
        seen: set[tuple[int, int]] = set()
        split: dict[str, int] = {}
        for folder, dirs, files in os.walk(self.root):
            dirs.sort(key=lambda name: name != ".dvc")  # the cache first: a linked inode counts there
            for name in files:
                path = os.path.join(folder, name)
                try:
                    info = os.lstat(path)
                except FileNotFoundError:
                    continue  # removed while we walked (a stage's temporary file)
                key = (info.st_dev, info.st_ino)
                if key in seen:
                    continue
                seen.add(key)
                part = self.parts(path)
                split[part] = split.get(part, 0) + info.st_blocks * 512
        return sum(split.values()), split

    def run(self) -> None:
        while not self._stop_event.is_set():
            total, split = self.measure()
            self.samples += 1
            if total > self.peak_bytes:
                self.peak_bytes, self.peak_split = total, split
            self._stop_event.wait(self.interval)

    def stop(self) -> dict[str, Any]:
        self._stop_event.set()
        self.join()
        total, split = self.measure()
        return {
            "peak_bytes": max(self.peak_bytes, total),
            "peak_split_bytes": self.peak_split if self.peak_bytes >= total else split,
            "final_bytes": total,
            "final_split_bytes": split,
            "samples": self.samples,
        }


def _part_of(build: Path) -> Any:
    workspace, cache = build / "project", build / "project" / ".dvc" / "cache"
    dvc_tmp = build / "project" / ".dvc" / "tmp"

    def part(path: str) -> str:
        p = Path(path)
        if p.is_relative_to(cache):
            return "dvc-cache"
        if p.is_relative_to(dvc_tmp) or p.is_relative_to(build / "tmp"):
            return "tmp"
        if p.is_relative_to(build / "download-cache"):
            return "download-cache"
        if p.is_relative_to(workspace):
            return "workspace"
        return "other"

    return part


def catalog(
    checkpoint_source: str, checkpoint_sha: str, lora_source: str, lora_sha: str, paths, scale: float
):
    return {
        "version": 1,
        "vae": {"source": f"file:{paths.base_dir / 'vae'}"},
        "checkpoints": {
            CHECKPOINT: {
                "source": checkpoint_source,
                "sha256": checkpoint_sha,
                "prediction": "epsilon",
                "config": f"file:{paths.config_dir}",
            }
        },
        "templates": {
            TEMPLATE: {
                "checkpoint": CHECKPOINT,
                "loras": [{"source": lora_source, "sha256": lora_sha, "scale": scale}],
            }
        },
    }


def _folder_bytes(folder: Path) -> int:
    """The folder's content in bytes, through symbolic links (a symlinked file is its cache copy)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def build_once(
    cache_type: str, work: Path, sources: dict[str, Any], s3_env: dict[str, str], interval: float, log
) -> dict[str, Any]:
    """One cold build of TEMPLATE with `cache_type` in a fresh project under `work`, sampled; then an edit
    and a rebuild, and `dvc status`. Returns the measurements (or the error that stopped it)."""
    (work / "download-cache").mkdir(parents=True)
    (work / "tmp").mkdir()
    project: DvcProject = make_dvc_project(work / "project", sources["catalog"](SCALES[0]))
    project.env = {
        **{k: v for k, v in project.env.items() if not k.startswith("AWS_")},
        **s3_env,
        "FUSELINE_CACHE_DIR": str(work / "download-cache"),
        "TMPDIR": str(work / "tmp"),
    }
    project.dvc("config", "cache.type", cache_type)
    result: dict[str, Any] = {"cache_type": cache_type}
    sampler = DiskSampler(work, _part_of(work), interval)
    sampler.start()
    t0 = time.monotonic()
    done = project.dvc("repro", f"merge@{TEMPLATE}", check=False, timeout=4 * 3600)
    result["repro_s"] = round(time.monotonic() - t0, 1)
    result |= sampler.stop()
    result["loadavg_after_build"] = [round(x, 2) for x in os.getloadavg()]
    if done.returncode != 0:
        result["error"] = (done.stderr or done.stdout)[-3000:]
        log(f"{cache_type}: build failed: {result['error'][-400:]}")
        return result
    result["stages_run"] = RUNNING_STAGE.findall(done.stdout)
    model = work / "project" / "artifacts" / "models" / TEMPLATE
    result["model_bytes"] = _folder_bytes(model)
    result["model_files_linked"] = sum(
        1 for p in model.rglob("*") if p.is_symlink() or (p.is_file() and p.stat().st_nlink > 1)
    )
    result["model_files_read_only"] = sum(
        1 for p in model.rglob("*") if p.is_file() and not p.stat().st_mode & stat.S_IWUSR
    )
    # The stages must keep working over linked, protected outputs: edit one scale, rebuild, status clean.
    project.write_catalog(sources["catalog"](SCALES[1]))
    t0 = time.monotonic()
    edit = project.dvc("repro", f"merge@{TEMPLATE}", check=False, timeout=4 * 3600)
    result["edit_repro_s"] = round(time.monotonic() - t0, 1)
    if edit.returncode != 0:
        result["error"] = "rebuild after an edit failed: " + (edit.stderr or edit.stdout)[-3000:]
        return result
    result["edit_stages_run"] = RUNNING_STAGE.findall(edit.stdout)
    status = project.dvc("status", "--json", "--with-deps", f"merge@{TEMPLATE}", check=False)
    result["status_after_edit"] = status.stdout.strip()
    result["status_clean"] = status.returncode == 0 and json.loads(status.stdout or "{}") == {}
    return result


def run_benchmark(
    root: Path, quick: bool, cache_types: list[str], interval: float = 0.2, log=print
) -> dict[str, Any]:
    paths = synth_sdxl.ensure(root / ("quick-synth" if quick else "sdxl-synth"), quick, log=log)
    checkpoint_bytes = paths.single_file.stat().st_size
    summary: dict[str, Any] = {
        "benchmark": "b7_disk",
        "quick": quick,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code": code_version(),
        "checkpoint": str(paths.single_file),
        "checkpoint_bytes": checkpoint_bytes,
        "lora_bytes": paths.loras[LORA].stat().st_size,
        "interval_s": interval,
        "filesystem": _filesystem(root),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
        "results": {},
    }
    with SeaweedS3() as s3:
        bucket = s3.make_bucket(f"b7-{uuid.uuid4().hex[:12]}")
        client = s3.client()
        client.upload_file(str(paths.single_file), bucket, "checkpoints/synth.safetensors")
        client.upload_file(str(paths.loras[LORA]), bucket, "loras/style.safetensors")
        checkpoint_sha, lora_sha = _sha256(paths.single_file), _sha256(paths.loras[LORA])
        sources = {
            "catalog": lambda scale: catalog(
                f"s3://{bucket}/checkpoints/synth.safetensors",
                checkpoint_sha,
                f"s3://{bucket}/loras/style.safetensors",
                lora_sha,
                paths,
                scale,
            )
        }
        for cache_type in cache_types:
            work = root / f"b7-{cache_type}-{uuid.uuid4().hex[:8]}"
            try:
                log(f"{cache_type}: cold build of {TEMPLATE} ...")
                result = build_once(cache_type, work, sources, s3.env(), interval, log)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            if "model_bytes" in result:
                budget = checkpoint_bytes + result["model_bytes"]
                result["checkpoint_plus_model_bytes"] = budget
                result["peak_vs_checkpoint_plus_model"] = round(result["peak_bytes"] / budget, 3)
                result["target_met"] = result["peak_bytes"] <= TARGET_RATIO * budget and "error" not in result
            log(f"{cache_type}: {json.dumps({k: v for k, v in result.items() if k != 'status_after_edit'})}")
            summary["results"][cache_type] = result
    summary["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    measured = {t: r for t, r in summary["results"].items() if "peak_vs_checkpoint_plus_model" in r}
    summary["ratios"] = {
        "target": TARGET_RATIO,
        "peak_vs_checkpoint_plus_model": {t: r["peak_vs_checkpoint_plus_model"] for t, r in measured.items()},
        "target_met": {t: r["target_met"] for t, r in measured.items()},
        "failed": {t: r["error"][-300:] for t, r in summary["results"].items() if "error" in r},
    }
    return summary


def _filesystem(path: Path) -> str:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["df", "--output=fstype", str(path)], capture_output=True, text=True)
    lines = done.stdout.split()
    return lines[-1] if done.returncode == 0 and lines else "unknown"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.b7_disk", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the test kit's tiny model sizes")
    parser.add_argument(
        "--cache-types",
        default=",".join(CACHE_TYPES),
        help="comma-separated DVC cache.type values, one fresh build each (default %(default)s)",
    )
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="work folder (default %(default)s)")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between disk samples")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    cache_types = [t for t in args.cache_types.split(",") if t]
    unknown = set(cache_types) - set(CACHE_TYPES)
    if unknown:
        parser.error(f"--cache-types: unknown {sorted(unknown)}; choose from {','.join(CACHE_TYPES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    summary = run_benchmark(
        args.root, args.quick, cache_types, args.interval, log=lambda s: print(s, flush=True)
    )
    save_summary(summary, args.json_out)
    print(json.dumps(summary["ratios"], indent=2))
    return summary


if __name__ == "__main__":
    main()
