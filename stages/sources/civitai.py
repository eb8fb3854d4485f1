"""Civitai sources: model-version metadata from the public API, bytes from /api/download/models/<id>.

The API key (CIVITAI_API_KEY) goes in an Authorization header to the Civitai host only; the download
redirects to a storage host with a signed URL, and requests drops the header on that cross-host redirect.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from stages.sources.base_models import FAMILIES, family_of
from stages.sources.cache import DownloadCache
from stages.sources.download import DownloadResult, RetryPolicy, download, request_json
from stages.sources.errors import SourceError
from stages.sources.safety import check_pickle_policy

log = logging.getLogger("fuseline.sources.civitai")

DEFAULT_BASE_URL = "https://civitai.com"
API_KEY_HINT = (
    "set CIVITAI_API_KEY to a Civitai API key (civitai.com -> Account settings -> API Keys); "
    "many models need a logged-in download"
)


@dataclass(frozen=True)
class CivitaiFile:
    id: int | None
    name: str
    size_bytes: int | None
    sha256: str | None  # lowercase hex (the API gives uppercase)
    primary: bool
    format: str | None  # "SafeTensor", "PickleTensor", ...
    type: str | None  # "Model", "Pruned Model", "Training Data", ...
    download_url: str | None


@dataclass(frozen=True)
class CivitaiModelVersion:
    id: int
    model_id: int | None
    name: str | None
    base_model: str | None
    model_name: str | None
    model_type: str | None  # "Checkpoint", "LORA", "LoCon", ...
    files: tuple[CivitaiFile, ...]

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> CivitaiModelVersion:
        files = tuple(
            CivitaiFile(
                id=f.get("id"),
                name=str(f.get("name") or ""),
                size_bytes=round(f["sizeKB"] * 1024) if isinstance(f.get("sizeKB"), int | float) else None,
                sha256=(f.get("hashes") or {}).get("SHA256", "").lower() or None,
                primary=bool(f.get("primary")),
                format=(f.get("metadata") or {}).get("format"),
                type=f.get("type"),
                download_url=f.get("downloadUrl"),
            )
            for f in data.get("files") or []
        )
        model = data.get("model") or {}
        return cls(
            id=int(data["id"]),
            model_id=data.get("modelId"),
            name=data.get("name"),
            base_model=data.get("baseModel"),
            model_name=model.get("name"),
            model_type=model.get("type"),
            files=files,
        )

    def primary_file(self) -> CivitaiFile:
        """The file `/api/download/models/<id>` serves: the one marked primary, else the only model file."""
        for f in self.files:
            if f.primary:
                return f
        models = [f for f in self.files if (f.type or "Model") in ("Model", "Pruned Model")]
        if len(models) == 1:
            return models[0]
        raise SourceError(
            "CIVITAI_NO_PRIMARY_FILE",
            f"civitai:{self.id}: the model version lists {len(self.files)} file(s) and none is primary; "
            "pick a model version with a single model file",
        )


def check_base_model(base_model: str | None, *, family: str = "sdxl", source: str) -> None:
    """Refuse a model made for another architecture before a byte of it is downloaded."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    if base_model in FAMILIES[family]:
        return
    found = family_of(base_model)
    what = f"a {found} model" if found and found != "other" else "not a known " + family.upper() + " base"
    raise SourceError(
        "BASE_MODEL_MISMATCH",
        f"{source}: Civitai says its baseModel is {base_model!r} ({what}), but fuseline templates are "
        f"{family.upper()}; accepted: {', '.join(sorted(FAMILIES[family]))}. Pick the "
        f"{family.upper()} version of this model on Civitai (the version selector on its page) "
        "and use that modelVersionId",
    )


class CivitaiClient:
    """Civitai's public REST API (metadata) and download endpoint, at CIVITAI_BASE_URL."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        session: requests.Session | None = None,
        policy: RetryPolicy | None = None,
    ) -> None:
        self.base_url = (base_url or os.environ.get("CIVITAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("CIVITAI_API_KEY") or None
        self.session = session
        self.policy = policy

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def model_version(self, version_id: int | str) -> CivitaiModelVersion:
        url = f"{self.base_url}/api/v1/model-versions/{int(version_id)}"
        data = request_json(
            url,
            headers=self._auth(),
            label=f"civitai:{version_id}",
            policy=self.policy,
            session=self.session,
            auth_hint=API_KEY_HINT,
            not_found=f"there is no model version {version_id} on {self.base_url}; check the "
            "modelVersionId (the number after ?modelVersionId= in the model page's URL)",
        )
        if not isinstance(data, dict) or "id" not in data:
            raise SourceError("BAD_RESPONSE", f"civitai:{version_id}: unexpected answer from {url}")
        return CivitaiModelVersion.from_api(data)

    def download_url(self, version_id: int | str) -> str:
        return f"{self.base_url}/api/download/models/{int(version_id)}"

    def download(self, version_id: int | str, dest: Path, *, sha256: str | None) -> DownloadResult:
        return download(
            self.download_url(version_id),
            dest,
            sha256=sha256,
            headers=self._auth(),
            auth_hint=API_KEY_HINT if not self.api_key else "check that CIVITAI_API_KEY is valid and current",
            label=f"civitai:{version_id}",
            policy=self.policy,
            session=self.session,
        )


def fetch_civitai(
    version_id: str,
    *,
    sha256: str | None,
    allow_pickle: bool,
    cache: DownloadCache,
    family: str = "sdxl",
    client: CivitaiClient | None = None,
) -> Path:
    """The verified file of a Civitai model version, in the cache. A cached pin costs no request."""
    source = f"civitai:{version_id}"
    if sha256:
        hit = cache.get(sha256)
        if hit is not None:
            check_pickle_policy(hit, allow_pickle=allow_pickle, source=source)
            return hit
    client = client or CivitaiClient()
    version = client.model_version(version_id)
    check_base_model(version.base_model, family=family, source=source)
    primary = version.primary_file()
    if primary.format == "PickleTensor" and not allow_pickle:
        raise SourceError(
            "PICKLE_REFUSED",
            f"{source}: Civitai lists its file {primary.name!r} as PickleTensor, which can run code when "
            'loaded; pick a SafeTensor version, or add "allow_pickle": true if you trust it',
        )
    expected = sha256 or primary.sha256
    if sha256 and primary.sha256 and primary.sha256 != sha256.lower():
        raise SourceError(
            "SHA256_PIN_MISMATCH",
            f"{source}: templates.json pins sha256 {sha256.lower()}, but Civitai lists {primary.sha256} for "
            f"{primary.name!r}; the upload changed or the pin is a typo. Check the model page "
            "and fix the pin",
        )
    if not expected:
        raise SourceError(
            "SHA256_UNKNOWN",
            f"{source}: no sha256 in templates.json and none from Civitai; add one (sha256sum FILE)",
        )
    if not sha256:
        log.warning("%s has no sha256 in templates.json; using Civitai's (run `fuseline lock`)", source)
    path = cache.fetch(
        expected,
        lambda target: client.download(version_id, target, sha256=expected),
        source=source,
        url=client.download_url(version_id),
    )
    check_pickle_policy(path, allow_pickle=allow_pickle, source=source)
    return path
