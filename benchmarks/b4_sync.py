"""B4: cold sync of one model folder from SeaweedFS on 127.0.0.1: fuseline's worker sync against s5cmd.

`python -m benchmarks.b4_sync [--quick] [--root DIR] [--repeats N] [--baseline-sync FILE] [--link-mbit N]
[--json-out F]`

The model folder (the synthetic SDXL base folder, or the kit-size one with --quick) goes onto a DVC remote
the real way: `dvc init --no-scm`, `dvc add`, an S3 remote on a fresh SeaweedFS bucket, `dvc push`; then a
release manifest (`releases/b4.json`) is written next to the objects, as publishing does. Each contender
then runs in a fresh subprocess into a fresh, empty folder, against the same warm server:

  fuseline  `worker.sync.templates.sync_templates(release, volume, [template])`: ranged GETs into the
            volume's store
  s5cmd     `s5cmd cp 's3://<bucket>/files/md5/*' <dir>/`: the same objects (the bucket holds nothing else
            under files/md5/), default concurrency

Wall time is the subprocess's, measured from outside (what an operator waits for), so fuseline pays its
Python start-up and imports; fuseline's own in-process time is reported as well, and each contender's CPU
time (user + sys, from rusage), which is less noisy than the wall time on a shared machine but not
independent of the load (s5cmd's system time went from 5.3 to 12.5 s across three runs of one command,
docs/benchmark-runs/b4-sync-2026-11-28-before-after.json). The ratio is
s5cmd wall / fuseline wall (target >= 0.9). Bytes are those the contender left on disk: fuseline's object
store, s5cmd's destination; both must hold the same objects.

With `--baseline-sync FILE` (another version of worker/sync/templates.py, e.g.
`git show REV:worker/sync/templates.py > F`; its imports resolve against this tree), a third contender,
"fuseline-baseline", runs that file's `sync_templates` the same way, in the same rotation:
a before/after comparison under the same load.

The floor when every byte must be verified (issue #19) is max(s5cmd's download, md5 of the same bytes
over all cores): after each s5cmd run, a fresh subprocess hashes what s5cmd left with one thread per core
(largest files first; hashlib releases the GIL), timed on its own ("md5"). The run reports fuseline's wall
against that floor (target <= 1.1x) and against s5cmd followed by that md5 pass ("verify afterwards", what
a checking s5cmd-based sync would do). Because the server shares the machine, every contender's CPU time is
reported with SeaweedFS's own CPU time over the same interval (/proc of the server's process tree): their
sum divided by the cores is the least wall time the work can take here, which says whether the cores, not
the code, set a result.

`--link-mbit N` runs the whole benchmark in a network namespace of its own (`unshare --net`; root or user
namespaces needed) whose loopback is limited to N Mbit/s by `tc qdisc ... tbf` once the push is done: a
link slower than the disk and md5, as between a RunPod worker and S3, where hashing is not the bottleneck
and fuseline should come within 0.9x of s5cmd.

Then the warm check: a second release (`releases/b4-ten.json`) names ten templates, all the same folder
(a warm check reads the release and each template's marker, never the model bytes, so ten copies of the
6.9 GB are not needed to time it). One fuseline sync fills a fresh volume with all ten (one fetch, ten
version folders linked from one store); then `sync_templates(release, volume)` for all ten runs again in
fresh subprocesses, each template must be "present" (trusted by its marker), and the wall and in-process
times are reported (the issue's "warm start of ten templates" figure).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks import code_version, save_summary, synth_sdxl
from fuseline.core.release import Release, ReleasedTemplate, release_key
from testkit.servers import SeaweedS3

DEFAULT_ROOT = Path("/tmp/fuseline-bench")
TEMPLATE = "sdxl-synth"
CHANNEL = "b4"
TARGET_RATIO = 0.9
TARGET_VS_FLOOR = 1.1
NETNS_ENV = "FUSELINE_B4_NETNS"
BIN = Path(sys.executable).parent
CONTENDERS = ("fuseline", "s5cmd")
WARM_CHANNEL = "b4-ten"
WARM_TEMPLATES = 10

# Run in the fuseline subprocess: the sync call alone is timed inside, the report printed as JSON.
_FUSELINE_CHILD = """
import json, sys, time
from worker.sync.templates import sync_templates
t0 = time.monotonic()
report = sync_templates(sys.argv[1], sys.argv[2], sys.argv[3:] or None)
seconds = time.monotonic() - t0
print(json.dumps({"ok": report.ok, "seconds": seconds, "lines": report.lines(),
                  "statuses": [t.status for t in report.templates],
                  "bytes_fetched": sum(t.bytes_fetched for t in report.templates),
                  "objects_fetched": sum(t.objects_fetched for t in report.templates)}))
