"""The real runpod worker loop end to end: `python -m worker.handler` in production mode, fed by a queue.

The worker runs as RunPod runs it (no `--test_input`, no local API): the SDK's `RUNPOD_WEBHOOK_*` variables
point at `RunpodQueue` on 127.0.0.1, which hands out 50 jobs mixing valid requests and every kind of bad
one. Each job must come back with an image or a `[CODE]` error, the worker must survive all of them and
stop cleanly on SIGTERM, and it must not open a connection (or resolve a name) beyond 127.0.0.1: a
`sitecustomize` audit hook, loaded into the worker through PYTHONPATH, logs every socket connect and name
lookup of the worker and of its heartbeat process, and refuses any that leaves loopback. A control test
shows the guard catches the SDK's own network probe when production mode's default is overridden.

Slow by nature: the SDK asks for the next job at most once a second while it holds one (see
testkit/runpod_queue.py), so 50 jobs take about a minute however small they are.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.metadata
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from fuseline.core.catalog.model import Defaults
from testkit.runpod_queue import RunpodQueue
from tests.worker.conftest import SPEC_HASH, TEMPLATE, TEST_ENV

WORKER_COMMAND = (sys.executable, "-m", "worker.handler")
# Start plus all 50 jobs: about 70 s on 2 busy cores (the SDK's 1 s job cycle dominates); generous for CI.
START_TIMEOUT_S = 480
STOP_TIMEOUT_S = 30

# Imported first by the worker's interpreter (and inherited by the heartbeat process it forks). An audit
# hook sees every socket operation of Python code (aiohttp, requests, asyncio, the SDK's 8.8.8.8 probe):
# it appends one JSON line per connect / name lookup / datagram to $FUSELINE_NET_AUDIT_LOG and refuses
# (PermissionError) any that leaves loopback, so even a failing test never reaches the network.
NET_GUARD_SITECUSTOMIZE = """\
import json, os, socket, sys

