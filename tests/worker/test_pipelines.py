"""Model folders: manifest checks before loading, loading from the volume, and the LRU pipeline cache."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.worker.conftest import SPEC_HASH, TEMPLATE, copy_template
from worker.errors import ModelInvalid, UnknownTemplate
from worker.folders import available_templates, check_template_folder, folder_weight_bytes
from worker.pipelines import PipelineCache, load_template


def test_available_templates_are_folders_with_a_manifest(settings) -> None:
    assert available_templates(settings) == [
        "black-vae",
        "hot-vae",
        "tiny",
        "tiny-defaults",
        "wrong-name",
    ]


def test_unknown_template_lists_what_is_there(settings) -> None:
    with pytest.raises(UnknownTemplate) as info:
        check_template_folder(settings, "nope")
    assert str(info.value) == (
        f"[UNKNOWN_TEMPLATE] no template 'nope' in {settings.models_dir}; "
        "available: black-vae, hot-vae, tiny, tiny-defaults, wrong-name"
    )


def test_empty_volume_says_so(settings, tmp_path: Path) -> None:
    with pytest.raises(UnknownTemplate, match=r"available: none \(the volume holds no model folders\)"):
        check_template_folder(settings.model_copy(update={"volume": tmp_path}), "tiny")


def test_folder_without_manifest_is_refused(settings) -> None:
    with pytest.raises(ModelInvalid, match=r"template 'no-manifest': .*fuseline.json: no manifest"):
        check_template_folder(settings, "no-manifest")


def test_manifest_naming_another_template_is_refused(settings) -> None:
    with pytest.raises(ModelInvalid, match=r"names template 'tiny', not 'wrong-name'"):
        check_template_folder(settings, "wrong-name")


def test_invalid_manifest_is_refused(settings, scratch_volume: Path, volume: Path) -> None:
    folder = copy_template(volume, TEMPLATE, scratch_volume)
    data = json.loads((folder / "fuseline.json").read_text())
    del data["spec_hash"]
    (folder / "fuseline.json").unlink()  # a hard link: replace, never write through it
    (folder / "fuseline.json").write_text(json.dumps(data))
    with pytest.raises(
        ModelInvalid, match=r"fuseline.json: invalid \(1 problems\): spec_hash: Field required"
    ):
        check_template_folder(settings.model_copy(update={"volume": scratch_volume}), TEMPLATE)


def test_spec_hash_must_match_when_configured(settings) -> None:
    ok = settings.model_copy(update={"expected_spec_hashes": {TEMPLATE: SPEC_HASH}})
    assert check_template_folder(ok, TEMPLATE).manifest.spec_hash == SPEC_HASH
    stale = settings.model_copy(update={"expected_spec_hashes": {TEMPLATE: "f" * 64}})
    with pytest.raises(
        ModelInvalid, match=re.escape(f"spec_hash '{SPEC_HASH}' differs from the expected 'fff")
    ):
        check_template_folder(stale, TEMPLATE)


def test_defaults_come_from_the_manifest(settings) -> None:
    defaults = check_template_folder(settings, "tiny-defaults").defaults
    assert (defaults.steps, defaults.guidance_scale, defaults.scheduler) == (2, 2.0, "euler_a")
    assert (defaults.width, defaults.height) == (1024, 1024)  # not in the file: the global defaults
    assert check_template_folder(settings, TEMPLATE).defaults.steps == 24


def test_folder_missing_weights_is_a_model_error(settings, scratch_volume: Path, volume: Path) -> None:
    folder = copy_template(volume, TEMPLATE, scratch_volume)
    (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").unlink()
    with pytest.raises(ModelInvalid, match=r"diffusers could not load .* as an fp16 SDXL folder"):
        load_template(settings.model_copy(update={"volume": scratch_volume}), TEMPLATE, "cpu")


def test_truncated_weights_are_a_model_error(settings, scratch_volume: Path, volume: Path) -> None:
    folder = copy_template(volume, TEMPLATE, scratch_volume)
    weights = folder / "vae" / "diffusion_pytorch_model.fp16.safetensors"
    data = weights.read_bytes()
    weights.unlink()  # a hard link: replace, never write through it
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelInvalid, match=r"diffusers could not load .* as an fp16 SDXL folder"):
        load_template(settings.model_copy(update={"volume": scratch_volume}), TEMPLATE, "cpu")


def test_prediction_type_must_agree_with_the_scheduler(settings, scratch_volume: Path, volume: Path) -> None:
    folder = copy_template(volume, TEMPLATE, scratch_volume)
    data = json.loads((folder / "fuseline.json").read_text())
    data["prediction_type"] = "v_prediction"
    (folder / "fuseline.json").unlink()
    (folder / "fuseline.json").write_text(json.dumps(data))
    with pytest.raises(
        ModelInvalid, match=r"prediction_type 'epsilon' but fuseline.json says 'v_prediction'"
    ):
        load_template(settings.model_copy(update={"volume": scratch_volume}), TEMPLATE, "cpu")


def test_loads_fp32_on_cpu(settings) -> None:
    entry = load_template(settings, TEMPLATE, "cpu")
    assert entry.pipe.unet.dtype == torch.float32
    assert entry.pipe.device.type == "cpu"
    assert entry.folder.manifest.template == TEMPLATE
    assert entry.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
    # fp32 in memory: about twice the fp16 files (which also hold headers and a few buffers).
    assert entry.nbytes == pytest.approx(folder_weight_bytes(settings.models_dir / TEMPLATE, 4), rel=0.05)


class CountingLoader:
    """Loads for real, and records each load so the cache's decisions are visible."""

    def __init__(self, settings):
        self.settings = settings
        self.loads: list[str] = []

    def __call__(self, template_id: str):
        self.loads.append(template_id)
        return load_template(self.settings, template_id, "cpu")