"""


BASELINE = "fuseline-baseline"

# The hash half of the floor: md5 of every file under a folder, one thread per core, largest first.
_MD5_CHILD = """
import hashlib, json, os, sys, time
from concurrent.futures import ThreadPoolExecutor
root = sys.argv[1]
files = [os.path.join(d, f) for d, _, names in os.walk(root) for f in names]
files.sort(key=os.path.getsize, reverse=True)
threads = len(os.sched_getaffinity(0))
def md5(path):
    digest, block = hashlib.md5(), bytearray(8 << 20)
    view = memoryview(block)
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(block):
            digest.update(view[:n])
    return digest.hexdigest()
t0 = time.monotonic()
with ThreadPoolExecutor(threads) as pool:
    digests = list(pool.map(md5, files))
seconds = time.monotonic() - t0
# md5's own speed on these cores, from memory (no disk, no page cache): one 256 MiB buffer per thread.
sample = bytes(256 << 20)
t1 = time.monotonic()
with ThreadPoolExecutor(threads) as pool:
    list(pool.map(lambda _: hashlib.md5(sample).hexdigest(), range(threads)))
memory_rate = threads * len(sample) / (time.monotonic() - t1)
# DVC's object paths are the md5 (<2 hex>/<30 hex>[.dir]): every digest is checked, as a sync must.
named = ["".join(p.split(os.sep)[-2:]).split(".")[0] for p in files]
bad = sum(1 for n, d in zip(named, digests) if n != d)
total = sum(os.path.getsize(p) for p in files)
print(json.dumps({"seconds": seconds, "files": len(files), "bytes": total, "threads": threads,
                  "mismatches": bad, "memory_bytes_per_s": memory_rate}))
"""


def _tree_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process and every live descendant (the S3 server's tree)."""
    if pid is None:
        return 0.0
    total, stack, tick = 0.0, [pid], os.sysconf("SC_CLK_TCK")
    while stack:
        current = stack.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{current}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError, IndexError):
            continue
    return total


