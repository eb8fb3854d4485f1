"""The worker's lock file is one truth: the Docker image and CI install the same pins, and the two lock
files never disagree about a package."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def read_lock(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)==([^\s;]+)", line)
        assert match, f"requirements/{name}: `{line}` is not an exact `name==version` pin"
        pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def test_dockerfile_installs_the_worker_lock_that_ci_installs():
    dockerfile = (ROOT / "Dockerfile").read_text()
    installs = re.findall(r"pip install[^\n]*-r\s+(\S+)", dockerfile)
    copied = re.findall(r"COPY\s+(requirements/\S+)\s+(\S+)", dockerfile)
    assert copied == [("requirements/worker.lock", "/tmp/worker.lock")]
    assert installs == ["/tmp/worker.lock"]
    makefile = (ROOT / "Makefile").read_text()
    assert "-r requirements/worker.lock -r requirements/build.lock" in makefile
    assert "make setup" in (ROOT / ".ci" / "run").read_text()


def test_locks_do_not_overlap_and_the_worker_lock_has_no_build_side():
    worker, build = read_lock("worker.lock"), read_lock("build.lock")
    both = sorted(set(worker) & set(build))
    assert not both, f"packages pinned in both lock files: {both}"
    for build_only in ("dvc", "dvc-s3", "pytest"):
        assert build_only not in worker, f"{build_only} must not be in the worker image"
        assert build_only in build


def test_lock_pins_match_pyproject_pins():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    locked = read_lock("worker.lock") | read_lock("build.lock")
    extras = pyproject["project"]["optional-dependencies"]
    for requirement in extras["worker"] + extras["build"]:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", requirement)
        if match:
            name = match.group(1).lower()
            found = locked.get(name)
            assert found == match.group(2), f"pyproject pins {requirement}, lock has {found}"
    assert locked["torch"] == "2.13.0"
    assert locked["transformers"].startswith("5."), "both halves need transformers 5.x"


def test_dockerignore_keeps_models_and_tests_out():
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore, ".dockerignore must deny everything, then allow what the image copies"
    allowed = [line[1:] for line in ignore if line.startswith("!")]
    for path in allowed:
        assert not path.startswith(("artifacts", "tests", ".dvc")), path
