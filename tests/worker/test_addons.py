"""Add-on LoRAs per job (worker/addons.py): applied on top of the merged template with diffusers' adapters,
removed after the job, checked against the template's add-ons.

Real files throughout: two templates built by the merge stage itself (`plain`: the kit checkpoint with one
LoRA fused; `fused`: the same plus the add-on's LoRA fused at build time at scale S, the oracle), and add-on
folders written by the add-on stage (its placement check included), laid out on a volume as sync lays
them. The worker then serves `plain` with the add-on at S, which must land within TOLERANCE of `fused`.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy
import pytest
from PIL import Image

from fuseline.core.manifest import CheckpointRef, VaeRef
from stages.addon import write_addon
from stages.lora import LoraInput
from stages.merge import TemplateIdentity, merge_template
from tests.worker.conftest import SMALL, TEST_ENV
from worker.errors import InvalidInput
from worker.serving import Worker
from worker.settings import load_settings

# The add-on's strength in the oracle template and in the job.
S = 0.6
# Measured on the kit (CPU, fp32 pipeline from fp16 weights, 64 px, 3 steps, seeds 1, 2, 3, 77, 1234): the
# runtime adapter and the build-time fuse differ by at most 1 of 255 levels at any pixel, 0.006-0.014 on
# average, from the one fp16 rounding of W + S*D the fuse makes and the adapter does not. Allowed: 2 levels
# at any pixel, 0.1 on average. The image without the add-on is 79-110 levels (mean 9-12) away from the
# oracle, so the tolerance cannot hide a missing or mis-scaled add-on.
TOLERANCE_MAX, TOLERANCE_MEAN = 2, 0.1
BASE_LORA = ("kohya_sgm", 0.8)
JOB = {"prompt": "a lighthouse at dusk, (golden hour:1.2)", "seed": 77, **SMALL}


def build_template(kit, template: str, loras: list[tuple[str, float]], models: Path) -> None:
    merge_template(
        kit.diffusers_dir,
        kit.vae_dir,
        [LoraInput(kit.loras[name], scale, f"file:loras/{name}.safetensors") for name, scale in loras],
        models / template,
        identity=TemplateIdentity(
            template=template,
            checkpoint=CheckpointRef(id="tiny", source="file:sdxl-tiny.safetensors"),
            vae=VaeRef(source="file:vae"),
            spec_hash=template.encode().hex().ljust(64, "0"),
        ),
        prediction_type="epsilon",
        shard_size_mb=100,
    )


def add_addon(kit, volume: Path, name: str, lora: str, **rules) -> None:
    fields = {"default_scale": 1.0, "min_scale": 0.0, "max_scale": 1.0, "templates": None, **rules}
    write_addon(
        name,
        LoraInput(kit.loras[lora], fields["default_scale"], f"file:loras/{lora}.safetensors"),
        fields,
        {"tiny": kit.diffusers_dir},
        volume / "addons" / name,
    )


@pytest.fixture(scope="module")
def addon_volume(kit, tmp_path_factory) -> Path:
    """plain (kohya_sgm fused), fused (kohya_sgm + peft at S fused), and add-ons: style (peft), words
    (kohya_te: UNet and both text encoders; offered with plain only), dora (PEFT DoRA)."""
    root = tmp_path_factory.mktemp("addon-volume")
    build_template(kit, "plain", [BASE_LORA], root / "models")
    build_template(kit, "fused", [BASE_LORA, ("peft", S)], root / "models")
    add_addon(kit, root, "style", "peft", default_scale=0.5, max_scale=1.0)
    add_addon(
        kit, root, "words", "kohya_te", default_scale=0.7, min_scale=-1.0, max_scale=0.8, templates=["plain"]
    )
    add_addon(kit, root, "dora", "dora")
    return root


def settings_for(volume: Path, **env: str):
    return load_settings({**TEST_ENV, "FUSELINE_VOLUME": str(volume), "FUSELINE_MAX_PIPELINES": "2", **env})


@pytest.fixture(scope="module")
def worker(addon_volume) -> Worker:
    return Worker(settings_for(addon_volume))


def pixels(result: dict) -> numpy.ndarray:
    (image,) = result["images"]
    return numpy.asarray(Image.open(io.BytesIO(base64.b64decode(image["data"]))).convert("RGB"), numpy.int16)


def run(worker: Worker, template: str, **extra) -> dict:
    return worker.run({**JOB, "template": template, **extra})


def test_an_addon_matches_the_build_time_fuse_and_the_next_job_gets_the_template_bit_for_bit(worker) -> None:
    before = run(worker, "plain")
    with_addon = run(worker, "plain", loras=[{"name": "style", "scale": S}])
    oracle = run(worker, "fused")
    after = run(worker, "plain")

    # Removed afterwards: the same template, seed and prompt give the same bytes as before the add-on.
    assert after["images"][0]["data"] == before["images"][0]["data"]
    plain, added, fused = pixels(before), pixels(with_addon), pixels(oracle)
    change = numpy.abs(added - plain)
    assert change.max() > 10 * TOLERANCE_MAX and change.mean() > 10 * TOLERANCE_MEAN, "the add-on did nothing"
    distance = numpy.abs(added - fused)
    print(f"add-on vs build-time fuse: max {distance.max()} levels, mean {distance.mean():.3f}")
    assert distance.max() <= TOLERANCE_MAX and distance.mean() <= TOLERANCE_MEAN

    assert with_addon["parameters"]["loras"] == [{"name": "style", "scale": S}]
    (applied,) = with_addon["template"]["addons"]
    assert (applied["name"], applied["scale"], applied["source"]) == (
        "style",
        S,
        "file:loras/peft.safetensors",
    )
    assert len(applied["sha256"]) == 64
    assert before["parameters"]["loras"] == [] and before["template"]["addons"] == []
    # The adapter stays loaded for the next job that asks (the LRU), disabled meanwhile.
    entry, _ = worker.cache.get("plain")
    assert list(entry.addon_adapters.values()) == ["style"]


def test_a_text_encoder_addon_at_its_default_scale_then_the_template_unchanged(worker) -> None:
    before = run(worker, "plain", seed=5)
    with_addon = run(worker, "plain", seed=5, loras=[{"name": "words"}])
    after = run(worker, "plain", seed=5)
    assert with_addon["parameters"]["loras"] == [{"name": "words", "scale": 0.7}]  # its default_scale
    assert numpy.abs(pixels(with_addon) - pixels(before)).max() > 0
    assert after["images"][0]["data"] == before["images"][0]["data"]


def test_two_addons_at_once_and_a_dora_addon(worker) -> None:
    before = run(worker, "plain", seed=9)
    both = run(worker, "plain", seed=9, loras=[{"name": "style", "scale": 0.3}, {"name": "dora", "scale": 1}])
    assert both["parameters"]["loras"] == [{"name": "style", "scale": 0.3}, {"name": "dora", "scale": 1.0}]
    assert numpy.abs(pixels(both) - pixels(before)).max() > 0
    assert run(worker, "plain", seed=9)["images"][0]["data"] == before["images"][0]["data"]


@pytest.mark.parametrize(
    ("template", "loras", "expected"),
    [
        (
            "plain",
            [{"name": "nope"}],
            "loras.0.name: unknown add-on 'nope' for template 'plain'; its add-ons: dora, style, words",
        ),
        (
            "fused",
            [{"name": "words"}],
            "unknown add-on 'words' for template 'fused'; its add-ons: dora, style",
        ),
        (
            "plain",
            [{"name": "style", "scale": 1.5}],
            "loras.0.scale: 1.5 is outside 0..1, the range of add-on 'style'",
        ),
        ("plain", [{"name": "words", "scale": -1.5}], "is outside -1..0.8"),
        ("plain", [{"name": "style"}, {"name": "style"}], "loras: names style more than once"),
        (
            "plain",
            [{"name": "style", "weight": 1}],
            "loras.0.weight: unknown field; valid fields: name, scale",
        ),
        (
            "plain",
            [{"name": n} for n in ("a", "b", "c", "d", "e")],
            "loras: List should have at most 4 items",
        ),
        ("plain", [{"name": "style", "scale": "0.5"}], "loras.0.scale: Input should be a valid number"),
    ],
)
def test_a_bad_addon_request_is_invalid_input_before_anything_loads(addon_volume, template, loras, expected):
    worker = Worker(settings_for(addon_volume))
    with pytest.raises(InvalidInput) as caught:
        worker.run({**JOB, "template": template, "loras": loras})
    assert str(caught.value).startswith("[INVALID_INPUT] ")
    assert expected in str(caught.value)
    assert worker.cache.loaded() == []


def test_loaded_addons_are_an_lru_per_pipeline(addon_volume) -> None:
    worker = Worker(settings_for(addon_volume, FUSELINE_MAX_ADDONS="1"))
    run(worker, "plain", loras=[{"name": "style"}])
    entry, _ = worker.cache.get("plain")
    first = list(entry.addon_adapters)
    run(worker, "plain", loras=[{"name": "words"}])
    assert list(entry.addon_adapters.values()) == ["words"]
    present = {name for names in entry.pipe.get_list_adapters().values() for name in names}
    assert first[0] not in present and next(iter(entry.addon_adapters)) in present
    # Two in one job although the limit is 1: both are needed, so both stay for that job.
    run(worker, "plain", loras=[{"name": "style"}, {"name": "dora"}])
    assert sorted(entry.addon_adapters.values()) == ["dora", "style"]


def test_fused_qkv_is_undone_for_an_addon_job_and_restored_after(addon_volume, worker) -> None:
    fast = Worker(settings_for(addon_volume, FUSELINE_SPEED="fuse_qkv"))
    before = run(fast, "plain", seed=3)
    with_addon = run(fast, "plain", seed=3, loras=[{"name": "style", "scale": S}])
    after = run(fast, "plain", seed=3)
    assert after["images"][0]["data"] == before["images"][0]["data"]
    # The LoRA layers on to_q/to_k/to_v took part: the image matches the plain path's add-on image.
    reference = run(worker, "plain", seed=3, loras=[{"name": "style", "scale": S}])
    assert numpy.abs(pixels(with_addon) - pixels(reference)).max() <= 1


def test_describe_lists_each_templates_addons_and_their_ranges(addon_volume) -> None:
    worker = Worker(settings_for(addon_volume))
    answer = worker.run({"action": "describe"})
    assert worker.cache.loaded() == []
    assert answer["templates"]["plain"]["addons"] == ["dora", "style", "words"]
    assert answer["templates"]["fused"]["addons"] == ["dora", "style"]
    words = answer["addons"]["words"]
    assert (words["default_scale"], words["min_scale"], words["max_scale"]) == (0.7, -1.0, 0.8)
    assert words["templates"] == ["plain"] and words["source"] == "file:loras/kohya_te.safetensors"
    assert answer["addons"]["style"]["templates"] is None and answer["addons_unavailable"] == {}


def test_a_damaged_addon_folder_is_named_and_not_offered(addon_volume, tmp_path) -> None:
    import shutil

    volume = tmp_path / "volume"
    shutil.copytree(addon_volume / "addons", volume / "addons")
    (volume / "models").mkdir()
    (volume / "addons" / "style" / "addon.json").write_text("{not json")
    answer = Worker(settings_for(volume)).run({"action": "describe"})
    assert sorted(answer["addons"]) == ["dora", "words"]
    assert (
        "style" in answer["addons_unavailable"]
        and "invalid add-on manifest" in answer["addons_unavailable"]["style"]
    )


@pytest.mark.slow
def test_a_compiled_unet_gets_the_addon_and_loses_it_after(addon_volume, worker) -> None:
    """With FUSELINE_SPEED=compile the UNet is torch.compile's wrapper, which diffusers' adapter calls skip;
    they must act on the module inside (aot_eager: the graph capture without a C compiler, as in
    tests/worker/test_speed.py)."""
    compiled = Worker(
        settings_for(addon_volume, FUSELINE_SPEED="compile", FUSELINE_COMPILE_BACKEND="aot_eager")
    )
    before = run(compiled, "plain", seed=8)
    with_addon = run(compiled, "plain", seed=8, loras=[{"name": "style", "scale": S}])
    after = run(compiled, "plain", seed=8)
    assert after["images"][0]["data"] == before["images"][0]["data"]
    reference = run(worker, "plain", seed=8, loras=[{"name": "style", "scale": S}])
    assert numpy.abs(pixels(with_addon) - pixels(reference)).max() <= 1
    entry, _ = compiled.cache.get("plain")
    assert hasattr(entry.pipe.unet, "_orig_mod"), "the compiled UNet is what generates"
