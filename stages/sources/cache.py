"""The shared download cache: files stored by content, `<root>/sha256/<2 hex>/<64 hex>`, with a sidecar
`<64 hex>.json` (source, size, when), and `<root>/locks/<64 hex>.lock` held while one is filled. A file's
path comes from its hash only: never from a server's Content-Disposition or a URL, so no download can
choose where it lands.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from fuseline.core.files import atomic_write, local_lock
from fuseline.core.redact import redact
from stages.settings import BuildSettings
from stages.sources.errors import SourceError

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class DownloadCache:
    """Content-addressed files under `root` (default: the build settings' download cache). Safe across
    processes: filling one hash holds a lock on it, so two DVC stages fetching the same LoRA download it
    once."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else BuildSettings.from_env().download_cache

    def path_for(self, sha256: str) -> Path:
        sha = _check_sha(sha256)
        return self.root / "sha256" / sha[:2] / sha

    def sidecar_for(self, sha256: str) -> Path:
        path = self.path_for(sha256)
        return path.with_name(path.name + ".json")

    def get(self, sha256: str) -> Path | None:
        """The cached file, or None. Checks size against the sidecar (cheap), not the hash: files get
        here only through a verified rename."""
        path = self.path_for(sha256)
        if not path.is_file():
            return None
        with contextlib.suppress(OSError, ValueError):
            size = json.loads(self.sidecar_for(sha256).read_text()).get("size")
            if size is not None and size != path.stat().st_size:
                return None
        return path

    @contextlib.contextmanager
    def locked(self, sha256: str) -> Iterator[Path]:
        """Hold the lock of one hash (`<root>/locks/<hash>.lock`, kept apart from the content); yields the
        target path."""
        path = self.path_for(sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        with local_lock(self.root / "locks" / f"{path.name}.lock"):
            yield path

    def fetch(self, sha256: str, fill: Callable[[Path], object], *, source: str, url: str = "") -> Path:
        """The cached file for `sha256`; on a miss, `fill(target)` must create `target` (verified)."""
        hit = self.get(sha256)
        if hit is not None:
            return hit
        with self.locked(sha256) as target:
            hit = self.get(sha256)  # another process may have filled it while we waited
            if hit is not None:
                return hit
            fill(target)
            if not target.is_file():
                raise SourceError("CACHE_FILL_FAILED", f"{source}: the download did not create {target}")
            self.write_sidecar(sha256, source=source, url=url)
        return target

    def write_sidecar(self, sha256: str, *, source: str, url: str = "") -> None:
        path = self.path_for(sha256)
        record = {
            "sha256": sha256,
            "size": path.stat().st_size,
            "source": redact(source),
            "url": redact(url),
            "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        atomic_write(self.sidecar_for(sha256), json.dumps(record, indent=2) + "\n")


def _check_sha(sha256: str) -> str:
    sha = (sha256 or "").lower()
    if not _HEX64.match(sha):
        raise SourceError("SHA256_INVALID", f"{sha256!r} is not a sha256 (64 hex digits)")
    return sha
