"""The lock files are one truth: every package the image or CI installs is pinned by version and hash, the
image installs requirements/worker.lock, and CI's CPU install differs from it only by torch's build."""

import re
import tomllib
from pathlib import Path

from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")
# What PyPI's Linux torch wheel pulls in for CUDA and the CPU build does not need.
CUDA_ONLY = re.compile(r"^(nvidia-.*|cuda-.*|triton)$")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(name: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) for every pin of requirements/<name>; fails on a pin without a hash."""
    pins: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = PIN.match(stripped)
        if match:
            current = normalize(match.group(1))
            assert current not in pins, f"requirements/{name}: {current} pinned twice"
            pins[current] = (match.group(2), [])
        elif stripped.startswith("--hash="):
            assert current, f"requirements/{name}: a hash before any pin"
            assert HASH.search(stripped), f"requirements/{name}: `{stripped}` is not a sha256 hash"
            pins[current][1].append(stripped)
        else:
            raise AssertionError(f"requirements/{name}: unexpected line `{stripped}`")
    for package, (version, hashes) in pins.items():
        assert hashes, f"requirements/{name}: {package}=={version} has no --hash"
    return pins


def test_every_lock_pins_every_package_with_hashes():
    for name in ("worker.lock", "worker-cpu.lock", "build.lock"):
        assert len(read_lock(name)) > 20, name


def test_the_worker_lock_carries_the_cuda_wheels_of_its_torch():
    worker = read_lock("worker.lock")
    assert "+" not in worker["torch"][0], "the image installs PyPI's torch, not a local build"
    cuda = {name for name in worker if CUDA_ONLY.match(name)}
    assert {"nvidia-cublas", "nvidia-cudnn-cu13", "nvidia-cuda-runtime", "triton"} <= cuda, sorted(cuda)


def test_the_cpu_lock_differs_from_the_image_lock_only_by_the_torch_build():
    """CI and development install worker-cpu.lock. The one allowed difference from the image's lock: torch's
    CPU build of the same release in place of PyPI's CUDA build, without the CUDA-only wheels it pulls."""
    worker, cpu = read_lock("worker.lock"), read_lock("worker-cpu.lock")
    assert cpu["torch"][0] == worker["torch"][0] + "+cpu"
    dropped = set(worker) - set(cpu)
    assert dropped and all(CUDA_ONLY.match(name) for name in dropped), sorted(dropped)
    assert not set(cpu) - set(worker), sorted(set(cpu) - set(worker))
    for name in set(cpu) - {"torch"}:
        assert cpu[name] == worker[name], (
            f"{name}: {cpu[name][0]} in worker-cpu.lock, {worker[name][0]} in worker.lock"
        )


def test_locks_do_not_overlap_and_the_worker_lock_has_no_build_side():
    worker, build = read_lock("worker.lock"), read_lock("build.lock")
    both = sorted(set(worker) & set(build))
    assert not both, f"packages pinned in both lock files: {both}"
    for build_only in ("dvc", "dvc-s3", "pytest", "uv"):
        assert build_only not in worker, f"{build_only} must not be in the worker image"
        assert build_only in build


def test_the_image_installs_the_worker_lock_with_hashes_and_ci_installs_its_cpu_twin():
    dockerfile = DockerfileParser(path=str(ROOT / "Dockerfile"))
    copies = [i["value"].split() for i in dockerfile.structure if i["instruction"] == "COPY"]
    assert ["requirements/worker.lock", "/tmp/worker.lock"] in copies
    runs = " ".join(i["value"] for i in dockerfile.structure if i["instruction"] == "RUN")
    assert re.search(r"pip install [^&]*--require-hashes[^&]*-r /tmp/worker\.lock", runs), runs
    makefile = (ROOT / "Makefile").read_text()
    assert "worker_lock=requirements/worker-cpu.lock" in makefile
    assert "--require-hashes -r $$worker_lock -r requirements/build.lock" in makefile
    assert "make setup" in (ROOT / ".ci" / "run").read_text()


def test_lock_pins_match_pyproject_pins():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    locked = {
        name: version for name, (version, _) in (read_lock("worker.lock") | read_lock("build.lock")).items()
    }
    extras = pyproject["project"]["optional-dependencies"]
    for requirement in extras["worker"] + extras["build"]:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", requirement)
        if match:
            found = locked.get(normalize(match.group(1)))
            assert found == match.group(2), f"pyproject pins {requirement}, lock has {found}"
    assert locked["transformers"].startswith("5."), "both halves need transformers 5.x"


def test_dockerignore_keeps_models_and_tests_out():
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore, ".dockerignore must deny everything, then allow what the image copies"
    allowed = [line[1:] for line in ignore if line.startswith("!")]
    for path in allowed:
        assert not path.startswith(("artifacts", "tests", ".dvc")), path