_fd = os.open(os.environ["FUSELINE_NET_AUDIT_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
_LOOPBACK = {"127.0.0.1", "::1", "localhost", None}


def _net_guard(event, args):
    if event not in ("socket.connect", "socket.getaddrinfo", "socket.sendto"):
        return
    record = {"event": event, "pid": os.getpid()}
    if event == "socket.getaddrinfo":
        host = args[0].decode() if isinstance(args[0], bytes) else args[0]
        record.update(host=host, port=args[1])
    elif args[0].family == socket.AF_UNIX:
        return
    else:
        host, record["address"] = args[1][0], list(args[1][:2])
    record["blocked"] = host not in _LOOPBACK
    os.write(_fd, (json.dumps(record, default=repr) + "\\n").encode())
    if record["blocked"]:
        raise PermissionError(f"test network guard: {event} to {host!r} refused (tests reach 127.0.0.1 only)")


sys.addaudithook(_net_guard)
"""


# ---------------------------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class Case:
    """One queued job: its input and what must come back."""

    name: str
    job_input: Any
    # A good job: the image format and count; a bad one: the error's `[CODE]` and a piece of its message.
    image_format: str | None = None
    num_images: int = 1
    error: str | None = None
    error_says: str = ""


def good(name: str, image_format: str = "PNG", **fields: Any) -> Case:
    job_input = {"prompt": f"a red fox, {name}", "width": 64, "height": 64, "steps": 1, **fields}
    # A field set to None is left out of the request (it then comes from the template's defaults).
    job_input = {key: value for key, value in job_input.items() if value is not None}
    return Case(name, job_input, image_format=image_format, num_images=fields.get("num_images", 1))


def bad(name: str, job_input: Any, error: str, says: str = "") -> Case:
    return Case(name, job_input, error=error, error_says=says)


SMALL = {"width": 64, "height": 64, "steps": 1}
CASES: list[Case] = [
    good("plain", seed=1),
    bad("prompt-int", {**SMALL, "prompt": 5}, "INVALID_INPUT", "prompt: Input should be a valid string"),
    good("two-steps", steps=2, seed=2, guidance_scale=1.0),
    bad("unknown-template", {"prompt": "a", "template": "nope"}, "UNKNOWN_TEMPLATE", "'nope'"),
    good("wide", width=128, seed=3),
    bad("prompt-10k", {**SMALL, "prompt": "x" * 10_000}, "INVALID_INPUT", "a 10000-character string"),
    good("tall", height=128, seed=4),
    bad("width-1000", {**SMALL, "prompt": "a", "width": 1000}, "INVALID_INPUT", "multiple of 64"),
    good("template-defaults", template="tiny-defaults", steps=None, seed=5),
    bad("steps-0", {**SMALL, "prompt": "a", "steps": 0}, "INVALID_INPUT", "steps:"),
    good("two-images-seed-wraps", num_images=2, seed=2**64 - 1),
    bad("seed-negative", {**SMALL, "prompt": "a", "seed": -1}, "INVALID_INPUT", "seed:"),
    good("seed-zero", seed=0),
    bad("unknown-field", {**SMALL, "prompt": "a", "cfg": 7}, "INVALID_INPUT", "cfg: unknown field"),
    good("seed-drawn"),
    bad("input-null", None, "INVALID_INPUT", "got nothing"),
    good("long-weighted-prompt", prompt="(a red:1.2) fox " * 40, seed=6),
    bad("input-empty", {}, "INVALID_INPUT", "prompt: required"),
    good("unicode-prompt", prompt="ein Fuchs 🦊 im Schnee, 雪の中の狐", seed=7),
    bad("input-string", "a red fox", "INVALID_INPUT", "got str"),
    good("jpeg", image_format="JPEG", output={"format": "jpeg", "quality": 50}, seed=8),
    bad("input-list", [{"prompt": "a"}], "INVALID_INPUT", "got list"),
    good("webp", image_format="WEBP", output={"format": "webp"}, seed=9),
    bad("input-number", 42, "INVALID_INPUT", "got int"),
    good("scheduler-euler", scheduler="euler", steps=2, seed=10),
    bad("prompt-blank", {**SMALL, "prompt": "   "}, "INVALID_INPUT", "prompt:"),
    good("negative-prompt", negative_prompt="blurry, dark", seed=11),
    bad("width-string", {**SMALL, "prompt": "a", "width": "64"}, "INVALID_INPUT", "width:"),
    # On CPU the worker decodes in fp32, where this VAE does not overflow: a good job of a third template.
    good("hot-vae", template="hot-vae", seed=12),
    bad("steps-float", {**SMALL, "prompt": "a", "steps": 1.5}, "INVALID_INPUT", "steps:"),
    good("explicit-template", template=TEMPLATE, seed=13),
    bad("seed-too-big", {**SMALL, "prompt": "a", "seed": 2**64}, "INVALID_INPUT", "seed:"),
    good("prompt-at-limit", prompt="a fox " * 666 + "fox!", seed=14),
    bad("guidance-31", {**SMALL, "prompt": "a", "guidance_scale": 31}, "INVALID_INPUT", "guidance_scale:"),
    good("guidance-zero", guidance_scale=0.0, seed=15),
    bad("num-images-5", {**SMALL, "prompt": "a", "num_images": 5}, "INVALID_INPUT", "num_images:"),
    good("ddim", scheduler="ddim", seed=16),
    bad("scheduler-unknown", {**SMALL, "prompt": "a", "scheduler": "bogus"}, "INVALID_INPUT", "'bogus'"),
    bad(
        "output-gif", {**SMALL, "prompt": "a", "output": {"format": "gif"}}, "INVALID_INPUT", "output.format"
    ),
    bad(
        "quality-0",
        {**SMALL, "prompt": "a", "output": {"format": "jpeg", "quality": 0}},
        "INVALID_INPUT",
        "quality",
    ),
    bad("output-unknown", {**SMALL, "prompt": "a", "output": {"fmt": "png"}}, "INVALID_INPUT", "output.fmt"),
    bad("template-path", {**SMALL, "prompt": "a", "template": "../etc"}, "INVALID_INPUT", "template:"),
    bad("wrong-name", {**SMALL, "prompt": "a", "template": "wrong-name"}, "MODEL_INVALID", "wrong-name"),
    good("after-a-broken-folder", seed=17),
    bad("no-manifest", {**SMALL, "prompt": "a", "template": "no-manifest"}, "MODEL_INVALID", "no-manifest"),
    bad("black-vae", {**SMALL, "prompt": "a", "template": "black-vae", "seed": 1}, "IMAGE_INVALID", "fp32"),
    bad("width-4096", {**SMALL, "prompt": "a", "width": 4096}, "INVALID_INPUT", "width:"),
    bad(
        "too-many-pixels", {**SMALL, "prompt": "a", "width": 2048, "height": 2048}, "INVALID_INPUT", "budget"
    ),
    bad("negative-5k", {**SMALL, "prompt": "a", "negative_prompt": "n" * 5000}, "INVALID_INPUT", "negative"),
    good("last", seed=18),
]


def expected_parameters(case: Case, volume: Path) -> dict[str, Any]:
    """The resolved parameters a good job must report: request, else the template's defaults (from its
    fuseline.json, as the worker reads them), else the global defaults."""
    request = case.job_input
    template = request.get("template", TEMPLATE)
    manifest = json.loads((volume / "models" / template / "fuseline.json").read_text())
    defaults = {**Defaults().model_dump(), **(manifest.get("defaults") or {})}
    return {
        "template": template,
        "prompt": request["prompt"],
        "negative_prompt": request.get("negative_prompt", defaults["negative_prompt"]),
        "width": request.get("width", defaults["width"]),
        "height": request.get("height", defaults["height"]),
        "steps": request.get("steps", defaults["steps"]),
        "guidance_scale": request.get("guidance_scale", defaults["guidance_scale"]),
        "num_images": request.get("num_images", 1),
        "scheduler": request.get("scheduler", defaults["scheduler"] or "default"),
        "output": {"format": "png", "quality": 90, "return": "base64", **request.get("output", {})},
        # Clip skip (A1111 numbering; 2: SDXL's own layer) and the add-on LoRAs applied (none asked here).
        "clip_skip": request.get("clip_skip", defaults.get("clip_skip") or 2),
        "loras": [],
    }


def check_good(case: Case, body: dict[str, Any], volume: Path) -> None:
    assert set(body) == {"output"}, f"{case.name}: {str(body)[:500]}"
    output = body["output"]
    params = output["parameters"]
    seed = params.pop("seed")
    assert params == expected_parameters(case, volume), case.name
    assert 0 <= seed < 2**64
    if "seed" in case.job_input:
        assert seed == case.job_input["seed"], case.name
    assert len(output["images"]) == case.num_images, case.name
    for index, image in enumerate(output["images"]):
        picture = Image.open(io.BytesIO(base64.b64decode(image["data"], validate=True)))
        picture.load()  # decodes the whole image: a truncated file fails here
        assert picture.format == case.image_format, case.name
        assert picture.size == (params["width"], params["height"]), case.name
        assert image["format"] == params["output"]["format"]
        assert image["seed"] == (seed + index) % 2**64, case.name
    assert output["template"]["id"] == params["template"]
    if params["template"] == TEMPLATE:
        assert output["template"]["model_hash"] == SPEC_HASH
    assert isinstance(output["warnings"], list)


def check_bad(case: Case, body: dict[str, Any]) -> None:
    assert set(body) == {"error"}, f"{case.name}: {str(body)[:500]}"
    error = body["error"]
    assert isinstance(error, str), case.name
    assert error.startswith(f"[{case.error}] "), f"{case.name}: {error[:300]}"
    assert case.error_says in error, f"{case.name}: {error[:500]}"
    # A message that echoes a 10k prompt back would be as big as the request: the worker shortens it.
    assert len(error) < 2000, f"{case.name}: {len(error)}-character error"


# ------------------------------------------------------------------------------------------ the worker


class WorkerProcess:
    """`python -m worker.handler` as RunPod starts it: no flags, the queue's RUNPOD_* variables, the volume.

    Runs under the network guard; `stop()` sends SIGTERM (what RunPod sends) and reports how it ended.
    """

    def __init__(self, queue: RunpodQueue, volume: Path, workdir: Path, **env: str):
        guard_dir = workdir / "netguard"
        guard_dir.mkdir()
        (guard_dir / "sitecustomize.py").write_text(NET_GUARD_SITECUSTOMIZE)
        self.net_log = workdir / "net.jsonl"
        self.log_path = workdir / "worker.log"
        full_env = {key: value for key, value in os.environ.items() if not key.startswith("RUNPOD_")}
        full_env.update(TEST_ENV)
        full_env.update(queue.env())
        full_env.update(
            FUSELINE_VOLUME=str(volume),
            FUSELINE_DEFAULT_TEMPLATE=TEMPLATE,
            # tiny, tiny-defaults, hot-vae and black-vae stay loaded: no reload between jobs.
            FUSELINE_MAX_PIPELINES="4",
            # One OpenMP thread: see one_torch_thread in conftest.py.
            OMP_NUM_THREADS="1",
            # runpod prefers an API key from ~/.runpod/config.toml to RUNPOD_AI_API_KEY: keep a developer's
            # own key out of the test (and the queue's key in).
            HOME=str(workdir),
            FUSELINE_NET_AUDIT_LOG=str(self.net_log),
            PYTHONPATH=os.pathsep.join(filter(None, [str(guard_dir), os.environ.get("PYTHONPATH")])),
        )
        full_env.update(env)
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                WORKER_COMMAND, cwd=workdir, env=full_env, stdout=log, stderr=subprocess.STDOUT
            )
        self.children: set[int] = set()

    def alive(self) -> bool:
        # The SDK's heartbeat is a child process: note it while the worker lives, to check it ends too.
        with contextlib.suppress(OSError):
            path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            self.children.update(int(pid) for pid in path.read_text().split())
        return self.proc.poll() is None

    def stop(self) -> tuple[int | None, list[int]]:
        """SIGTERM; the exit status (None: still running after STOP_TIMEOUT_S) and children left behind."""
        self.alive()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            returncode = self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            returncode = None
        orphans = [pid for pid in self.children if not wait_until(lambda pid=pid: not pid_alive(pid), 10)]
        return returncode, orphans

    def kill(self) -> None:
        """Last resort in a `finally`: the worker and the children it started, by pid."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in self.children:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text()

    def net(self) -> list[dict[str, Any]]:
        if not self.net_log.exists():
            return []
        return [json.loads(line) for line in self.net_log.read_text().splitlines()]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, waiting to be reaped) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.fixture
