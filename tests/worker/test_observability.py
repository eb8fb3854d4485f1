"""What operators read: the worker's JSON log events (worker.start, sync.done, job.done/job.failed,
worker.counters), its start self-check, and its counters, captured from real runs on the kit's models."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import worker.handler
from fuseline.core.logs import setup_logging
from fuseline.core.redact import redact
from tests.worker.conftest import INPAINT_TEMPLATE, SMALL, TEMPLATE
from tests.worker.test_entrypoint import worker_env
from worker.handler import SELF_CHECK_FAILED, handler
from worker.serving import Worker
from worker.startup import self_check
from worker.telemetry import COUNTERS

# Known secret values: none may reach a log line, whichever path carries them there.
AWS_SECRET = "aws-SECRET-value-4242424242"
RUNPOD_KEY = "rpa_SECRETKEY0123456789abcdef"
TIMING_FIELDS = {"load_ms", "inference_ms", "decode_ms", "encode_ms", "total_ms"}
CORRUPT_FILE = Path("unet") / "diffusion_pytorch_model.fp16.safetensors"


@pytest.fixture
def secrets_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("RUNPOD_AI_API_KEY", RUNPOD_KEY)


@pytest.fixture
def captured() -> io.StringIO:
    """The root logger writing JSON lines into a StringIO, as setup_logging does for a worker."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    setup_logging(stream, env={"FUSELINE_LOG_FORMAT": "json"})
    yield stream
    root.handlers[:] = handlers
    root.setLevel(level)


def events(text: str) -> list[dict]:
    """Every line parsed as JSON: a line that is not one object fails the test."""
    records = []
    for line in text.splitlines():
        record = json.loads(line)
        assert isinstance(record, dict) and {"ts", "level", "logger", "event", "message"} <= set(record)
        records.append(record)
    return records


def counter_delta(before: dict, after: dict) -> dict:
    out = {k: after[k] - before[k] for k in before if k != "errors"}
    codes = set(before["errors"]) | set(after["errors"])
    out["errors"] = {
        c: after["errors"].get(c, 0) - before["errors"].get(c, 0)
        for c in codes
        if after["errors"].get(c, 0) != before["errors"].get(c, 0)
    }
    return out


