"""Stage logs and build metrics: stage.* events as JSON lines with no secret, metrics files written
atomically, and, in a real `dvc repro` of the kit, `dvc metrics show` and `fuseline report` over them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fuseline.cli import app
from fuseline.core.build_metrics import STATS_DIR, stats_path
from fuseline.core.safetensors_io import read_header
from stages.runtime import io_counters, io_delta, write_stage_metrics
from tests.fixtures.project import REPO, dvc_env, make_dvc_project

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYSECRETKEY"
READ_MB, WRITE_MB = 3, 2
# What the toy stage holds at once, every page written: far above an interpreter's own ~30-100 MiB, so a
# peak above it is the stage's allocation, measured.
ALLOC_MB = 200

# A stage whose main reads and writes known amounts with plain I/O, logs the secret in a message, a field
# and a metric, and fails when asked: run as its own process, as DVC runs a stage.
TOY_STAGE = textwrap.dedent(
    """
    import logging, os, sys
    from pathlib import Path
    from stages.runtime import StageError, record_metrics, run_stage

    def main(item_id):
        secret = os.environ["AWS_SECRET_ACCESS_KEY"]
        log = logging.getLogger("fuseline.stages.toy")
        data = Path("input.bin").read_bytes()
        Path("output.bin").write_bytes(data[: {write} * 2**20])
        held = bytearray(b"x") * ({alloc} * 2**20)  # repeated, so every page is written (resident)
        del held
        log.info("connecting with key %s", secret)
        from fuseline.core.logs import log_event
        log_event(log, "toy.used", "used a url", url=f"s3://bucket/x?X-Amz-Signature={{secret}}", n=len(data))
        record_metrics(source=f"https://example.com/l.safetensors?token={{secret}}", ratio=float("nan"))
        if os.environ.get("TOY_FAIL"):
            raise StageError("TOY_BROKEN", f"cannot reach s3 with {{secret}}; fix the key")

    run_stage("merge", main, sys.argv[1:])
    """
).format(write=WRITE_MB, alloc=ALLOC_MB)


def run_toy(tmp_path: Path, *, fail: bool = False) -> subprocess.CompletedProcess[str]:
    (tmp_path / "input.bin").write_bytes(os.urandom(READ_MB * 2**20))
    env = dict(os.environ, AWS_SECRET_ACCESS_KEY=SECRET, PYTHONPATH=str(REPO))
    env.pop("FUSELINE_LOG_FORMAT", None)  # stderr is a pipe: JSON by default, as under DVC and CI
    if fail:
        env["TOY_FAIL"] = "1"
    return subprocess.run(
        [sys.executable, "-c", TOY_STAGE, "alpha"], cwd=tmp_path, env=env, capture_output=True, text=True
    )


def json_records(stderr: str) -> list[dict]:
    """Every log line of a stage process, each parsed as one JSON object (fails on any other line)."""
    records = []
    for line in stderr.splitlines():
        if line.startswith("error: stage "):  # the one plain line for people, checked separately
            continue
        records.append(json.loads(line))
    return records


def test_a_stage_run_logs_json_events_with_measurements_and_no_secret(tmp_path):
    proc = run_toy(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert SECRET not in proc.stderr
    records = json_records(proc.stderr)
    events = [r["event"] for r in records]
    assert events[0] == "stage.start" and events[-1] == "stage.done", events
    assert "toy.used" in events and "log" in events
    start, done = records[0], records[-1]
    for record in (start, done):
        assert (record["stage"], record["id"], record["template"]) == ("merge", "alpha", "alpha")
        assert record["logger"] == "fuseline.stages" and record["ts"].endswith("Z")
    # Measured, not guessed: the toy read READ_MB and wrote WRITE_MB with plain read()/write() calls.
    assert done["bytes_read"] >= READ_MB * 2**20 and done["bytes_written"] >= WRITE_MB * 2**20
    assert done["bytes_read"] < READ_MB * 2**20 + 64 * 2**20  # the interpreter's own imports, not more
    assert 0 < done["wall_ms"] < 60_000
    # The toy held ALLOC_MB at once: the peak (VmHWM, reset when the stage starts) must include it.
    assert ALLOC_MB < done["peak_rss_mb"] < ALLOC_MB + 300, done["peak_rss_mb"]

    metrics_file = stats_path("merge", "alpha", tmp_path)
    assert done["metrics"] == stats_path("merge", "alpha").as_posix()
    metrics = json.loads(metrics_file.read_text())
    for key in ("stage", "id", "template", "wall_ms", "peak_rss_mb", "bytes_read", "bytes_written"):
        assert metrics[key] == done[key], key
    assert metrics["ratio"] is None  # NaN is not JSON; DVC would fail to read the file
    assert "token=***" in metrics["source"] and SECRET not in metrics_file.read_text()
    assert [p.name for p in metrics_file.parent.iterdir()] == ["alpha.json"]  # no temporary left behind


def test_a_failed_stage_logs_its_code_and_writes_no_metrics(tmp_path):
    proc = run_toy(tmp_path, fail=True)
    assert proc.returncode == 1
    assert SECRET not in proc.stderr and "Traceback" not in proc.stderr
    assert "error: stage merge@alpha: [TOY_BROKEN] cannot reach s3 with ***; fix the key" in proc.stderr
    failed = json_records(proc.stderr)[-1]
    assert failed["event"] == "stage.failed" and failed["level"] == "error"
    assert failed["code"] == "TOY_BROKEN" and failed["template"] == "alpha" and failed["wall_ms"] > 0
    assert failed["error"] == "cannot reach s3 with ***; fix the key"
    assert not (tmp_path / STATS_DIR).exists()


def test_fetch_receipt_error_line_is_redacted_like_a_stage_error(tmp_path):
    # `fetch --receipt` prints its own error line for people (print(), outside the logging redaction): a
    # secret in it (here in the group a caller passed) must be masked as in the stage.failed event.
    env = dict(os.environ, AWS_SECRET_ACCESS_KEY=SECRET, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    command = ["--receipt", f"templates.{SECRET}", "--receipt-out", "r.json", "--catalog", "none.json"]
    proc = subprocess.run(
        [sys.executable, "-m", "stages.fetch", *command],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert SECRET not in proc.stderr
    assert "error: fetch --receipt templates.***: [CATALOG_INVALID]" in proc.stderr


def test_metrics_file_is_replaced_atomically(tmp_path):
    first = write_stage_metrics("verify", "alpha", {"wall_ms": 1.0}, tmp_path)
    second = write_stage_metrics("verify", "alpha", {"wall_ms": 2.0, "load_s": float("inf")}, tmp_path)
    assert first == second == tmp_path / STATS_DIR / "verify" / "alpha.json"
    assert json.loads(second.read_text()) == {"wall_ms": 2.0, "load_s": None}
    assert sorted(p.name for p in second.parent.iterdir()) == ["alpha.json"]


def test_io_delta_counts_plain_reads_and_writes(tmp_path):
    before = io_counters()
    if before is None:
        pytest.skip("no /proc/self/io on this system")
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 2**20)
    assert len(path.read_bytes()) == 2**20
    delta = io_delta(before, io_counters())
    assert delta["bytes_written"] >= 2**20 and delta["bytes_read"] >= 2**20
    assert io_delta(None, before) == dict.fromkeys(delta)


def resolve(path: str, layout: dict[str, str]) -> str:
    """A dvc.yaml path with its `${layout.<name>}` variables filled in (as DVC fills them)."""
    for name, value in layout.items():
        path = path.replace(f"${{layout.{name}}}", value)
    return path


def test_dvc_yaml_declares_every_stage_metrics_file_cached():
    import yaml

    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    layout = next(v["layout"] for v in pipeline["vars"] if isinstance(v, dict) and "layout" in v)
    for name, stage in pipeline["stages"].items():
        body = stage.get("do", stage)
        item_id = "${key}" if "foreach" in stage else "vae"
        declared = {
            resolve(path, layout): opts for entry in body.get("metrics", []) for path, opts in (
                entry.items() if isinstance(entry, dict) else [(entry, {})])
        }  # fmt: skip
        # Cached on purpose: `dvc push --run-cache` leaves a `cache: false` output's content behind, and
        # another machine's `dvc repro --pull` then re-runs the stage (tests/publish/test_publish_build.py).
        assert declared.get(stats_path(name, item_id).as_posix()) == {}, (name, declared)


# ---------------------------------------------------------------------------------------------------------
# A real build of the kit through the repo's dvc.yaml (one template, two LoRAs on different components)

TEMPLATE = "duo"
STAGES = {
    ("fetch-checkpoint", "tiny-diffusers"),
    ("fetch-vae", "vae"),
    ("fetch-loras", TEMPLATE),
    ("convert", "tiny-diffusers"),
    ("vae", "vae"),
    ("merge", TEMPLATE),
    ("verify", TEMPLATE),
}


@pytest.fixture(scope="module")
def built(kit, tmp_path_factory):
    """One `dvc repro` of one template; the secret is in the environment and in a LoRA's path, so every
    stage that names the LoRA logs it (and must redact it)."""
    root = tmp_path_factory.mktemp("metrics")
    secret_dir = root / "sources" / SECRET
    secret_dir.mkdir(parents=True)
    shutil.copyfile(kit.loras["kohya_te"], secret_dir / "te.safetensors")
    loras = [
        {"source": f"file:{kit.loras['kohya_sgm']}", "scale": 0.8},
        {"source": f"file:{secret_dir / 'te.safetensors'}", "scale": 0.5},
    ]
    catalog = {
        "version": 1,
        "vae": {"source": f"file:{kit.vae_dir}"},
        "checkpoints": {"tiny-diffusers": {"source": f"file:{kit.diffusers_dir}"}},
        "templates": {TEMPLATE: {"checkpoint": "tiny-diffusers", "loras": loras}},
    }
    project = make_dvc_project(
        root / "project",
        catalog,
        params={"merge": {"shard_size_mb": 0.5}, "verify": {"steps": 2, "width": 64, "height": 64}},
    )
    project.env = dvc_env({"AWS_SECRET_ACCESS_KEY": SECRET})
    proc = project.dvc("repro")
    return project, proc, loras


@pytest.mark.slow
def test_dvc_repro_logs_every_stage_as_json_without_the_secret(built):
    project, proc, _ = built
    assert SECRET not in proc.stdout + proc.stderr
    records = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    done = {(r["stage"], r["id"]): r for r in records if r["event"] == "stage.done"}
    started = {(r["stage"], r["id"]) for r in records if r["event"] == "stage.start"}
    assert set(done) == started == STAGES
    merge = done[("merge", TEMPLATE)]
    assert merge["template"] == TEMPLATE
    assert merge["bytes_written"] >= merge["model_bytes"]  # the export writes the model with write()
    assert done[("convert", "tiny-diffusers")]["checkpoint"] == "tiny-diffusers"
    # The LoRA whose path holds the secret was logged (by name) and redacted.
    loggers = {r["logger"] for r in records if "/***/te.safetensors" in r["message"]}
    assert {"fuseline.stages.fetch", "fuseline.stages.lora"} <= loggers, loggers
    for path in (project.root / STATS_DIR).rglob("*"):
        assert not path.is_file() or SECRET not in path.read_text(), path


@pytest.mark.slow
def test_dvc_metrics_show_lists_build_metrics_per_template(built):
    project, _, loras = built
    shown = json.loads(project.dvc("metrics", "show", "--json").stdout)
    files = shown[""]["data"]
    for stage, item_id in STAGES:
        data = files[stats_path(stage, item_id).as_posix()]["data"]
        assert data["wall_ms"] > 0 and data["peak_rss_mb"] > 0 and data["bytes_written"] >= 0, stage
    merge = files[stats_path("merge", TEMPLATE).as_posix()]["data"]
    model = project.root / "artifacts/models" / TEMPLATE
    assert merge["model_bytes"] == sum(p.stat().st_size for p in model.rglob("*") if p.is_file())
    # Placed keys per LoRA are the manifest's, per component and in total: every key of each file.
    manifest = json.loads((model / "fuseline.json").read_text())
    for index, (ref, spec) in enumerate(zip(manifest["loras"], loras, strict=True)):
        entry = merge["loras"][str(index)]
        assert entry["placed_keys"] == ref["placed_keys"] and entry["scale"] == spec["scale"]
        header = read_header(Path(spec["source"].removeprefix("file:")))
        assert entry["file_keys"] == len(header.tensors) == sum(ref["placed_keys"].values())
    assert (
        merge["loras"]["0"]["placed_keys"]["unet"] > 0
        and merge["loras"]["0"]["placed_keys"]["text_encoder"] == 0
    )
    assert merge["loras"]["1"]["placed_keys"]["text_encoder"] > 0
    totals = {c: sum(r["placed_keys"][c] for r in manifest["loras"]) for c in ("unet", "text_encoder")}
    assert (
        merge["placed_keys"]["unet"] == totals["unet"]
        and merge["placed_keys"]["text_encoder"] == totals["text_encoder"]
    )
    verify = files[stats_path("verify", TEMPLATE).as_posix()]["data"]
    assert verify["result"] == "pass" and verify["preview"] == f"artifacts/verify/{TEMPLATE}/preview.png"


@pytest.mark.slow
def test_fuseline_report_prints_the_build(built):
    project, _, _ = built
    runner = CliRunner()
    result = runner.invoke(app, ["report", "--project", str(project.root), "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)["templates"]
    stats = {
        s: json.loads(stats_path(s, TEMPLATE, project.root).read_text())
        for s in ("fetch-loras", "merge", "verify")
    }
    assert row["build_ms"] == pytest.approx(sum(s["wall_ms"] for s in stats.values()), abs=0.2)
    assert row["model_bytes"] == stats["merge"]["model_bytes"] and row["verify"] == "pass"
    assert row["placed_keys"] == stats["merge"]["placed_keys"] and len(row["loras"]) == 2
    assert row["preview"] == f"artifacts/verify/{TEMPLATE}/preview.png"
    text = runner.invoke(app, ["report", "--project", str(project.root)])
    assert text.exit_code == 0, text.output
    assert TEMPLATE in text.output and "kohya_sgm.safetensors x0.8" in text.output and "pass" in text.output
    assert SECRET not in text.output and "te.safetensors x0.5" in text.output


@pytest.mark.slow
def test_metrics_survive_reruns_and_come_back_from_the_run_cache(built):
    project, _, _ = built
    merge_stats = stats_path("merge", TEMPLATE, project.root)
    before = merge_stats.read_bytes()
    assert project.repro() == []  # nothing changed: nothing runs, the metrics stay as they were
    assert merge_stats.read_bytes() == before
    # The metrics are a cached output of their stage: with the model and its metrics gone, the stage is
    # restored from the run-cache (not run) and the metrics come back byte for byte.
    shutil.rmtree(project.root / "artifacts/models" / TEMPLATE)
    merge_stats.unlink()
    proc = project.dvc("repro")
    assert "Running stage" not in proc.stdout and f"merge@{TEMPLATE}' is cached" in proc.stdout
    assert merge_stats.read_bytes() == before
    assert project.status() == {}
