"""B3: storage of N templates on one checkpoint with UNet-only LoRAs: bytes in the DVC cache and on the remote
against base + N x UNet (target: within 2%).

`python -m benchmarks.b3_storage [--quick] [--templates N] [--no-push] [--root DIR] [--keep] [--json-out F]`

The build is the real one: a scratch DVC project (testkit.project: the repo's dvc.yaml,
params.yaml, stages/ and fuseline/) gets a catalog with one checkpoint, the synthetic SDXL single file
(benchmarks/synth_sdxl; the kit-size set with --quick), the synthetic base's VAE folder as the catalog VAE,
and N templates (default 5), each with one LoRA that touches only the UNet (the synthetic "style" LoRA with
its `lora_te1_`/`lora_te2_` keys removed) at a scale of its own, so every template's UNet differs. Then
`dvc repro merge@t1 ... merge@tN` (fetch, convert, vae and merge stages; not verify, whose outputs are a
small metrics file and a preview, and which at full size would run SDXL on the CPU), and `dvc push` to a
local DVC remote folder (the default remote). The cache uses hard links to the workspace (`cache.type
hardlink`), which changes where the workspace's bytes live, not what the cache holds.

Measured, never predicted:
  cache      bytes of every object under .dvc/cache/files/md5 (each stored once by content)
  remote     bytes of every object under <remote>/files/md5 after `dvc push` (skipped with --no-push, for
             full-size runs where a second copy of everything does not fit the disk); the remote's
             objects are compared with the cache's, object for object (md5 -> size): `remote_equals_cache`
             in the JSON, which the --quick test asserts
  base       the converted checkpoint folder (artifacts/base/<checkpoint>, the convert stage's output, what
             DVC stores for the checkpoint): the sum of its distinct file contents. The downloaded single
             file is not in DVC at all (its fetch stage records a small receipt, the bytes stay in the
             download cache), so it is reported for reference only.
  UNet       each template's exported unet/ folder (artifacts/models/<id>/unet), summed over the N templates
  expected   base + sum of the N UNets; ratio = cache / expected (and remote / expected); target: within
             2% (0.98 to 1.02).
Every cache object is attributed, from DVC's own folder listings (the `.dir` objects dvc.lock names), to
what references it: the base folder, the VAE stage's folder, one template's UNet, several templates'
shared files (text encoders, VAE, tokenizers, scheduler of the merged folders), one template's other
files (its manifest), receipts, other single-file outputs (artifacts/stats build records), or listings; so
any excess over the expected bytes is named.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from benchmarks import save_summary, synth_sdxl
from testkit.project import RUNNING_STAGE, DvcProject, make_dvc_project

DEFAULT_ROOT = Path("/tmp/fuseline-bench")
DEFAULT_TEMPLATES = 5
TARGET_TOLERANCE = 0.02
CHECKPOINT = "synth"
LORA = "style"
UNET_PREFIX = "lora_unet_"


def template_id(index: int) -> str:
    return f"t{index}"


def write_unet_only_lora(source: Path, target: Path) -> int:
    """`source` (kohya) without its text-encoder keys: a LoRA that changes only the UNet. Returns the
    number of keys kept."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as handle:
        keys = [k for k in handle.keys() if k.startswith(UNET_PREFIX)]  # noqa: SIM118 (not a dict)
        if not keys:
            raise RuntimeError(f"{source}: no {UNET_PREFIX}* keys; is it a kohya SDXL LoRA?")
        tensors = {k: handle.get_tensor(k) for k in keys}
        metadata = handle.metadata()
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target), metadata=metadata)
    return len(keys)


def bench_catalog(paths: synth_sdxl.SynthPaths, lora: Path, count: int) -> dict[str, Any]:
    """One checkpoint, the base's VAE, `count` templates each with the UNet-only LoRA at its own scale."""
    return {
        "version": 1,
        "vae": {"source": f"file:{paths.base_dir / 'vae'}"},
        "checkpoints": {
            CHECKPOINT: {
                "source": f"file:{paths.single_file}",
                "prediction": "epsilon",
                "config": f"file:{paths.config_dir}",
            }
        },
        "templates": {
            template_id(i): {
                "checkpoint": CHECKPOINT,
                "loras": [{"source": f"file:{lora}", "scale": round(0.2 * i, 2)}],
            }
            for i in range(1, count + 1)
        },
    }


