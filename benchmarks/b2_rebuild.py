"""B2: a no-op `dvc repro` of a many-template catalog against DVC's own floor, and a one-template edit.

`python -m benchmarks.b2_rebuild [--quick] [--templates N] [--repeats R] [--root DIR] [--json-out F]
                                 [--reuse] [--profile]`

A scratch DVC project (testkit.project: the repo's dvc.yaml, params.yaml, stages/ and fuseline/)
gets a catalog of N templates (default 50, --quick 3) on the test kit's tiny checkpoint, each with one
kit LoRA at its own scale, and is built once, fully, by the real `dvc repro` (kept under --root, so a
second run only re-checks it). Then:

  no-op     `dvc repro` on the built project (nothing may run), against the same command on the FLOOR:
            a second DVC project with the same stages, the same dependency graph and the same number of
            deps and outs per stage, read from the built project's dvc.lock, where every dep and out is a
            small single file, every stage is written out explicitly (no vars, no foreach, no params) and
            its command is a `cat`. That is the least work DVC itself does to find a graph of that shape
            up to date. Runs alternate (ours, floor, ours, floor, ...) after one untimed warm-up of each;
            medians are compared; target ours / floor <= 1.2.
  edit      one template's LoRA scale changes in templates.json (to a value not used before, so DVC's
            run-cache cannot skip the run), `dvc repro`; the stages that re-ran are taken from DVC's
            "Running stage" lines and, independently, from the dvc.lock entries that changed. Both must
            be exactly that template's stages: fetch-loras@<id>, merge@<id>, verify@<id>.

Wall times are measured around the `dvc` subprocess (what a user or CI waits for). The JSON summary holds
every run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from benchmarks import code_version, save_summary
from testkit.project import COPIED, RUNNING_STAGE, DvcProject, dvc_env, make_dvc_project

DEFAULT_ROOT = Path("/tmp/fuseline-bench")
TARGET_RATIO = 1.2
FULL_TEMPLATES = 50
QUICK_TEMPLATES = 3
CHECKPOINT = "tiny-sdxl"
# Kit LoRAs that fuse into the kit checkpoint (UNet only, UNet conv/LoCon, text encoders), used in turn.
LORAS = ("kohya_sgm", "locon", "kohya_te")
# The tiny models' native size; a few steps prove an export samples (verify's job), nothing more.
PARAMS = {"verify": {"steps": 2, "width": 64, "height": 64}}
# DVC prints this for a stage whose result it restores from the run-cache instead of running it.
CACHED_STAGE = re.compile(r"^Stage '([^']+)' is cached - skipping run", re.MULTILINE)


def template_id(index: int) -> str:
    return f"t{index:02d}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bench_catalog(kit: Any, count: int) -> dict[str, Any]:
    """templates.json with `count` templates on the kit checkpoint; file sources pinned by sha256 (as the
    demo does), each template with one LoRA and a scale of its own."""
    lora_sha = {name: _sha256(kit.loras[name]) for name in LORAS}
    return {
        "version": 1,
        "vae": {"source": f"file:{kit.vae_dir}"},
        "checkpoints": {
            CHECKPOINT: {
                "source": f"file:{kit.single_file}",
                "sha256": _sha256(kit.single_file),
                "prediction": "epsilon",
                "config": f"file:{kit.config_dir}",
            }
        },
        "templates": {
            template_id(i): {
                "checkpoint": CHECKPOINT,
                "loras": [
                    {
                        "source": f"file:{kit.loras[LORAS[i % len(LORAS)]]}",
                        "sha256": lora_sha[LORAS[i % len(LORAS)]],
                        "scale": round(0.3 + 0.01 * i, 2),
                    }
                ],
            }
            for i in range(count)
        },
    }


def template_stages(template: str) -> list[str]:
    """The stages dvc.yaml has per template (everything else is per checkpoint or global)."""
    return [f"fetch-loras@{template}", f"merge@{template}", f"verify@{template}"]


# ---- the floor project ------------------------------------------------------------------------------


def lock_shape(lock: dict[str, Any]) -> dict[str, dict[str, list[str]]]:
    """{stage: {"deps": [paths], "outs": [paths]}} from a dvc.lock (params left out: the floor has none)."""
    return {
        name: {
            "deps": [d["path"] for d in entry.get("deps", [])],
            "outs": [o["path"] for o in entry.get("outs", [])],
        }
        for name, entry in lock["stages"].items()
    }


def write_floor(root: Path, shape: dict[str, dict[str, list[str]]]) -> DvcProject:
    """A DVC project whose graph has `shape`'s stages, edges and per-stage dep/out counts, with every path a
    small file: an output of ours maps to an output of the floor, any other dep to a source file."""
    produced = {out: name for name, stage in shape.items() for out in stage["outs"]}
    names: dict[str, str] = {}

    def floor_path(path: str) -> str:
        if path not in names:
            kind = "out" if path in produced else "src"
            names[path] = f"{kind}/{len(names):04d}.txt"
        return names[path]

    stages: dict[str, Any] = {}
    for index, (name, stage) in enumerate(shape.items()):
        deps = [floor_path(p) for p in stage["deps"]]
        outs = [floor_path(p) for p in stage["outs"]]
        cmd = " && ".join(f"cat {' '.join(deps)} > {out}" for out in outs)
        stages[f"s{index:03d}-{name.replace('@', '-')}"] = {"cmd": cmd, "deps": deps, "outs": outs}
    root.mkdir(parents=True, exist_ok=True)
    (root / "src").mkdir(exist_ok=True)
    (root / "out").mkdir(exist_ok=True)
    for path in names.values():
        if path.startswith("src/"):
            (root / path).write_text(f"{path}\n")
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    project = DvcProject(root)
    if not (root / ".dvc").is_dir():
        project.dvc("init", "--no-scm", "-q")
        project.dvc("config", "core.analytics", "false")
    return project


# ---- measuring --------------------------------------------------------------------------------------


def timed_repro(project: DvcProject) -> dict[str, Any]:
    """Wall time, and the CPU time (user + sys) of `dvc` and its children: the work done, which other
    processes on the cores move far less than the wall time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    proc = project.dvc("repro")
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return {
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "ran": RUNNING_STAGE.findall(proc.stdout),
        "restored_from_run_cache": CACHED_STAGE.findall(proc.stdout),
    }