def loop_run(volume: Path, tmp_path: Path) -> dict[str, Any]:
    """Queue every case, run the worker until each has a result, SIGTERM it; everything observed."""
    with RunpodQueue() as queue:
        ids = [queue.put(case.job_input, job_id=f"job-{i:02d}-{case.name}") for i, case in enumerate(CASES)]
        worker = WorkerProcess(queue, volume, tmp_path)
        try:
            started = time.monotonic()
            try:
                results = queue.wait(ids, timeout=START_TIMEOUT_S, alive=worker.alive)
            except TimeoutError as exc:
                pytest.fail(f"{exc}\nworker log:\n{worker.log()[-4000:]}")
            elapsed = time.monotonic() - started
            # The last job's final progress update may still be on its way (each is sent from its own thread).
            generating = {ids[i] for i, case in enumerate(CASES) if case.image_format}
            wait_until(lambda: generating <= {p.job_id for p in queue.progress()}, 10)
            alive_at_end = worker.alive()
            returncode, orphans = worker.stop()
        finally:
            worker.kill()
    return {
        "queue": queue,
        "ids": ids,
        "results": results,
        "elapsed": elapsed,
        "alive_at_end": alive_at_end,
        "returncode": returncode,
        "orphans": orphans,
        "pid": worker.proc.pid,
        "net": worker.net(),
        "log": worker.log(),
    }