def _child_code(baseline: Path | None) -> str:
    """The fuseline child; with `baseline`, its sync_templates comes from that file instead of this tree."""
    if baseline is None:
        return _FUSELINE_CHILD
    load = (
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('sync_baseline', {str(baseline)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules['sync_baseline'] = module  # dataclasses look their module up there\n"
        "spec.loader.exec_module(module)\n"
        "sync_templates = module.sync_templates"
    )
    return _FUSELINE_CHILD.replace("from worker.sync.templates import sync_templates", load)


def _tree_bytes(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]
    return sum(p.stat().st_size for p in files), len(files)


def _dvc(project: Path, env: dict[str, str], *args: str) -> None:
    done = subprocess.run(
        [str(BIN / "dvc"), *args], cwd=project, env=env, capture_output=True, text=True, timeout=3600
    )
    if done.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} in {project} failed:\n{done.stdout}\n{done.stderr}")


def publish(s3: SeaweedS3, model: Path, work: Path, env: dict[str, str]) -> tuple[str, str, ReleasedTemplate]:
    """`model` onto a fresh bucket by dvc, and a release naming it TEMPLATE.
    Returns (bucket, release location, the released folder)."""
    project = work / "project"
    project.mkdir(parents=True)
    # Hard links: the project's copy costs nothing; dvc writes its cache by copying, never in place.
    shutil.copytree(model, project / TEMPLATE, copy_function=os.link)
    bucket = s3.make_bucket(f"b4-{uuid.uuid4().hex[:12]}")
    _dvc(project, env, "init", "--no-scm", "-q")
    with (project / ".dvc" / "config").open("a") as config:
        config.write(f"['remote \"s3\"']\n    url = s3://{bucket}\n    endpointurl = {s3.endpoint_url}\n")
    _dvc(project, env, "add", "-q", TEMPLATE)
    _dvc(project, env, "push", "-q", "-r", "s3")
    # The .dvc file is YAML; the fields needed are plain `key: value` lines (as publishing reads them).
    text = (project / f"{TEMPLATE}.dvc").read_text()
    fields = dict(line.strip("- ").split(": ", 1) for line in text.splitlines() if ": " in line)
    released = ReleasedTemplate(
        dir_md5=fields["md5"],
        path=TEMPLATE,
        size=int(fields["size"]),
        nfiles=int(fields["nfiles"]),
        spec_hash="0" * 64,  # the synthetic folder has no fuseline.json; sync does not read it
        checkpoint="file:sdxl-synth",
    )
    release = Release(
        channel=CHANNEL, created=time.strftime("%Y%m%dT%H%M%SZ"), templates={TEMPLATE: released}
    )
    s3.client().put_object(Bucket=bucket, Key=release_key(CHANNEL), Body=release.to_json().encode())
    shutil.rmtree(project)  # the dvc cache is a full copy; the bucket holds everything from here on
    return bucket, f"s3://{bucket}/{release_key(CHANNEL)}", released


def _fuseline_child(release: str, dest: Path, env: dict[str, str], templates: list[str]) -> dict:
    """Run the sync in a fresh interpreter; its report plus the wall time seen from outside."""
    cmd = [sys.executable, "-c", _FUSELINE_CHILD, release, str(dest), *templates]
    started = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"fuseline sync of {release} into {dest} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"wall_s": round(wall, 3)}


def warm_check(
    s3: SeaweedS3, bucket: str, released: ReleasedTemplate, dest: Path, env: dict[str, str], repeats: int
) -> dict:
    """Ten templates (one folder) synced once into `dest`, then the warm check of all ten, `repeats`
    times, each in a fresh subprocess. Every template must come back "present" (trusted by its marker)."""
    templates = {f"{TEMPLATE}-{i}": released for i in range(WARM_TEMPLATES)}
    release = Release(channel=WARM_CHANNEL, created=time.strftime("%Y%m%dT%H%M%SZ"), templates=templates)
    s3.client().put_object(Bucket=bucket, Key=release_key(WARM_CHANNEL), Body=release.to_json().encode())
    location = f"s3://{bucket}/{release_key(WARM_CHANNEL)}"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    try:
        fill = _fuseline_child(location, dest, env, [])
        if not fill["ok"] or sorted(fill["statuses"]) != ["synced"] * WARM_TEMPLATES:
            raise RuntimeError(f"filling the volume with {WARM_TEMPLATES} templates failed: {fill['lines']}")
        checks = []
        for _ in range(repeats):
            check = _fuseline_child(location, dest, env, [])
            if not check["ok"] or check["statuses"] != ["present"] * WARM_TEMPLATES:
                raise RuntimeError(f"warm check did not find all {WARM_TEMPLATES} present: {check['lines']}")
            checks.append({"wall_s": check["wall_s"], "sync_s": round(check["seconds"], 4)})
    finally:
        shutil.rmtree(dest, ignore_errors=True)
    return {
        "templates": WARM_TEMPLATES,
        "fill_wall_s": fill["wall_s"],
        "fill_bytes_fetched": fill["bytes_fetched"],
        "checks": checks,
        "best_wall_s": min(c["wall_s"] for c in checks),
        "best_sync_s": min(c["sync_s"] for c in checks),
    }


def run_one(
    contender: str,
    s3: SeaweedS3,
    bucket: str,
    release: str,
    dest: Path,
    env: dict[str, str],
    baseline: Path | None = None,
) -> dict:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    fuseline = contender in ("fuseline", BASELINE)
    if fuseline:
        code = _child_code(baseline if contender == BASELINE else None)
        cmd = [sys.executable, "-c", code, release, str(dest), TEMPLATE]
    else:
        cmd = [
            str(BIN / "s5cmd"),
            "--endpoint-url",
            s3.endpoint_url,
            "cp",
            f"s3://{bucket}/files/md5/*",
            f"{dest}/",
        ]
    # CPU time of the child (user + sys), from the children's rusage: less noisy than the wall time when
    # other processes share the cores (not independent of them: sys time grows under contention).
    load = os.getloadavg()[0]
    server_before = _tree_cpu_s(s3.pid)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_cpu = _tree_cpu_s(s3.pid) - server_before
    # fuseline's store (worker.volume: <volume>/.fuseline/objects) holds the objects, as s5cmd's folder does.
    store = dest / ".fuseline" / "objects" if fuseline else dest
    size, nfiles = _tree_bytes(store)
    result: dict[str, Any] = {
        "returncode": done.returncode,
        "wall_s": round(wall, 3),
        "bytes": size,
        "objects": nfiles,
        "mb_per_s": round(size / 1e6 / wall, 1),
        "cpu_user_s": round(after.ru_utime - before.ru_utime, 2),
        "cpu_sys_s": round(after.ru_stime - before.ru_stime, 2),
        "server_cpu_s": round(server_cpu, 2),
        "loadavg_1m_before": round(load, 2),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    # The least wall time this work can take on these cores: client and server CPU time over the cores.
    needed = result["cpu_user_s"] + result["cpu_sys_s"] + server_cpu
    result["cpu_bound_wall_s"] = round(needed / len(os.sched_getaffinity(0)), 2)
    if fuseline and done.returncode == 0:
        child = json.loads(done.stdout.strip().splitlines()[-1])
        result |= {"sync_s": round(child["seconds"], 3), "ok": child["ok"], "report": child["lines"]}
        result["bytes_fetched"] = child["bytes_fetched"]
        if not child["ok"]:
            result["returncode"] = 2
    if result["returncode"] != 0:
        result["error"] = (done.stderr or done.stdout)[-2000:]
    elif not fuseline:
        result["md5"] = _md5_all_cores(dest, env)
    shutil.rmtree(dest, ignore_errors=True)
    return result


def _md5_all_cores(folder: Path, env: dict[str, str]) -> dict[str, Any]:
    """md5 of every file under `folder` over all cores, in a fresh subprocess: the floor's hash half."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _MD5_CHILD, str(folder)], env=env, capture_output=True, text=True, timeout=3600
    )
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        return {"returncode": done.returncode, "error": done.stderr[-2000:]}
    child = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "returncode": 0,
        "wall_s": round(wall, 3),
        "hash_s": round(child["seconds"], 3),
        "files": child["files"],
        "threads": child["threads"],
        "mismatches": child["mismatches"],
        # The pass above reads the files back (from disk where the page cache lost them); this is md5's
        # CPU floor for the same bytes on all cores, from memory: what a sync hashing as bytes land pays.
        "memory_rate_mb_per_s": round(child["memory_bytes_per_s"] / 1e6, 1),
        "cpu_floor_s": round(child["bytes"] / child["memory_bytes_per_s"], 3),
        "cpu_user_s": round(after.ru_utime - before.ru_utime, 2),
        "cpu_sys_s": round(after.ru_stime - before.ru_stime, 2),
    }


def run_benchmark(
    root: Path,
    quick: bool,
    repeats: int = 2,
    log=print,
    baseline: Path | None = None,
    link_mbit: float | None = None,
) -> dict:
    contenders = CONTENDERS + ((BASELINE,) if baseline else ())
    paths = synth_sdxl.ensure(root / ("quick-synth" if quick else "sdxl-synth"), quick, log=log)
    model_bytes, model_files = _tree_bytes(paths.base_dir)
    work = root / f"b4-work-{uuid.uuid4().hex[:8]}"
    summary: dict[str, Any] = {
        "benchmark": "b4_sync",
        "quick": quick,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": str(paths.base_dir),
        "model_bytes": model_bytes,
        "model_files": model_files,
        "cpus": os.cpu_count(),
        "code": code_version(),
        "link_mbit": link_mbit,
        # The machine may be shared: the load before and after says how noisy the wall times are.
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
    }
    with SeaweedS3() as s3:
        # No parent AWS profile or session token may leak into the contenders: both get only the server's.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | s3.env()
        env |= {"DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}
        try:
            t0 = time.monotonic()
            bucket, release, released = publish(s3, paths.base_dir, work, env)
            summary["publish_s"] = round(time.monotonic() - t0, 1)
            log(f"pushed {model_bytes / 1e9:.2f} GB in {summary['publish_s']} s; release {release}")
            if link_mbit:
                summary["link"] = limit_loopback(link_mbit)
                log(f"loopback limited: {summary['link']}")
            runs: dict[str, list[dict]] = {c: [] for c in contenders}
            for i in range(repeats):
                # Alternate the order so neither contender always follows the other's page-cache churn.
                order = contenders if i % 2 == 0 else contenders[::-1]
                for contender in order:
                    dest = work / f"dest-{contender}"
                    result = run_one(contender, s3, bucket, release, dest, env, baseline)
                    shown = {k: v for k, v in result.items() if k != "report"}
                    log(f"run {i + 1} {contender}: {json.dumps(shown)}")
                    runs[contender].append(result)
            summary["warm_check"] = warm_check(s3, bucket, released, work / "dest-warm", env, repeats=3)
            log(f"warm check: {json.dumps(summary['warm_check'])}")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    summary["results"] = runs
    summary["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    ratios = [s["wall_s"] / f["wall_s"] for f, s in zip(runs["fuseline"], runs["s5cmd"], strict=True)]
    best = {c: min(r["wall_s"] for r in runs[c]) for c in contenders}
    # The verify floor per run: max(s5cmd's download, md5 of its bytes over all cores), and s5cmd followed
    # by that md5 pass (a sync that checks after downloading).
    # md5's part of the floor: its CPU time for these bytes on all cores (from memory); the measured
    # re-read pass is reported beside it, since on a machine whose page cache lost the bytes it measures
    # the disk instead.
    md5_walls = [r["md5"]["cpu_floor_s"] for r in runs["s5cmd"]]
    md5_pass = [r["md5"]["wall_s"] for r in runs["s5cmd"]]
    floors = [max(r["wall_s"], m) for r, m in zip(runs["s5cmd"], md5_walls, strict=True)]
    then_md5 = [r["wall_s"] + m for r, m in zip(runs["s5cmd"], md5_pass, strict=True)]
    vs_floor = [f["wall_s"] / floor for f, floor in zip(runs["fuseline"], floors, strict=True)]
    summary["ratios"] = {
        "s5cmd_vs_fuseline_wall_per_run": [round(r, 3) for r in ratios],
        "s5cmd_vs_fuseline_wall_best": round(best["s5cmd"] / best["fuseline"], 3),
        "target": TARGET_RATIO,
        "target_met": best["s5cmd"] / best["fuseline"] >= TARGET_RATIO,
        "md5_all_cores_cpu_floor_per_run_s": md5_walls,
        "md5_pass_after_s5cmd_wall_per_run_s": md5_pass,
        "verify_floor_per_run_s": [round(f, 3) for f in floors],
        "fuseline_vs_verify_floor_per_run": [round(r, 3) for r in vs_floor],
        "fuseline_vs_verify_floor_best": round(best["fuseline"] / min(floors), 3),
        "verify_floor_target": TARGET_VS_FLOOR,
        "verify_floor_target_met": best["fuseline"] / min(floors) <= TARGET_VS_FLOOR,
        "s5cmd_then_md5_vs_fuseline_wall_best": round(min(then_md5) / best["fuseline"], 3),
        "cpu_bound_wall_s_best": {c: min(r["cpu_bound_wall_s"] for r in runs[c]) for c in contenders},
        "same_bytes": len({r["bytes"] for c in contenders for r in runs[c]}) == 1,
        "cpu_s_best": {c: min(r["cpu_user_s"] + r["cpu_sys_s"] for r in runs[c]) for c in contenders},
        "warm_check_ten_templates_best_wall_s": summary["warm_check"]["best_wall_s"],
        "warm_check_ten_templates_best_sync_s": summary["warm_check"]["best_sync_s"],
    }
    if baseline:
        summary["baseline_sync"] = str(baseline)
        summary["ratios"]["s5cmd_vs_baseline_wall_best"] = round(best["s5cmd"] / best[BASELINE], 3)
        summary["ratios"]["baseline_vs_fuseline_wall_best"] = round(best[BASELINE] / best["fuseline"], 3)
    return summary


def _rerun_in_own_network(argv: list[str]) -> dict:
    """This benchmark again inside `unshare --net` (a loopback of its own, so the limit slows nobody else)."""
    unshare = shutil.which("unshare")
    if unshare is None or shutil.which("tc") is None or shutil.which("ip") is None:
        raise SystemExit(
            "--link-mbit needs unshare (util-linux) and tc/ip (iproute2): apt-get install iproute2"
        )
    user_ns = [] if os.geteuid() == 0 else ["--map-root-user"]
    command = [unshare, "--net", *user_ns, "--", sys.executable, "-m", "benchmarks.b4_sync", *argv]
    done = subprocess.run(command, env={**os.environ, NETNS_ENV: "1"}, check=False)
    if done.returncode != 0:
        raise SystemExit(done.returncode)
    return {}


def limit_loopback(mbit: float) -> dict[str, Any]:
    """Limit this namespace's loopback to `mbit` Mbit/s with a token bucket (tc tbf)."""
    if os.environ.get(NETNS_ENV) != "1":
        raise RuntimeError("refusing to limit the loopback outside the benchmark's own network namespace")
    burst = max(1, int(mbit * 1e6 / 8 / 100))  # 10 ms at the rate
    subprocess.run(
        ["tc", "qdisc", "replace", "dev", "lo", "root", "tbf", "rate", f"{mbit}mbit", "burst", str(burst),
         "latency", "200ms"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    shown = subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True).stdout
    return {"mbit": mbit, "mb_per_s": mbit / 8, "qdisc": shown.strip()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.b4_sync", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the test kit's tiny model folder")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="work folder (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--baseline-sync", type=Path, help="another sync.py: a third contender")
    parser.add_argument(
        "--link-mbit",
        type=float,
        help="run in a network namespace of its own with its loopback limited to this many Mbit/s (tc tbf)",
    )
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.link_mbit and os.environ.get(NETNS_ENV) != "1":
        return _rerun_in_own_network(sys.argv[1:] if argv is None else argv)
    if os.environ.get(NETNS_ENV) == "1":  # a fresh namespace's loopback starts down
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True, capture_output=True, text=True)
    summary = run_benchmark(
        args.root,
        args.quick,
        args.repeats,
        log=lambda line: print(line, flush=True),
        baseline=args.baseline_sync.resolve() if args.baseline_sync else None,
        link_mbit=args.link_mbit,
    )
    save_summary(summary, args.json_out)
    print(json.dumps(summary["ratios"], indent=2))
    return summary


if __name__ == "__main__":
    main()
