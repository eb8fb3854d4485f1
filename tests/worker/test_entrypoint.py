"""`python -m worker.handler` as RunPod runs it locally: --test_input, the local API, test_input.json."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from tests.worker.conftest import SMALL, TEMPLATE, TEST_ENV

REPO = Path(__file__).resolve().parents[2]
WORKER_COMMAND = (sys.executable, "-m", "worker.handler")
JOB = {"input": {"prompt": "a (red:1.3) fox", **SMALL, "seed": 11}}


def worker_env(volume: Path) -> dict[str, str]:
    env = {**os.environ, **TEST_ENV, "FUSELINE_VOLUME": str(volume), "FUSELINE_DEFAULT_TEMPLATE": TEMPLATE}
    # One OpenMP thread: see one_torch_thread in conftest.py.
    env["OMP_NUM_THREADS"] = "1"
    env.pop("RUNPOD_WEBHOOK_GET_JOB", None)
    return env


def assert_png_output(output: dict) -> None:
    (image,) = output["images"]
    picture = Image.open(io.BytesIO(base64.b64decode(image["data"])))
    assert picture.format == "PNG" and picture.size == (64, 64)
    assert image["seed"] == 11
    assert output["parameters"]["prompt"] == "a (red:1.3) fox"
    assert (output["parameters"]["steps"], output["parameters"]["template"]) == (3, TEMPLATE)


@pytest.mark.slow
def test_test_input_flag_runs_one_job(volume: Path, tmp_path: Path) -> None:
    result_path = tmp_path / "result.json"
    proc = subprocess.run(
        [*WORKER_COMMAND, "--test_input", json.dumps(JOB), "--output_json", str(result_path)],
        cwd=tmp_path,
        env=worker_env(volume),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Job local_test completed successfully." in proc.stdout
    assert_png_output(json.loads(result_path.read_text()))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_local_api_runsync(volume: Path, tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [*WORKER_COMMAND, "--rp_serve_api", "--rp_api_host", "127.0.0.1", "--rp_api_port", str(port)],
        cwd=tmp_path,
        env=worker_env(volume),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}/runsync"
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                result = post(url, JOB)
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert result["status"] == "COMPLETED", result
        assert_png_output(result["output"])

        failed = post(url, {"input": {"prompt": "a", "template": "nope"}})
        assert failed["status"] == "FAILED"
        assert failed["error"].startswith("[UNKNOWN_TEMPLATE] no template 'nope' in ")
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_repo_test_input_json_is_a_valid_job() -> None:
    from worker.inputs import parse_input
    from worker.settings import WorkerSettings

    job = json.loads((REPO / "test_input.json").read_text())
    assert set(job) == {"input"}
    request = parse_input(job["input"], WorkerSettings(default_template="any"))
    assert request.prompt


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("FUSELINE_SYNC_WORKERS", "eight", "FUSELINE_SYNC_WORKERS='eight' is not an integer"),
        # Issue 16: a device torch does not know was a raw traceback and exit status 1.
        ("FUSELINE_DEVICE", "tpu", "FUSELINE_DEVICE='tpu' is not a device this worker runs on"),
    ],
)
def test_a_bad_setting_stops_the_start_with_config_invalid(
    volume: Path, tmp_path: Path, variable: str, value: str, expected: str
) -> None:
    # Issue 15: FUSELINE_SYNC_WORKERS=eight reached the start-up sync and crashed it with a traceback; every
    # FUSELINE_* value is parsed once, before anything runs, and a bad one is CONFIG_INVALID naming it.
    env = worker_env(volume) | {
        "FUSELINE_RELEASE": str(tmp_path / "remote/releases/main.json"),
        variable: value,
        "FUSELINE_LOG_FORMAT": "json",
    }
    proc = subprocess.run(
        [*WORKER_COMMAND, "--test_input", json.dumps(JOB)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    records = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    (invalid,) = [r for r in records if r["event"] == "worker.config_invalid"]
    assert invalid["message"].startswith("[CONFIG_INVALID] ")
    assert expected in invalid["message"]