def _objects(store: Path) -> dict[str, int]:
    """md5 (with `.dir` for listings) -> bytes, for every object of a DVC cache or local remote."""
    root = store / "files" / "md5"
    return {p.parent.name + p.name: p.stat().st_size for p in root.glob("*/*") if p.is_file()}


def compare_stores(cache: dict[str, int], remote: dict[str, int]) -> dict[str, Any]:
    """Whether the remote holds exactly the cache's objects, each with the cache's size; the md5s that
    differ (at most 10 of each kind) when it does not."""
    missing = sorted(set(cache) - set(remote))
    extra = sorted(set(remote) - set(cache))
    size_differs = sorted(m for m in set(cache) & set(remote) if cache[m] != remote[m])
    return {
        "remote_equals_cache": not (missing or extra or size_differs),
        "remote_missing": missing[:10],
        "remote_extra": extra[:10],
        "remote_size_differs": size_differs[:10],
    }


def _listing(cache: dict[str, int], project: Path, dir_md5: str) -> list[dict[str, str]]:
    if dir_md5 not in cache:
        raise RuntimeError(f"{project}: dvc.lock names {dir_md5}, which is not in the cache")
    path = project / ".dvc" / "cache" / "files" / "md5" / dir_md5[:2] / dir_md5[2:]
    return json.loads(path.read_text())


