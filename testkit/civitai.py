"""A local stand-in for Civitai: the same paths, JSON shapes, redirects and error codes, on 127.0.0.1.

Two RangeHTTPServers, as on the real site: the API host (`http://127.0.0.1:P`) answers
`/api/v1/model-versions/<id>` and `/api/download/models/<id>`; a download with a valid key is a 307 to
a signed URL on a *different host*, the storage server (`http://localhost:Q`: another hostname, so a
client that forwards the Authorization header there is caught). Storage checks the signature and serves
the bytes with Range support; both servers record every request and take fault injection.

Behaviour modelled on civitai.com (checked against its public API docs and responses):
- metadata needs no key; `files[].hashes.SHA256` is uppercase hex; `files[].metadata.format` is
  "SafeTensor" or "PickleTensor"; `baseModel` is e.g. "SDXL 1.0", "Pony", "SD 1.5";
- unknown version: 404 with `{"error": "No model version with id <id>"}`;
- download without a (valid) key when the creator requires login: 401 with a JSON explanation;
  `login_wall=True` instead answers 200 with an HTML page, as the site does for browser-ish clients;
- the key is accepted as `Authorization: Bearer <key>` or `?token=<key>`.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import tempfile
import urllib.parse
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testkit.servers import DEFAULT_HTML, RangeHTTPServer, RecordedRequest, Response

__all__ = ["CivitaiServer", "CivitaiVersion", "safetensors_bytes"]

_JSON = {"Content-Type": "application/json; charset=utf-8"}


@dataclass
class CivitaiVersion:
    """One model version the fake serves. `data` is exactly what the metadata endpoint returns."""

    version_id: int
    name: str
    sha256: str  # lowercase hex of the bytes served
    size: int
    storage_path: str  # URL path on the storage server
    requires_auth: bool
    login_wall: bool
    data: dict[str, Any] = field(default_factory=dict)


def safetensors_bytes(size: int = 1 << 20, *, seed: int = 0) -> bytes:
    """A real safetensors file of about `size` bytes (one random fp16 tensor), distinct per seed: model
    bytes for download tests without building a model."""
    import numpy as np
    from safetensors.numpy import save

    rng = np.random.default_rng(seed)
    count = max(size // 2, 1)
    tensor = rng.standard_normal(count, dtype=np.float32).astype(np.float16)
    return save({"lora_unet_test.lora_down.weight": tensor}, metadata={"seed": str(seed)})


def _safe_disk_name(name: str) -> str:
    # Names come from tests (some deliberately hostile, e.g. "../../evil"); on disk keep them inert.
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "file"


class CivitaiServer:
    """Civitai look-alike. Use as a context manager; `base_url` is what CIVITAI_BASE_URL should be.

    >>> with CivitaiServer(tmp_path, api_key="k" * 32) as civ:
    ...     v = civ.add_version(123, b"...", name="style.safetensors", base_model="SDXL 1.0")
    ...     # CIVITAI_BASE_URL=civ.base_url CIVITAI_API_KEY=civ.api_key -> fetch civitai:123
    """

    def __init__(self, root: Path | str | None = None, *, api_key: str | None = None) -> None:
        self._tmp = None if root is not None else tempfile.TemporaryDirectory(prefix="fuseline-civitai-")
        self.root = Path(root if root is not None else self._tmp.name)  # type: ignore[union-attr]
        (self.root / "api").mkdir(parents=True, exist_ok=True)
        (self.root / "storage").mkdir(parents=True, exist_ok=True)
        self.api_key = api_key or "civitai-test-" + secrets.token_hex(16)
        self.api = RangeHTTPServer(self.root / "api")
        self.storage = RangeHTTPServer(self.root / "storage")
        self.versions: dict[int, CivitaiVersion] = {}
        self._signatures: set[str] = set()
        self.api.add_route("/api/v1/model-versions/", self._model_version)
        self.api.add_route("/api/download/models/", self._download)
        self.storage.add_route("/files/", self._storage_gate)

    # -- lifecycle

    def start(self) -> CivitaiServer:
        self.api.start()
        self.storage.start()
        return self

    def stop(self) -> None:
        self.api.stop()
        self.storage.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> CivitaiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return self.api.base_url

    @property
    def storage_base_url(self) -> str:
        # "localhost", not 127.0.0.1: a different host for requests' should_strip_auth, same socket.
        return f"http://localhost:{self.storage.port}"

    def env(self) -> dict[str, str]:
        return {"CIVITAI_BASE_URL": self.base_url, "CIVITAI_API_KEY": self.api_key}

    @property
    def requests(self) -> list[RecordedRequest]:
        """API and storage requests together (each list is in arrival order; API first)."""
        return self.api.requests + self.storage.requests

    def clear_requests(self) -> None:
        self.api.clear_requests()
        self.storage.clear_requests()

    # -- content

    def add_version(
        self,
        version_id: int,
        content: bytes | Path,
        *,
        name: str = "model.safetensors",
        base_model: str = "SDXL 1.0",
        model_type: str = "LORA",
        file_format: str | None = None,
        requires_auth: bool = True,
        login_wall: bool = False,
        model_id: int | None = None,
    ) -> CivitaiVersion:
        """Serve `content` as the primary file of model version `version_id`."""
        data = Path(content).read_bytes() if isinstance(content, Path) else bytes(content)
        sha = hashlib.sha256(data).hexdigest()
        disk = f"files/{sha}/{_safe_disk_name(name)}"
        target = self.root / "storage" / disk
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        if file_format is None:
            file_format = "PickleTensor" if name.lower().endswith((".ckpt", ".pt", ".bin")) else "SafeTensor"
        model_id = model_id if model_id is not None else version_id + 100000
        download_url = f"https://civitai.com/api/download/models/{version_id}"
        meta = {
            "id": version_id,
            "modelId": model_id,
            "name": "v1.0",
            "createdAt": "2025-01-01T00:00:00.000Z",
            "updatedAt": "2025-01-01T00:00:00.000Z",
            "status": "Published",
            "publishedAt": "2025-01-01T00:00:00.000Z",
            "trainedWords": [],
            "baseModel": base_model,
            "baseModelType": "Standard",
            "earlyAccessTimeFrame": 0,
            "description": None,
            "stats": {"downloadCount": 0, "ratingCount": 0, "rating": 0, "thumbsUpCount": 0},
            "model": {"name": f"model {model_id}", "type": model_type, "nsfw": False, "poi": False},
            "files": [
                {
                    "id": version_id * 10,
                    "sizeKB": len(data) / 1024,
                    "name": name,
                    "type": "Model",
                    "pickleScanResult": "Success",
                    "pickleScanMessage": "No Pickle imports",
                    "virusScanResult": "Success",
                    "virusScanMessage": None,
                    "scannedAt": "2025-01-01T00:00:00.000Z",
                    "metadata": {"format": file_format, "size": None, "fp": None},
                    "hashes": {
                        "AutoV2": sha[:10].upper(),
                        "SHA256": sha.upper(),
                        "CRC32": f"{zlib.crc32(data):08X}",
                    },
                    "primary": True,
                    "downloadUrl": download_url,
                }
            ],
            "images": [],
            "downloadUrl": download_url,
        }
        version = CivitaiVersion(
            version_id, name, sha, len(data), "/" + disk, requires_auth, login_wall, meta
        )
        self.versions[version_id] = version
        return version

    # -- routes

    @staticmethod
    def _id_from(path: str, prefix: str) -> int | None:
        tail = urllib.parse.urlsplit(path).path[len(prefix) :].strip("/")
        return int(tail) if tail.isdigit() else None

    def _model_version(self, req: RecordedRequest) -> Response:
        vid = self._id_from(req.path, "/api/v1/model-versions/")
        version = self.versions.get(vid) if vid is not None else None
        if version is None:
            return Response(
                404, dict(_JSON), json.dumps({"error": f"No model version with id {vid}"}).encode()
            )
        return Response(200, dict(_JSON), json.dumps(version.data).encode())

    def _key_of(self, req: RecordedRequest) -> str | None:
        auth = req.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(req.path).query)
        return (query.get("token") or [None])[0]

    def _download(self, req: RecordedRequest) -> Response:
        vid = self._id_from(req.path, "/api/download/models/")
        version = self.versions.get(vid) if vid is not None else None
        if version is None:
            return Response(
                404, dict(_JSON), json.dumps({"error": f"No model version with id {vid}"}).encode()
            )
        key = self._key_of(req)
        if version.requires_auth and key != self.api_key:
            if version.login_wall:
                return Response(200, {"Content-Type": "text/html; charset=utf-8"}, DEFAULT_HTML)
            body = {
                "error": "Unauthorized",
                "message": "The creator of this asset requires you to be logged in to download it",
            }
            return Response(401, dict(_JSON), json.dumps(body).encode())
        signature = secrets.token_hex(16)
        self._signatures.add(signature)
        query = urllib.parse.urlencode(
            {"X-Amz-Expires": "86400", "X-Amz-Signature": signature, "response-content-disposition":
             f'attachment; filename="{version.name}"'}
        )  # fmt: skip
        location = f"{self.storage_base_url}{urllib.parse.quote(version.storage_path)}?{query}"
        return Response.redirect(location, status=307)

    def _storage_gate(self, req: RecordedRequest) -> Response | None:
        """Like a presigned bucket URL: no valid signature, 403; else fall through to the file server."""
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(req.path).query)
        if (query.get("X-Amz-Signature") or [""])[0] not in self._signatures:
            body = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code></Error>"
            return Response(403, {"Content-Type": "application/xml"}, body)
        return None
