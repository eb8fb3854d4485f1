"""The image the image tests run and the buildah storage holding it, as `make image` recorded them in
build/fuseline-worker.json (tools/build_image.sh), and a buildah runner they share."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD_INFO = REPO / "build" / "fuseline-worker.json"
_BUILT = json.loads(BUILD_INFO.read_text()) if BUILD_INFO.is_file() else {}
IMAGE = os.environ.get("FUSELINE_IMAGE") or _BUILT.get("image", "localhost/fuseline-worker:dev")
BUILDAH = ("buildah", "--storage-driver", _BUILT.get("storage_driver", "overlay"))


def build_info() -> dict:
    if not BUILD_INFO.is_file():
        pytest.fail(f"{BUILD_INFO.relative_to(REPO)} not found: run `make image` first")
    return json.loads(BUILD_INFO.read_text())


def buildah(*args: str, timeout: float = 120) -> str:
    result = subprocess.run([*BUILDAH, *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"buildah {' '.join(args)}: {result.stderr[-2000:]}"
    return result.stdout.strip()


def image_command() -> list[str]:
    """The image's own entry point: ENTRYPOINT + CMD from its config."""
    config = json.loads(buildah("inspect", "--type", "image", IMAGE))["OCIv1"]["config"]
    return [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])]