def attribute(project: Path, templates: list[str]) -> dict[str, Any]:
    """Which outputs reference each cache object, from dvc.lock and DVC's folder listings."""
    cache = _objects(project / ".dvc" / "cache")
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    refs: dict[str, set[str]] = defaultdict(set)  # md5 -> labels of what references it
    unet_bytes: dict[str, int] = {}
    base_bytes = 0
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            path, md5 = out["path"], out["md5"]
            if not md5.endswith(".dir"):
                refs[md5].add("receipt" if path.startswith("artifacts/sources/") else f"file:{path}")
                continue
            refs[md5].add("listing")
            entries = _listing(cache, project, md5)
            if path == f"artifacts/base/{CHECKPOINT}":
                labels = {e["md5"]: "base" for e in entries}
                base_bytes = sum(cache[m] for m in set(labels))
            elif path == "artifacts/vae":
                labels = {e["md5"]: "vae-stage" for e in entries}
            elif path.startswith("artifacts/models/"):
                template = path.rsplit("/", 1)[-1]
                labels = {}
                for e in entries:
                    part = "unet" if e["relpath"].startswith("unet/") else "other"
                    labels[e["md5"]] = f"{template}:{part}"
                unet_bytes[template] = sum(
                    cache[m] for m in {e["md5"] for e in entries if e["relpath"].startswith("unet/")}
                )
            else:
                labels = {e["md5"]: f"file:{path}" for e in entries}
            for md5_, label in labels.items():
                refs[md5_].add(label)
    categories: dict[str, int] = defaultdict(int)
    for md5, size in cache.items():
        labels = refs.get(md5, set())
        tpl = {lab.split(":")[0] for lab in labels if lab.split(":")[0] in templates}
        if md5.endswith(".dir"):
            category = "listings (.dir)"
        elif "base" in labels:
            # An object the base folder holds: stored once, whoever else links it (reported below).
            category = "base" + (" (also in templates)" if tpl else "")
        elif any(lab.endswith(":unet") for lab in labels):
            category = "template UNets" if len(tpl) == 1 else "UNet shared by several templates"
        elif len(tpl) > 1:
            category = f"shared by {len(tpl)} templates (text encoders, VAE, configs)"
        elif len(tpl) == 1:
            category = "one template's other files (manifest)"
        elif "vae-stage" in labels:
            category = "vae stage output"
        elif "receipt" in labels:
            category = "receipts"
        elif any(lab.startswith("file:") for lab in labels):
            category = "other single-file outputs (build stats)"
        else:
            category = "unreferenced (not named by dvc.lock)"
        categories[category] += size
    return {
        "cache_bytes": sum(cache.values()),
        "cache_objects": len(cache),
        "base_bytes": base_bytes,
        "unet_bytes": dict(sorted(unet_bytes.items())),
        "by_category": dict(sorted(categories.items(), key=lambda kv: -kv[1])),
    }


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run_benchmark(
    root: Path, quick: bool, count: int, keep: bool = False, push: bool = True, log=print
) -> dict[str, Any]:
    if count < 2:
        raise SystemExit("--templates must be at least 2: sharing between templates is what B3 measures")
    paths = synth_sdxl.ensure(root / ("quick-synth" if quick else "sdxl-synth"), quick, log=log)
    work = root / f"b3-work-{uuid.uuid4().hex[:8]}"
    summary: dict[str, Any] = {
        "benchmark": "b3_storage",
        "quick": quick,
        "templates": count,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": str(paths.single_file),
        "single_file_bytes": paths.single_file.stat().st_size,
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        lora = work / "loras" / f"{LORA}-unet-only.safetensors"
        summary["lora_keys"] = write_unet_only_lora(paths.loras[LORA], lora)
        summary["lora_bytes"] = lora.stat().st_size
        project: DvcProject = make_dvc_project(work / "project", bench_catalog(paths, lora, count))
        project.dvc("config", "cache.type", "hardlink")
        remote = work / "remote"
        project.dvc("remote", "add", "-d", "local", str(remote))
        templates = [template_id(i) for i in range(1, count + 1)]
        t0 = time.monotonic()
        # A full-size build takes longer than DvcProject.repro's default timeout on a shared 2-core box.
        done = project.dvc("repro", *(f"merge@{t}" for t in templates), timeout=4 * 3600)
        ran = RUNNING_STAGE.findall(done.stdout)
        summary["repro_s"] = round(time.monotonic() - t0, 1)
        summary["stages_run"] = ran
        log(f"built {count} templates in {summary['repro_s']} s: {', '.join(ran)}")
        measured = attribute(project.root, templates)
        measured["remote_bytes"] = measured["remote_objects"] = measured["remote_equals_cache"] = None
        if push:
            t0 = time.monotonic()
            project.dvc("push", timeout=3600)
            summary["push_s"] = round(time.monotonic() - t0, 1)
            remote_objects = _objects(remote)
            measured["remote_bytes"] = sum(remote_objects.values())
            measured["remote_objects"] = len(remote_objects)
            # Object for object (md5 -> size), not only the totals: equal sums could hide a missing object
            # balanced by an extra one.
            measured.update(compare_stores(_objects(project.root / ".dvc" / "cache"), remote_objects))
        measured["vae_stage_bytes"] = _folder_bytes(project.root / "artifacts" / "vae")
        models = project.root / "artifacts" / "models"
        measured["template_folder_bytes"] = {t: _folder_bytes(models / t) for t in templates}
        summary["measured"] = measured
    finally:
        summary["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        if keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    expected = measured["base_bytes"] + sum(measured["unet_bytes"].values())
    no_dedup = measured["base_bytes"] + sum(measured["template_folder_bytes"].values())
    cache_ratio = measured["cache_bytes"] / expected
    remote_ratio = measured["remote_bytes"] / expected if push else None
    summary["ratios"] = {
        "expected_bytes": expected,
        "expected_is": f"base (converted folder artifacts/base/{CHECKPOINT}) + {count} x template unet/",
        "cache_vs_expected": round(cache_ratio, 4),
        "remote_vs_expected": round(remote_ratio, 4) if remote_ratio is not None else None,
        "excess_cache_bytes": measured["cache_bytes"] - expected,
        "target": f"within {TARGET_TOLERANCE:.0%}",
        "target_met": all(
            abs(r - 1) <= TARGET_TOLERANCE for r in (cache_ratio, remote_ratio) if r is not None
        ),
        # Without sharing: every template folder stored whole, plus the base.
        "no_dedup_vs_cache": round(no_dedup / measured["cache_bytes"], 3),
    }
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.b3_storage", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="the test kit's tiny model sizes")
    parser.add_argument("--templates", type=int, default=DEFAULT_TEMPLATES, help="default %(default)s")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="work folder (default %(default)s)")
    parser.add_argument("--no-push", action="store_true", help="measure the cache only (no remote copy)")
    parser.add_argument("--keep", action="store_true", help="keep the DVC project and remote afterwards")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    summary = run_benchmark(
        args.root,
        args.quick,
        args.templates,
        args.keep,
        push=not args.no_push,
        log=lambda line: print(line, flush=True),
    )
    save_summary(summary, args.json_out)
    print(json.dumps({"measured": summary["measured"], "ratios": summary["ratios"]}, indent=2))
    return summary


if __name__ == "__main__":
    main()
