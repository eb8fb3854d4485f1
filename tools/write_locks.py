"""Split two `pip freeze` outputs (worker alone, everything) into requirements/{worker,build}.lock."""

import sys
from pathlib import Path

WORKER_HEADER = """\
# Worker (serving side) lock: the exact set the Docker image installs and CI installs.
# No DVC, no git tooling. torch is pinned without a local version: pip here takes the CPU wheel
# that lies on disk (+cpu), the image takes PyPI's CUDA build of the same release.
# setuptools is pinned too (torch needs it at run time; plain `pip freeze` omits it). On a machine
# without the local CPU wheel, torch==2.13.0 also pulls its CUDA libraries (nvidia-*, triton), which
# this CPU-made lock does not pin.
# Regenerate: see `make lock` in the Makefile.
"""
BUILD_HEADER = """\
# Build side and development lock: everything beyond requirements/worker.lock (DVC,
# huggingface_hub, test and lint tools). Install together with worker.lock; a test checks that the
# two never name the same package.
# Regenerate: see `make lock` in the Makefile.
"""


def read_freeze(path: str) -> dict[str, str]:
    pins = {}
    for line in Path(path).read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.strip().split("==", 1)
            pins[name] = version.split("+", 1)[0]  # drop local versions such as +cpu
    return pins


def main(worker_freeze: str, all_freeze: str) -> None:
    worker, everything = read_freeze(worker_freeze), read_freeze(all_freeze)
    drift = {n: (v, everything.get(n)) for n, v in worker.items() if everything.get(n) != v}
    if drift:
        raise SystemExit(
            f"the worker set resolves differently inside the full set: {drift}; pin these in worker.in"
        )
    worker_names = {n.lower() for n in worker}

    def lines(pins):
        return "".join(f"{n}=={v}\n" for n, v in sorted(pins.items(), key=lambda kv: kv[0].lower()))

    rest = {n: v for n, v in everything.items() if n.lower() not in worker_names and n.lower() != "fuseline"}
    Path("requirements/worker.lock").write_text(WORKER_HEADER + lines(worker))
    Path("requirements/build.lock").write_text(BUILD_HEADER + lines(rest))


if __name__ == "__main__":
    main(*sys.argv[1:])
