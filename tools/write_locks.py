"""`make lock`: compile requirements/*.in into hash-pinned lock files with uv (one resolver, three outputs).

- requirements/worker.lock: everything the worker image installs, for linux x86-64 / CPython 3.11, with
  PyPI's torch and the CUDA wheels it pulls (nvidia-*, cuda-*, triton). The Dockerfile installs exactly it.
- requirements/worker-cpu.lock: the same set with torch's CPU build of the same release in place of the
  CUDA one (and without the packages only the CUDA build needs). CPU machines (CI, development) install it;
  tests/test_locks.py checks that this is the only difference.
- requirements/build.lock: the build side and development tools, resolved together with the worker set
  (so both halves agree) and written without the packages the worker lock already pins.

uv is used instead of pip-tools because it resolves for a target platform (`--python-platform`) from any
machine, which the CUDA wheels need: a CPU-only machine would otherwise never see torch's Linux CUDA
requirements. Pins already in the lock files are kept unless a `.in` file asks for something else
(they are passed as constraints), so re-locking does not move versions by itself.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REQUIREMENTS = Path("requirements")
PLATFORM = ["--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28"]
HEADERS = {
    "worker.lock": """\
# Worker (serving side) lock: exactly what the Docker image installs (`pip install --require-hashes`),
# for linux x86-64 / CPython 3.11, CUDA wheels included. No DVC, no git tooling.
# Regenerate with `make lock` (tools/write_locks.py); edit requirements/worker.in, not this file.
""",
    "worker-cpu.lock": """\
# requirements/worker.lock with the CPU build of the same torch release in place of PyPI's CUDA build
# (and without the nvidia-*/cuda-*/triton wheels only that build needs): what CI and development machines
# install. tests/test_locks.py checks that nothing else differs. Regenerate with `make lock`.
""",
    "build.lock": """\
# Build side and development lock: everything beyond the worker lock (DVC, huggingface_hub, test and
# lint tools), resolved together with it. Install together with worker.lock or worker-cpu.lock; a test
# checks that the files never pin the same package. Regenerate with `make lock`.
""",
}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def blocks(text: str) -> list[tuple[str, str]]:
    """Split uv's output into (normalized name, block text) per pinned package; comments stay with their
    package, the header lines before the first pin are dropped."""
    found: list[tuple[str, str]] = []
    for line in text.splitlines(keepends=True):
        match = PIN.match(line)
        if match:
            found.append((normalize(match.group(1)), line))
        elif found:
            name, block = found[-1]
            found[-1] = (name, block + line)
    return found


def compile_lock(source: Path, output: Path, constraints: list[Path], extra: list[str], workdir: Path) -> str:
    """Run uv on `source` into `output` (whose current pins uv prefers) and return the pins it wrote."""
    command = ["uv", "pip", "compile", str(source), *PLATFORM, "--generate-hashes", "--no-header"]
    command += ["--quiet", "--output-file", str(output), *extra]
    for path in constraints:
        command += ["--constraint", str(path)]
    subprocess.run(command, check=True)
    # uv names the constraint files it was given in `# via` comments: show them by their file name, not
    # by the temporary folder they lived in during this run.
    return output.read_text().replace(str(workdir) + "/", "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--torch-cpu-links",
        required=True,
        help="a --find-links location holding the CPU wheel of the locked torch release",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fuseline-lock-") as tmp:
        work = Path(tmp)
        worker = compile_lock(REQUIREMENTS / "worker.in", REQUIREMENTS / "worker.lock", [], [], work)
        (REQUIREMENTS / "worker.lock").write_text(HEADERS["worker.lock"] + worker)
        torch = next(block for name, block in blocks(worker) if name == "torch")
        version = PIN.match(torch).group(2)

        image = work / "worker-lock.txt"
        image.write_text(worker)
        override = work / "torch-cpu.txt"
        override.write_text(f"torch=={version}+cpu\n")
        cpu_flags = ["--find-links", args.torch_cpu_links, "--override", str(override)]
        cpu = compile_lock(
            REQUIREMENTS / "worker.in", REQUIREMENTS / "worker-cpu.lock", [image], cpu_flags, work
        )
        (REQUIREMENTS / "worker-cpu.lock").write_text(HEADERS["worker-cpu.lock"] + cpu)

        cpu_lock = work / "worker-cpu-lock.txt"
        cpu_lock.write_text(cpu)
        build = REQUIREMENTS / "build.lock"
        everything = compile_lock(REQUIREMENTS / "build.in", build, [cpu_lock], cpu_flags, work)
        worker_names = {name for name, _ in blocks(worker)} | {name for name, _ in blocks(cpu)}
        rest = [
            block for name, block in blocks(everything) if name not in worker_names and name != "fuseline"
        ]
        build.write_text(HEADERS["build.lock"] + "".join(rest))
    print(
        "wrote requirements/worker.lock, requirements/worker-cpu.lock, requirements/build.lock",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