@pytest.mark.usefixtures("served", "secrets_set")
def test_each_job_logs_one_record_and_the_counters_add_up(
    captured: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = worker.handler.get_worker()
    # A counters event after every job, so each one can be checked against the job before it.
    monkeypatch.setattr(served, "settings", served.settings.model_copy(update={"counters_every": 1}))
    # On CUDA the VAE runs in fp16; cast it here so the hot VAE really overflows to NaN (see test_handler).
    served.cache.get("hot-vae")[0].pipe.vae.to(torch.float16)
    cached_before = len(served.cache.loaded())
    before = COUNTERS.snapshot()
    captured.truncate(0)
    captured.seek(0)

    jobs = {
        "good": {"prompt": f"a lighthouse {RUNPOD_KEY}", "seed": 5, **SMALL},
        # Short enough (<= 40 characters) for the validation message to echo it.
        "bad-input": {"prompt": "a", "steps": f"x?token={AWS_SECRET}"},
        "unknown": {"prompt": "a", "template": "nope"},
        "nan-retried": {"template": "hot-vae", "prompt": "a cat", "seed": 1, **SMALL},
        "black": {"template": "black-vae", "prompt": "a cat", "seed": 2, **SMALL, "num_images": 2},
    }
    results = {job_id: handler({"id": job_id, "input": raw}) for job_id, raw in jobs.items()}
    assert {k for k, r in results.items() if "error" in r} == {"bad-input", "unknown", "black"}

    records = events(captured.getvalue())
    text = captured.getvalue()
    assert AWS_SECRET not in text and RUNPOD_KEY not in text
    jobs_logged = [r for r in records if r["event"] in ("job.done", "job.failed")]
    assert [(r["job_id"], r["event"]) for r in jobs_logged] == [
        ("good", "job.done"),
        ("bad-input", "job.failed"),
        ("unknown", "job.failed"),
        ("nan-retried", "job.done"),
        ("black", "job.failed"),
    ]
    by_id = {r["job_id"]: r for r in jobs_logged}

    good = by_id["good"]
    output = results["good"]
    assert (good["template"], good["width"], good["height"], good["steps"]) == (TEMPLATE, 64, 64, 3)
    assert good["mode"] == output["mode"] == "txt2img"
    assert (good["num_images"], good["seed"], good["retries"], good["degraded"]) == (1, 5, [], False)
    assert good["level"] == "info" and "error_code" not in good and "peak_vram_bytes" not in good  # CPU
    # The record's timings are the output's timings_ms, which gained decode and total.
    assert {f"{k}_ms": v for k, v in output["timings_ms"].items()} == {k: good[k] for k in TIMING_FIELDS}
    assert good["total_ms"] >= good["inference_ms"] + good["decode_ms"] + good["encode_ms"] > 0

    bad = by_id["bad-input"]
    assert bad["error_code"] == "INVALID_INPUT" and bad["level"] == "warning"
    assert results["bad-input"]["error"].endswith(f"(got 'x?token={AWS_SECRET}')")
    assert bad["error"].endswith("(got 'x?token=***')")  # the same error, masked in the log
    assert bad["template"] is None and "width" not in bad and set(bad) & TIMING_FIELDS == {"total_ms"}
    assert "mode" not in bad  # refused before its parameters were resolved
    unknown = by_id["unknown"]
    assert (unknown["error_code"], unknown["template"]) == ("UNKNOWN_TEMPLATE", "nope")
    assert unknown["error"].startswith("[UNKNOWN_TEMPLATE] no template 'nope'")

    retried = by_id["nan-retried"]
    assert retried["retries"] == ["image_check"] and retried["template"] == "hot-vae"
    assert results["nan-retried"]["warnings"] == [
        "NaN/Inf in the decoded pixels in the torch.float16 VAE decode; decoded again in float32"
    ]
    black = by_id["black"]
    # Failed after its parameters were resolved: they are in the record, with the retry that did not help.
    assert (black["error_code"], black["retries"]) == ("IMAGE_INVALID", ["image_check"])
    assert (black["template"], black["num_images"], black["seed"], black["steps"]) == ("black-vae", 2, 2, 3)

    # Counters: one worker.counters event per job (every=1), each counting that job.
    counters = [r for r in records if r["event"] == "worker.counters"]
    assert len(counters) == len(jobs) and all(c["reason"] == "periodic" for c in counters)
    totals = [c["jobs_done"] + c["jobs_failed"] for c in counters]
    assert totals == list(range(totals[0], totals[0] + len(jobs)))
    after = COUNTERS.snapshot()
    assert {k: v for k, v in counters[-1].items() if k in after} == after
    delta = counter_delta(before, after)
    assert (delta["jobs_done"], delta["jobs_failed"]) == (2, 3)
    assert delta["errors"] == {"INVALID_INPUT": 1, "UNKNOWN_TEMPLATE": 1, "IMAGE_INVALID": 1}
    assert (delta["image_check_retries"], delta["oom_retries"], delta["fallbacks"]) == (2, 0, 0)
    assert sum(after["errors"].values()) == after["jobs_failed"]
    # Cache traffic: three jobs reached the cache (good, nan-retried, black); every miss loaded one
    # pipeline and what the cache holds now is what it held, plus the loads, minus the evictions.
    assert delta["cache_hits"] + delta["cache_misses"] == 3
    assert cached_before + delta["cache_misses"] - delta["cache_evictions"] == len(served.cache.loaded())


def test_self_check_generates_with_the_default_template(settings) -> None:
    check = self_check(Worker(settings.model_copy(update={"default_template": TEMPLATE})))
    assert (check.ok, check.mode, check.templates, check.error) == (True, "generate", [TEMPLATE], None)
    assert check.ms > 0


def test_self_check_and_compile_warm_up_inpaint_with_an_inpainting_default_template(modes_worker) -> None:
    """An inpainting checkpoint serves inpaint jobs only: the start's generation is an inpaint job of a
    grey picture (read through the job's own image readers), not a text-to-image one it would refuse."""
    from worker.startup import warm_up

    worker = Worker(modes_worker.settings.model_copy(update={"default_template": INPAINT_TEMPLATE}))
    check = self_check(worker)
    assert (check.ok, check.mode, check.templates, check.error) == (
        True,
        "generate",
        [INPAINT_TEMPLATE],
        None,
    )
    entry, _ = worker.cache.get(INPAINT_TEMPLATE)
    assert set(entry.mode_pipes) == {"inpaint"}
    assert warm_up(worker, entry) == []


def corrupt_volume(volume: Path, target: Path) -> Path:
    """`target` as a volume holding a real copy of `tiny` (not hard links: the session volume's files stay
    intact) whose UNet weights are cut in half, as an interrupted copy leaves them."""
    folder = target / "models" / TEMPLATE
    shutil.copytree(volume / "models" / TEMPLATE, folder)
    weights = folder / CORRUPT_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return folder / CORRUPT_FILE


def test_self_check_without_default_checks_each_preloaded_folder(settings, volume: Path, tmp_path: Path):
    broken = corrupt_volume(volume, tmp_path)
    check = self_check(
        Worker(settings.model_copy(update={"volume": tmp_path, "default_template": None, "preload": None}))
    )
    assert (check.ok, check.mode, check.templates) == (False, "files", [TEMPLATE])
    assert check.error.startswith(f"[MODEL_INVALID] template '{TEMPLATE}': {broken}: not a readable")
    # The intact session volume passes the same check.
    assert self_check(
        Worker(settings.model_copy(update={"default_template": None, "preload": (TEMPLATE,)}))
    ).ok


def publish_local(volume: Path, template: str, remote: Path) -> str:
    """`template`'s folder pushed to a local DVC remote as `dvc push` lays it out (files/md5/<2>/<30>, the
    folder listing as `<md5 of its JSON>.dir`), and a release naming it; returns the release's path."""
    from fuseline.core.manifest import ModelManifest
    from fuseline.core.release import Release, ReleasedTemplate, object_key, release_key

    folder = volume / "models" / template
    listing, size = [], 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        md5 = hashlib.md5(data).hexdigest()
        (remote / object_key(md5)).parent.mkdir(parents=True, exist_ok=True)
        (remote / object_key(md5)).write_bytes(data)
        listing.append({"md5": md5, "relpath": path.relative_to(folder).as_posix()})
        size += len(data)
    raw = json.dumps(listing).encode()
    dir_md5 = hashlib.md5(raw).hexdigest() + ".dir"
    (remote / object_key(dir_md5)).parent.mkdir(parents=True, exist_ok=True)
    (remote / object_key(dir_md5)).write_bytes(raw)
    manifest = ModelManifest.read(folder)
    entry = ReleasedTemplate(
        dir_md5=dir_md5,
        path=f"artifacts/models/{template}",
        size=size,
        nfiles=len(listing),
        spec_hash=manifest.spec_hash,
        checkpoint=manifest.checkpoint.source,
    )
    release = Release(channel="main", created="20261128T000000Z", templates={template: entry})
    (remote / release_key("main")).parent.mkdir(parents=True)
    (remote / release_key("main")).write_text(release.to_json())
    return str(remote / release_key("main"))


def test_sync_is_reported_and_counted(
    settings, volume: Path, tmp_path: Path, captured: io.StringIO, secrets_set
) -> None:
    before = COUNTERS.snapshot()
    release = publish_local(volume, TEMPLATE, tmp_path / "remote")
    fresh = tmp_path / "fresh-volume"
    synced = Worker(settings.model_copy(update={"volume": fresh, "release": release, "preload": (TEMPLATE,)}))
    assert synced.sync_volume() == []
    folder_files = [p for p in (volume / "models" / TEMPLATE).rglob("*") if p.is_file()]
    unique = {hashlib.md5(p.read_bytes()).hexdigest(): p.stat().st_size for p in folder_files}

    # The remote gone (its folder named after a secret, which must not be logged): the sync fails, the
    # template synced before is kept.
    down = tmp_path / RUNPOD_KEY / "releases" / "main.json"
    kept = Worker(settings.model_copy(update={"volume": fresh, "release": str(down), "preload": (TEMPLATE,)}))
    problems = kept.sync_volume()

    ok, failed = [r for r in events(captured.getvalue()) if r["event"] == "sync.done"]
    assert ok["level"] == "info" and ok["templates"] == {TEMPLATE: "synced"} and ok["failures"] == 0
    assert (ok["bytes"], ok["objects"], ok["error"]) == (sum(unique.values()), len(unique), None)
    assert ok["seconds"] >= 0 and synced.sync_summary["bytes"] == ok["bytes"]
    assert failed["level"] == "warning" and failed["templates"] == {TEMPLATE: "kept"} and failed["bytes"] == 0
    assert failed["failures"] == 1 and failed["error"] == redact(problems[0]) and "***" in failed["error"]
    assert RUNPOD_KEY not in captured.getvalue()
    delta = counter_delta(before, COUNTERS.snapshot())
    assert (delta["sync_bytes"], delta["sync_failures"]) == (sum(unique.values()), 1)


def run_worker(volume: Path, cwd: Path, job: dict) -> subprocess.CompletedProcess:
    env = worker_env(volume) | {
        "FUSELINE_LOG_FORMAT": "json",
        "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
        "RUNPOD_AI_API_KEY": RUNPOD_KEY,
        "FUSELINE_PRELOAD": f"{TEMPLATE},tiny-defaults",
    }
    return subprocess.run(
        [sys.executable, "-m", "worker.handler", "--test_input", json.dumps(job)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_worker_process_logs_start_job_and_counters_as_json(volume: Path, tmp_path: Path) -> None:
    job = {"input": {"prompt": f"a fox {RUNPOD_KEY} {AWS_SECRET}", **SMALL, "seed": 11}}
    proc = run_worker(volume, tmp_path, job)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = events(proc.stderr)  # every stderr line, libraries' included, is one JSON object
    assert AWS_SECRET not in proc.stderr and RUNPOD_KEY not in proc.stderr
    names = [r["event"] for r in records]
    assert names.index("worker.start") < names.index("job.done") < names.index("worker.counters")
    (start,) = [r for r in records if r["event"] == "worker.start"]
    assert start["level"] == "info", start["message"]
    assert set(start["versions"]) == {"python", "torch", "diffusers", "transformers", "runpod", "fuseline"}
    assert start["versions"]["torch"] == torch.__version__ and start["versions"]["python"].startswith("3.")
    assert (start["device"], start["gpu"]) == ("cpu", "cpu") and set(start["cuda"]) == {"version", "driver"}
    assert start["volume"]["path"] == str(volume) and start["volume"]["free_bytes"] > 0
    assert TEMPLATE in start["templates_present"] and start["default_template"] == TEMPLATE
    assert (start["templates_synced"], start["sync"], start["problems"]) == ([], None, [])
    assert start["self_check"]["ok"] is True and start["self_check"]["templates"] == [TEMPLATE]
    assert [r["template"] for r in records if r["event"] == "template.ok"] == [TEMPLATE, "tiny-defaults"]
    (done,) = [r for r in records if r["event"] == "job.done"]
    assert (done["job_id"], done["template"], done["seed"]) == ("local_test", TEMPLATE, 11)
    assert set(done) >= TIMING_FIELDS
    (counters,) = [r for r in records if r["event"] == "worker.counters"]
    assert counters["reason"] == "shutdown" and (counters["jobs_done"], counters["jobs_failed"]) == (1, 0)
    # Jobs only: the start-up load and the self-check's generation are not cache traffic; the job hits.
    assert (counters["cache_misses"], counters["cache_hits"]) == (0, 1)


@pytest.mark.slow
def test_worker_with_a_corrupt_default_template_does_not_start(volume: Path, tmp_path: Path) -> None:
    broken = corrupt_volume(volume, tmp_path / "volume")
    proc = run_worker(tmp_path / "volume", tmp_path, {"input": {"prompt": "a fox", **SMALL}})
    assert proc.returncode == SELF_CHECK_FAILED, proc.stderr[-3000:]
    assert "Job local_test" not in proc.stdout  # no job was taken
    records = events(proc.stderr)
    (start,) = [r for r in records if r["event"] == "worker.start"]
    assert start["level"] == "error" and start["self_check"]["ok"] is False
    reason = start["self_check"]["error"]
    assert re.match(rf"\[MODEL_INVALID\] template '{TEMPLATE}': {re.escape(str(broken))}: ", reason), reason
    assert reason in start["message"] and "python -m worker.sync --verify --template tiny" in reason
    assert not [r for r in records if r["event"] in ("job.done", "job.failed")]


def test_only_jobs_count_as_cache_traffic_and_retries(settings, volume: Path, tmp_path: Path) -> None:
    """The start-up load and self-check run the jobs' code paths (cache, fp32 decode retry) but are not
    traffic: they count nothing. A template that fails to load fails each job, counted under jobs_failed
    and its error code by the handler, never as one cache miss per job."""
    from worker.errors import ModelInvalid
    from worker.telemetry import job_record

    before = COUNTERS.snapshot()
    hot = Worker(settings.model_copy(update={"default_template": "hot-vae", "preload": ("hot-vae",)}))
    assert hot.startup() == []
    hot.cache.get("hot-vae")[0].pipe.vae.to(torch.float16)  # overflows to NaN: the self-check retries
    check = self_check(hot)
    assert check.ok, check.error
    quiet = counter_delta(before, COUNTERS.snapshot())
    assert (quiet["cache_hits"], quiet["cache_misses"], quiet["image_check_retries"]) == (0, 0, 0)

    with job_record({"id": "counted"}, hot.device) as record:
        hot.run({"template": "hot-vae", "prompt": "a cat", **SMALL, "seed": 1})
    assert record.retries == ["image_check"]
    broken = Worker(settings.model_copy(update={"volume": tmp_path, "default_template": None}))
    corrupt_volume(volume, tmp_path)
    for job_id in ("broken-1", "broken-2"):
        with job_record({"id": job_id}, broken.device), pytest.raises(ModelInvalid, match="could not load"):
            broken.run({"template": TEMPLATE, "prompt": "a cat", **SMALL})
    delta = counter_delta(before, COUNTERS.snapshot())
    assert (delta["cache_hits"], delta["cache_misses"], delta["image_check_retries"]) == (1, 0, 1)


def test_counters_every_is_a_setting() -> None:
    from fuseline.core.errors import ConfigInvalid as SettingsError
    from worker.settings import load_settings

    assert load_settings({}).counters_every == 50
    assert load_settings({"FUSELINE_COUNTERS_EVERY": "0"}).counters_every == 0
    with pytest.raises(SettingsError, match="FUSELINE_COUNTERS_EVERY"):
        load_settings({"FUSELINE_COUNTERS_EVERY": "-1"})


@pytest.mark.slow
def test_on_runpod_a_failed_self_check_goes_through_the_fitness_hook(volume: Path, tmp_path: Path) -> None:
    """The real job loop (RunPod's queue played by RunpodQueue): the SDK's fitness hook reports the reason
    to RunPod as unhealthy and ends the worker before it takes the queued job."""
    from testkit.runpod_queue import RunpodQueue

    broken = corrupt_volume(volume, tmp_path / "volume")
    with RunpodQueue() as queue:
        job_id = queue.put({"prompt": "a fox", **SMALL})
        env = {k: v for k, v in worker_env(tmp_path / "volume").items() if not k.startswith("RUNPOD_")}
        # HOME: runpod prefers a key in ~/.runpod/config.toml to RUNPOD_AI_API_KEY.
        env |= queue.env() | {"FUSELINE_LOG_FORMAT": "json", "HOME": str(tmp_path)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.handler"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            stdout, stderr = proc.communicate(timeout=240)
        finally:
            proc.kill()
        assert proc.returncode == 1, stdout[-2000:] + stderr[-2000:]  # runpod's os._exit(1)
        assert queue.taken() == [] and job_id in queue.waiting()
        (ping,) = [p for p in queue.pings() if p.get("status") == "unhealthy"]
    assert ping["check"] == "fuseline_self_check"
    assert ping["reason"].startswith(f"RuntimeError: [MODEL_INVALID] template '{TEMPLATE}': {broken}: ")
    (start,) = [r for r in events(stderr) if r["event"] == "worker.start"]
    assert start["self_check"]["ok"] is False and str(broken) in start["self_check"]["error"]


def test_self_check_accepts_a_broken_default_the_fallback_serves(kit, volume: Path, tmp_path: Path) -> None:
    """The runtime-LoRA fallback exists for a merged folder that is missing or broken: with its recipe and
    sources on the volume, the same truncated UNet degrades the default template instead of failing."""
    from tests.worker.test_fallback import make_volume, recipe_for, settings_for

    root = make_volume(tmp_path / "volume", kit, recipes=[recipe_for(kit, TEMPLATE, ())])
    corrupt_volume(volume, root)
    fallback = Worker(settings_for(root, FUSELINE_DEFAULT_TEMPLATE=TEMPLATE))
    fallback.startup()
    check = self_check(fallback)
    assert (check.ok, check.degraded, check.error) == (True, [TEMPLATE], None)
    assert check.fields()["degraded"] == [TEMPLATE]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_peak_vram_is_recorded_on_cuda(settings, captured: io.StringIO) -> None:
    from worker.telemetry import finish_job, job_record

    cuda_worker = Worker(settings.model_copy(update={"device": "cuda"}))
    with job_record({"id": "gpu"}, cuda_worker.device) as record:
        result = cuda_worker.run({"template": TEMPLATE, "prompt": "a cat", **SMALL})
        finish_job(record, result)
    (done,) = [r for r in events(captured.getvalue()) if r["event"] == "job.done"]
    assert 0 < done["peak_vram_bytes"] <= torch.cuda.get_device_properties(0).total_memory