@pytest.mark.slow
def test_real_worker_loop_serves_50_mixed_jobs(loop_run: dict[str, Any], volume: Path) -> None:
    queue: RunpodQueue = loop_run["queue"]
    ids, results, log = loop_run["ids"], loop_run["results"], loop_run["log"]
    assert len(CASES) == 50 and len({c.name for c in CASES}) == 50
    assert sum(c.error is None for c in CASES) >= 20

    # Every job answered once, with the right kind of answer; the conversation kept to the protocol.
    assert queue.protocol_errors() == []
    assert queue.taken() == ids, "jobs taken out of order, twice, or not at all"
    assert queue.waiting() == []
    # All cases checked before failing, so one run shows every job that came back wrong.
    wrong = []
    for job_id, case in zip(ids, CASES, strict=True):
        try:
            if case.error is None:
                check_good(case, results[job_id], volume)
            else:
                check_bad(case, results[job_id])
        except AssertionError as exc:
            wrong.append(f"{job_id}: {exc}")
    assert not wrong, "\n".join(wrong)

    # The worker survived every job and stopped cleanly: exit status 0, its heartbeat process gone too.
    assert loop_run["alive_at_end"], log[-4000:]
    assert loop_run["returncode"] == 0, log[-4000:]
    assert loop_run["orphans"] == [], "the heartbeat process outlived the worker"
    for problem in ("Failed to return job results", "Failed to get job", "Traceback", "Uncaught exception"):
        assert problem not in log, log[-4000:]

    # Every request carried the API key, named this worker, and took jobs with the in-progress flag.
    requests = queue.requests()
    assert requests and all(r.authorized for r in requests)
    takes = [r for r in requests if "/job-take/" in r.path]
    assert {r.query["job_in_progress"] for r in takes} == {"0"}, "concurrency 1: nothing in progress"

    # Heartbeats: at least one, each naming the SDK version and only jobs the worker had taken.
    pings = queue.pings()
    assert pings, "no heartbeat reached the queue"
    for ping in pings:
        assert ping["runpod_version"] == importlib.metadata.version("runpod")
        assert set(filter(None, ping.get("job_id", "").split(","))) <= set(ids)

    # Progress: well-formed, only for jobs that generate, each ending with its last step.
    progress = queue.progress()
    steps_of = {
        job_id: results[job_id]["output"]["parameters"]["steps"]
        for job_id in ids
        if "output" in results[job_id]
    }
    generating = {job_id for job_id, case in zip(ids, CASES, strict=True) if case.name == "black-vae"}
    generating |= set(steps_of)
    assert {p.job_id for p in progress} == generating
    for update in progress:
        out = update.output
        assert {"step", "steps", "percent"} <= set(out), out
        assert all(isinstance(out[key], int) for key in ("step", "steps", "percent")), out
        assert 1 <= out["step"] <= out["steps"] and out["percent"] == round(100 * out["step"] / out["steps"])
        if update.job_id in steps_of:
            assert out["steps"] == steps_of[update.job_id], (update.job_id, out)
    for job_id in steps_of:
        assert any(p.job_id == job_id and p.output["step"] == p.output["steps"] for p in progress), job_id

    # Nothing left 127.0.0.1: no connect, lookup or datagram elsewhere, from the worker or its heartbeat.
    # The guard is live in both processes (it saw each reach the queue), so "nothing blocked" means
    # something; test_system_checks_would_probe_the_network shows it catches the SDK's 8.8.8.8 probe.
    net = loop_run["net"]
    to_queue = {n["pid"] for n in net if n.get("address") == ["127.0.0.1", queue.port]}
    assert loop_run["pid"] in to_queue, "the network guard saw no queue traffic from the worker"
    assert to_queue - {loop_run["pid"]}, "the network guard saw no traffic from the heartbeat process"
    assert [n for n in net if n["blocked"]] == []
    print(
        f"50 jobs in {loop_run['elapsed']:.1f} s after start; "
        f"{len(pings)} pings; {len(progress)} progress updates "
        f"({sum(p.after_result for p in progress)} after their job's result)"
    )