def test_cache_evicts_least_recently_used_by_count(settings) -> None:
    loader = CountingLoader(settings)
    evicted: list[str] = []
    cache = PipelineCache(loader, max_count=2, on_evict=lambda e: evicted.append(e.template_id))
    assert cache.get("tiny")[1] is True
    assert cache.get("tiny-defaults")[1] is True
    assert cache.get("tiny")[1] is False  # hit; "tiny-defaults" is now least recently used
    cache.get("hot-vae")
    assert evicted == ["tiny-defaults"]
    assert cache.loaded() == ["tiny", "hot-vae"]
    assert loader.loads == ["tiny", "tiny-defaults", "hot-vae"]


def test_cache_makes_room_for_a_byte_budget_before_loading(settings) -> None:
    loader = CountingLoader(settings)
    size = folder_weight_bytes(settings.models_dir / TEMPLATE, 4)
    cache = PipelineCache(
        loader,
        max_count=10,
        max_bytes=int(size * 2.5),
        estimate=lambda t: folder_weight_bytes(settings.models_dir / t, 4),
    )
    for template in ("tiny", "tiny-defaults", "hot-vae"):
        cache.get(template)
    assert cache.loaded() == ["tiny-defaults", "hot-vae"]
    assert cache.nbytes <= cache.max_bytes
    assert cache.evict_all_except("hot-vae") == ["tiny-defaults"]
    assert cache.loaded() == ["hot-vae"]


def test_failed_load_leaves_the_cache_unchanged(settings) -> None:
    cache = PipelineCache(CountingLoader(settings), max_count=2)
    cache.get(TEMPLATE)
    with pytest.raises(UnknownTemplate):
        cache.get("nope")
    assert cache.loaded() == [TEMPLATE]


def test_cached_pipeline_leases_its_version_until_evicted(
    settings, scratch_volume: Path, volume: Path
) -> None:
    """A synced layout (models/tiny -> .v.tiny.<hash>): sync switching to a new version and collecting
    garbage spares the version a cached pipeline was loaded from, until the cache drops it."""
    from worker.sync.volume import MARKER_NAME, Volume

    vol = Volume(scratch_volume)
    old = copy_template(volume, TEMPLATE, scratch_volume, f".v.{TEMPLATE}.{'a' * 32}")
    new = copy_template(volume, TEMPLATE, scratch_volume, f".v.{TEMPLATE}.{'b' * 32}")
    for version in (old, new):
        (version / MARKER_NAME).write_text(json.dumps({"dir_md5": version.name[-32:] + ".dir"}))
    vol.switch(TEMPLATE, old)
    cache = PipelineCache(CountingLoader(settings.model_copy(update={"volume": scratch_volume})), max_count=1)
    entry, _ = cache.get(TEMPLATE)
    assert entry.folder.path == old  # the version itself, not the link a sync may switch
    assert [p.parent for p in (scratch_volume / "models").glob("*.leases/*")] == [vol.leases_dir(old)]
    vol.switch(TEMPLATE, new)
    assert vol.collect_garbage(TEMPLATE) == []
    assert old.is_dir(), "sync deleted the version a cached pipeline was loaded from"
    cache.evict_oldest()
    assert vol.collect_garbage(TEMPLATE) == [old]
