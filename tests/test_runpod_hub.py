"""RunPod Hub metadata (`.runpod/hub.json`, `.runpod/tests.json`, the format runpod-workers/worker-sdxl
uses): every environment variable the Hub form offers is one the worker really reads and docs/operations.md
documents, the form's defaults start a worker, the CUDA versions agree with the image, and every Hub test
input is a job the worker accepts.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from fuseline.core.logs import resolve_level
from worker.settings import WorkerSettings, load_settings

REPO = Path(__file__).resolve().parents[1]
HUB = json.loads((REPO / ".runpod" / "hub.json").read_text())
TESTS = json.loads((REPO / ".runpod" / "tests.json").read_text())
# The standard boto3 variables the one S3 client factory (fuseline/core/s3.py) reads.
AWS_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"}
# Read by the log set-up every entry point shares (fuseline/core/logs.py), not by a settings model.
LOG_VARIABLES = {"FUSELINE_LOG_LEVEL", "FUSELINE_LOG_FORMAT"}
INPUT_TYPES = {"string": str, "number": (int, float), "boolean": bool}


def setting_variables(model: type[BaseModel]) -> set[str]:
    """Every FUSELINE_* variable a settings model (and the models nested in it) reads."""
    names: set[str] = set()
    for field in model.model_fields.values():
        if isinstance(field.validation_alias, str):
            names.add(field.validation_alias)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            names |= setting_variables(field.annotation)
    return names


def hub_env() -> list[dict]:
    return HUB["config"]["env"]


def test_the_hub_card_has_the_fields_the_hub_reads():
    assert HUB["type"] == "serverless" and HUB["config"]["runsOn"] == "GPU"
    assert HUB["title"] and HUB["description"] and HUB["category"]
    assert isinstance(HUB["config"]["containerDiskInGb"], int)
    for entry in hub_env():
        form = entry["input"]
        assert set(form) <= {"name", "type", "description", "default", "options", "advanced"}, entry["key"]
        assert form["name"] and form["description"], entry["key"]
        assert form["type"] in INPUT_TYPES, entry["key"]
        if "default" in form:
            assert isinstance(form["default"], INPUT_TYPES[form["type"]]), entry["key"]
        for option in form.get("options", []):
            assert set(option) == {"label", "value"}, entry["key"]
        if "options" in form and "default" in form:
            assert form["default"] in [option["value"] for option in form["options"]], entry["key"]


def test_every_hub_variable_is_read_by_the_worker_and_documented():
    known = setting_variables(WorkerSettings) | AWS_VARIABLES | LOG_VARIABLES
    operations = (REPO / "docs" / "operations.md").read_text()
    for entry in hub_env():
        key = entry["key"]
        assert key in known, f"{key}: the worker reads no such variable"
        assert f"`{key}`" in operations, f"{key}: not documented in docs/operations.md"
    assert "FUSELINE_RELEASE" in {entry["key"] for entry in hub_env()}


def test_the_forms_defaults_start_a_worker():
    env = {
        entry["key"]: str(entry["input"]["default"])
        for entry in hub_env()
        if entry["key"].startswith("FUSELINE_") and entry["input"].get("default") not in (None, "")
    }
    settings = load_settings(env)
    for entry in hub_env():
        if entry["key"] == "FUSELINE_LOG_LEVEL":
            for option in entry["input"]["options"]:
                resolve_level({"FUSELINE_LOG_LEVEL": option["value"]})
    assert settings.max_pipelines == int(env.get("FUSELINE_MAX_PIPELINES", settings.max_pipelines))


def test_the_cuda_versions_are_the_images():
    dockerfile = (REPO / "Dockerfile").read_text()
    required = re.search(r'NVIDIA_REQUIRE_CUDA="cuda>=(\d+\.\d+)"', dockerfile)
    assert required, "the Dockerfile states the CUDA version its torch needs"
    minimum = tuple(int(part) for part in required.group(1).split("."))
    for versions in (HUB["config"]["allowedCudaVersions"], TESTS["config"]["allowedCudaVersions"]):
        assert versions
        assert all(tuple(int(part) for part in version.split(".")) >= minimum for version in versions)


@pytest.mark.parametrize("test", TESTS["tests"], ids=[test["name"] for test in TESTS["tests"]])
def test_every_hub_test_runs_through_the_hubs_handler_file(test, tmp_path):
    """Each Hub test as the Hub runs it, on a worker with the test's environment and an empty volume (the
    Hub's test endpoint reaches no bucket of ours), started through .runpod/handler.py, the entry file the
    Hub looks for."""
    env = {entry["key"]: entry["value"] for entry in TESTS["config"].get("env", [])}
    assert set(env) <= setting_variables(WorkerSettings) | AWS_VARIABLES | LOG_VARIABLES
    assert 0 < test["timeout"] <= 600_000
    result = tmp_path / "result.json"
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / ".runpod" / "handler.py"),
            "--test_input",
            json.dumps({"input": test["input"]}),
            "--output_json",
            str(result),
        ],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "FUSELINE_VOLUME": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Job local_test completed successfully." in run.stdout
    answer = json.loads(result.read_text())
    assert "error" not in answer, answer
    if test["input"].get("action") == "describe":
        assert answer["templates"] == {} and answer["limits"]
