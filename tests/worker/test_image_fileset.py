"""The worker image holds exactly `fuseline/__init__.py`, `fuseline/core/` and `worker/` (Dockerfile's COPY
lines, .dockerignore's allow-list): the worker's entry points import from those files alone."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IMAGE_CODE = ("fuseline/__init__.py", "fuseline/core/", "worker/")


def dockerfile_code_paths() -> list[str]:
    """The repo paths the Dockerfile's COPY lines bring in (not the build stages' or the lock file)."""
    paths = []
    for line in (REPO / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--") for w in words):
            paths += [w for w in words[1:-1] if w.startswith(("fuseline", "worker"))]
    return paths


def test_dockerfile_and_dockerignore_name_the_image_code() -> None:
    assert sorted(dockerfile_code_paths()) == sorted(IMAGE_CODE)
    allowed = [line[1:] for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    assert sorted(allowed) == sorted(["requirements/worker.lock", *IMAGE_CODE])


def test_the_worker_imports_from_the_image_files_alone(tmp_path: Path) -> None:
    for relative in IMAGE_CODE:
        source, target = REPO / relative, tmp_path / relative
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    # -I -S: no user site, no site-packages processing (its .pth files would put the repo back on the path
    # through the editable install); site-packages is appended by hand, for the locked dependencies.
    site_packages = sysconfig.get_paths()["purelib"]
    code = (
        f"import sys; sys.path[:0] = [{str(tmp_path)!r}]; sys.path.append({site_packages!r})\n"
        "import worker.handler, worker.sync, worker.sync.cli, worker.fallback\n"
        "loaded = {m.__name__: getattr(m, '__file__', None) or '' for m in list(sys.modules.values())}\n"
        "tops = ('fuseline', 'stages', 'worker', 'testkit')\n"
        "ours = {n: f for n, f in loaded.items() if n.split('.')[0] in tops}\n"
        f"outside = sorted(n for n, f in ours.items() if not f.startswith({str(tmp_path)!r}))\n"
        "assert not outside, outside\n"
        "assert not [n for n in ours if n.split('.')[0] in ('stages', 'testkit')], sorted(ours)\n"
        "print(len(ours))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout) > 10  # the worker's modules and the core's, all from the copy