@pytest.mark.slow
def test_system_checks_would_probe_the_network(volume: Path, tmp_path: Path) -> None:
    """The control for the test above: with RUNPOD_SKIP_AUTO_SYSTEM_CHECKS=false set explicitly (production
    mode only sets a default), the SDK's fitness checks try 8.8.8.8:53 before taking any job. The guard
    refuses it, so the check fails, the SDK reports the worker unhealthy on the ping URL and exits 1.
    This proves both that the guard sees the probe and that production mode's default is what stops it."""
    with RunpodQueue() as queue:
        queue.put({"prompt": "never taken", **SMALL})
        worker = WorkerProcess(
            queue,
            volume,
            tmp_path,
            RUNPOD_SKIP_AUTO_SYSTEM_CHECKS="false",
            # The memory and disk checks run first; on a busy test machine they must not fail instead.
            RUNPOD_MIN_MEMORY_GB="0",
            RUNPOD_MIN_DISK_PERCENT="0",
            FUSELINE_PRELOAD=TEMPLATE,
        )
        try:
            exited = wait_until(lambda: not worker.alive(), START_TIMEOUT_S)
        finally:
            worker.kill()
        assert exited, worker.log()[-4000:]
    assert worker.proc.returncode == 1, worker.log()[-4000:]
    blocked = [n for n in worker.net() if n["blocked"]]
    assert [(n["event"], n["address"]) for n in blocked] == [("socket.connect", ["8.8.8.8", 53])]
    assert "Fitness check failed: _network_check" in worker.log()
    unhealthy = [p for p in queue.pings() if p.get("status") == "unhealthy"]
    assert [p["check"] for p in unhealthy] == ["_network_check"]
    assert queue.taken() == [], "no job may be taken before the fitness checks pass"
    assert queue.protocol_errors() == []


