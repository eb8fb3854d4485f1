"""Release manifests (fuseline/core/release.py) and model manifests with the fields of issue #18 items 4 and
6: add-on folders and embeddings are named when used and absent otherwise, so a release or fuseline.json
written before the fields reads and re-serialises to the same bytes."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fuseline.core.manifest import AddonManifest, CheckpointRef, EmbeddingRef, ModelManifest, VaeRef
from fuseline.core.release import EmbeddingSummary, Release, ReleasedAddon, ReleasedTemplate

# A release as publishing wrote it before add-ons existed (keys sorted, 2-space indent).
OLD_RELEASE = """{
  "channel": "main",
  "created": "20260101T000000Z",
  "format": 1,
  "git_commit": null,
  "templates": {
    "cinematic": {
      "checkpoint": "civitai:1",
      "dir_md5": "0123456789abcdef0123456789abcdef.dir",
      "loras": [],
      "nfiles": 3,
      "path": "artifacts/models/cinematic",
      "prediction_type": "epsilon",
      "size": 10,
      "spec_hash": "ab"
    }
  }
}
"""


def template(**extra) -> ReleasedTemplate:
    return ReleasedTemplate(
        dir_md5="0123456789abcdef0123456789abcdef.dir",
        path="artifacts/models/cinematic",
        size=10,
        nfiles=3,
        spec_hash="ab",
        checkpoint="civitai:1",
        **extra,
    )


def addon(md5: str, templates: list[str] | None = None) -> ReleasedAddon:
    return ReleasedAddon(
        dir_md5=f"{md5 * 32}.dir",
        path="artifacts/addons/x",
        size=5,
        nfiles=2,
        source="file:x.safetensors",
        sha256="c" * 64,
        default_scale=0.5,
        min_scale=0.0,
        max_scale=1.0,
        templates=templates,
    )


def test_a_release_without_addons_keeps_its_bytes() -> None:
    release = Release.from_json(OLD_RELEASE)
    assert release.addons is None and release.templates["cinematic"].embeddings is None
    assert release.to_json() == OLD_RELEASE


def test_addons_and_embeddings_round_trip_and_name_their_folders() -> None:
    release = Release(
        channel="main",
        created="20260101T000000Z",
        templates={
            "cinematic": template(
                embeddings=[EmbeddingSummary(token="neg", source="file:e", sha256="d" * 64)]
            ),
            "anime": template(),
        },
        addons={"detail": addon("a"), "only": addon("b", ["anime"])},
    )
    again = Release.from_json(release.to_json())
    assert again == release
    assert again.folder_hashes() == [
        "0123456789abcdef0123456789abcdef.dir",
        "0123456789abcdef0123456789abcdef.dir",
        "a" * 32 + ".dir",
        "b" * 32 + ".dir",
    ]
    assert again.addons_for(["cinematic"]) == ["detail"]
    assert again.addons_for(["anime"]) == ["detail", "only"]
    assert again.addons_for() == ["detail", "only"]
    assert again.addons_for([]) == []


def test_addon_names_and_folder_paths_are_checked_like_template_ids() -> None:
    with pytest.raises(ValidationError, match="are not catalog ids"):
        Release(channel="main", created="x", templates={"a": template()}, addons={"../up": addon("a")})
    with pytest.raises(ValidationError, match="path must be relative"):
        ReleasedAddon.model_validate(addon("a").model_dump() | {"path": "/abs"})


def test_a_manifest_without_embeddings_keeps_its_bytes_and_one_with_them_names_each_file() -> None:
    manifest = ModelManifest(
        template="t",
        checkpoint=CheckpointRef(id="c", source="file:c"),
        loras=[],
        vae=VaeRef(source="file:v"),
        prediction_type="epsilon",
        spec_hash="0" * 64,
        fuseline_version="x",
    )
    assert "embeddings" not in manifest.to_json()
    embedded = manifest.model_copy(
        update={
            "embeddings": [
                EmbeddingRef(
                    token="neg",
                    source="file:e",
                    sha256="d" * 64,
                    vectors=2,
                    file="embeddings/neg.safetensors",
                )
            ]
        }
    )
    assert ModelManifest.model_validate_json(embedded.to_json()) == embedded
    with pytest.raises(ValidationError):
        EmbeddingRef(token="neg", source="s", sha256="d", vectors=1, file="../neg.safetensors")


def test_an_addon_manifest_round_trips() -> None:
    manifest = AddonManifest(
        name="detail",
        source="civitai:1",
        sha256="c" * 64,
        default_scale=0.6,
        min_scale=0.0,
        max_scale=1.2,
        templates=None,
        placed_keys={"unet": 10},
        checked_on=["sdxl-base"],
        fuseline_version="x",
    )
    assert AddonManifest.model_validate_json(manifest.to_json()) == manifest