def profile_noop(project: DvcProject, dump: Path, top: int = 60) -> list[dict[str, Any]]:
    """One no-op `dvc repro` under DVC's own cProfile hook: its largest cumulative entries."""
    import pstats

    project.dvc("repro", "--cprofile-dump", str(dump))
    stats = pstats.Stats(str(dump)).stats  # type: ignore[attr-defined]
    rows = sorted(
        (
            (cumulative, calls, f"{path.split('site-packages/')[-1]}:{line}({function})")
            for (path, line, function), (_cc, calls, _tt, cumulative, _callers) in stats.items()
        ),
        reverse=True,
    )
    # Import machinery frames repeat the module-loading time under many names; one line says it.
    kept = [row for row in rows if not row[2].startswith(("<frozen", "~"))]
    return [{"s": round(s, 3), "calls": n, "where": where} for s, n, where in kept[:top]]


def changed_lock_entries(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    old, new = before["stages"], after["stages"]
    return sorted(name for name in set(old) | set(new) if old.get(name) != new.get(name))


def count_files(root: Path, paths: list[str]) -> int:
    total = 0
    for rel in paths:
        path = root / rel
        total += sum(1 for p in path.rglob("*") if p.is_file()) if path.is_dir() else 1
    return total


def run_benchmark(
    root: Path,
    quick: bool,
    templates: int | None = None,
    repeats: int = 5,
    kit_dir: Path | None = None,
    profile: bool = False,
    reuse: bool = False,
    log=print,
) -> dict[str, Any]:
    from testkit.models import build_kit

    count = templates or (QUICK_TEMPLATES if quick else FULL_TEMPLATES)
    kit_dir = kit_dir or Path(os.environ.get("FUSELINE_KIT_DIR") or root / "kit")
    kit = build_kit(kit_dir)
    work = root / f"b2-{count}"
    summary: dict[str, Any] = {
        "benchmark": "b2_rebuild",
        "quick": quick,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "templates": count,
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        # What the scratch project copies from the repo (checked before the copy).
        "code": code_version(COPIED),
    }

    # Build once, fully (a kept project re-checks in one no-op pass; a half-built one finishes).
    env = dvc_env({"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    catalog = bench_catalog(kit, count)
    if reuse and (work / "project" / "dvc.lock").is_file():
        # The built project as it is: its pipeline files stay those it was built with (a refresh from a
        # repo whose stages changed since would rebuild everything); only the catalog is reset.
        ours = DvcProject(work / "project")
        ours.write_catalog(catalog)
        summary["code"] = {"reused_project": str(ours.root)}
    else:
        ours = make_dvc_project(work / "project", catalog, PARAMS)
    ours.env = env
    started = time.monotonic()
    built = ours.dvc("repro", timeout=4 * 3600)
    summary["build"] = {
        "wall_s": round(time.monotonic() - started, 1),
        "stages_run": len(RUNNING_STAGE.findall(built.stdout)),
        "stages_restored_from_run_cache": len(CACHED_STAGE.findall(built.stdout)),
    }
    log(f"build of {count} templates: {summary['build']}")
    status = ours.status()
    if status:
        raise RuntimeError(f"{ours.root}: `dvc status` after a full repro still lists {sorted(status)}")

    shape = lock_shape(ours.lock())
    floor = write_floor(work / "floor", shape)
    floor.env = env
    floor_build = floor.dvc("repro", timeout=4 * 3600)
    summary["graph"] = {
        "stages": len(shape),
        "deps": sum(len(s["deps"]) for s in shape.values()),
        "outs": sum(len(s["outs"]) for s in shape.values()),
        "params_per_stage_ours": {
            name: sum(len(p) for p in entry.get("params", {}).values())
            for name, entry in ours.lock()["stages"].items()
            if name in ("fetch-vae", "vae", template_stages(template_id(0))[1])
        },
        "files_under_deps_ours": count_files(ours.root, [d for s in shape.values() for d in s["deps"]]),
        "files_under_outs_ours": count_files(ours.root, [o for s in shape.values() for o in s["outs"]]),
        "floor_stages_built": len(RUNNING_STAGE.findall(floor_build.stdout)),
    }
    floor_shape = lock_shape(floor.lock())
    if sorted((len(s["deps"]), len(s["outs"])) for s in floor_shape.values()) != sorted(
        (len(s["deps"]), len(s["outs"])) for s in shape.values()
    ):
        raise RuntimeError(f"{floor.root}: the floor's stages do not mirror {ours.root}/dvc.lock")
    log(f"graph: {summary['graph']}")

    # No-op: one untimed warm-up each (DVC's state database, the page cache), then alternate.
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "floor": []}
    timed_repro(ours)
    timed_repro(floor)
    for _ in range(repeats):
        for name, project in (("ours", ours), ("floor", floor)):
            result = timed_repro(project)
            runs[name].append(result)
            log(f"no-op {name}: {result['wall_s']} s wall, {result['cpu_s']} s CPU, ran {result['ran']}")
    medians = {name: statistics.median(r["wall_s"] for r in results) for name, results in runs.items()}
    medians_cpu = {name: statistics.median(r["cpu_s"] for r in results) for name, results in runs.items()}
    ratio = medians["ours"] / medians["floor"]
    ratio_cpu = medians_cpu["ours"] / medians_cpu["floor"]
    summary["noop"] = {
        "runs": runs,
        "median_s": medians,
        "median_cpu_s": medians_cpu,
        "nothing_ran": all(
            not r["ran"] and not r["restored_from_run_cache"] for rs in runs.values() for r in rs
        ),
    }

    if profile:
        summary["noop"]["profile"] = {
            name: profile_noop(project, work / f"noop-{name}.prof")
            for name, project in (("ours", ours), ("floor", floor))
        }

    # Edit one template in the middle of the catalog; a scale never used before defeats the run-cache.
    edited = template_id(count // 2)
    new_scale = round(0.05 + int(uuid.uuid4().hex[:6], 16) % 900 / 1000, 3)
    lock_before = ours.lock()
    ours.edit_catalog(lambda c: c["templates"][edited]["loras"][0].update(scale=new_scale))
    edit_run = timed_repro(ours)
    changed = changed_lock_entries(lock_before, ours.lock())
    expected = sorted(template_stages(edited))
    summary["edit"] = {
        "template": edited,
        "new_scale": new_scale,
        "wall_s": edit_run["wall_s"],
        "stages_ran": sorted(edit_run["ran"]),
        "stages_restored_from_run_cache": sorted(edit_run["restored_from_run_cache"]),
        "lock_entries_changed": changed,
        "expected": expected,
        "count": len(edit_run["ran"]),
        "exactly_that_template": sorted(edit_run["ran"]) == expected and changed == expected,
    }
    log(f"edit {edited}: ran {summary['edit']['stages_ran']}; dvc.lock changed for {changed}")
    summary["loadavg_end"] = os.getloadavg()
    summary["ratios"] = {
        "noop_ours_vs_floor": round(ratio, 3),
        "target": TARGET_RATIO,
        "target_met": ratio <= TARGET_RATIO,
        "noop_ours_vs_floor_cpu": round(ratio_cpu, 3),
        "target_met_cpu": ratio_cpu <= TARGET_RATIO,
        "noop_overhead_s": round(medians["ours"] - medians["floor"], 3),
        "edit_reran_exactly_one_template": summary["edit"]["exactly_that_template"],
    }
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.b2_rebuild", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_TEMPLATES} templates, fewer repeats")
    parser.add_argument("--templates", type=int, help=f"catalog size (default {FULL_TEMPLATES})")
    parser.add_argument("--repeats", type=int, help="timed no-op runs per project (default 5, --quick 2)")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="work folder (default %(default)s)")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--profile", action="store_true", help="then one no-op repro of each under cProfile")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="measure the project already built under --root without refreshing its pipeline from the repo",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    repeats = args.repeats or (2 if args.quick else 5)
    summary = run_benchmark(
        args.root,
        args.quick,
        args.templates,
        repeats,
        profile=args.profile,
        reuse=args.reuse,
        log=lambda line: print(line, flush=True),
    )
    save_summary(summary, args.json_out)
    print(json.dumps(summary["ratios"], indent=2))
    return summary


if __name__ == "__main__":
    main()