def test_queue_speaks_the_sdk_protocol() -> None:
    """RunpodQueue alone (fast): the requests the SDK makes, with URLs built as the SDK builds them."""
    with RunpodQueue(poll_s=0.05) as queue:
        env = queue.env()
        worker = queue.worker_id
        take_url = env["RUNPOD_WEBHOOK_GET_JOB"].replace("$ID", worker)  # rp_job.py:23
        done_url = env["RUNPOD_WEBHOOK_POST_OUTPUT"].replace("$RUNPOD_POD_ID", worker)  # rp_http.py:19

        def call(url: str, body: dict | None = None, key: str = queue.api_key) -> tuple[int, Any]:
            data = None if body is None else json.dumps(body).encode()
            headers = {"Authorization": key, "Content-Type": "application/x-www-form-urlencoded"}
            request = urllib.request.Request(url, data=data, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    raw = response.read()
                    return response.status, json.loads(raw) if raw else None
            except urllib.error.HTTPError as exc:
                return exc.code, None

        assert call(take_url + "&job_in_progress=0") == (204, None)
        first = queue.put({"prompt": "a"})
        second = queue.put("not an object")
        assert call(take_url + "&job_in_progress=0") == (200, {"id": first, "input": {"prompt": "a"}})
        batch_url = take_url.replace("/job-take/", "/job-take-batch/") + "&batch_size=3&job_in_progress=1"
        assert call(batch_url) == (200, [{"id": second, "input": "not an object"}])
        assert queue.waiting() == [] and queue.taken() == [first, second]

        progress = {"status": "IN_PROGRESS", "output": {"step": 1, "steps": 2, "percent": 50}}
        assert call(done_url.replace("$ID", first) + "&isStream=false", progress)[0] == 200
        assert call(done_url.replace("$ID", first) + "&isStream=false", {"output": {"images": []}})[0] == 200
        assert (
            call(done_url.replace("$ID", second) + "&isStream=false", {"error": "[INVALID_INPUT] x"})[0]
            == 200
        )
        assert queue.results() == {first: {"output": {"images": []}}, second: {"error": "[INVALID_INPUT] x"}}
        assert [(p.job_id, p.after_result) for p in queue.progress()] == [(first, False)]
        assert queue.protocol_errors() == []

        # Each breach of the protocol is refused and recorded.
        assert call(take_url + "&job_in_progress=0", key="wrong")[0] == 401
        assert call(done_url.replace("$ID", "never-taken") + "&isStream=false", {"output": 1})[0] == 404
        assert call(done_url.replace("$ID", first) + "&isStream=false", {"output": 2})[0] == 409
        assert call(take_url)[0] == 204  # served, but job_in_progress is missing
        errors = queue.protocol_errors()
        assert len(errors) == 4, errors
        assert "Authorization" in errors[0] and "never took" in errors[1] and "second final" in errors[2]
        assert "job_in_progress" in errors[3]
