"""Runtime-LoRA fallback (worker/fallback.py): a template whose merged folder is unavailable is served from
its base checkpoint plus its LoRA files, loaded with diffusers at run time, flagged `degraded`.

Real files throughout: the kit's tiny SDXL folder as the base checkpoint, kit LoRA files (kohya with text
encoder keys, PEFT with adapter metadata) named by their sha256, and a merged folder with the same LoRAs
fused in by diffusers (the merge stage's proven oracle), to compare images with.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy
import pytest
import torch
from PIL import Image

from fuseline.core.manifest import CheckpointRef, LoraRef, ModelManifest, VaeRef
from fuseline.core.release import LoraSummary, Release, ReleasedTemplate, release_key
from tests.worker.conftest import SMALL, TEST_ENV
from worker.errors import ModelInvalid, UnknownTemplate
from worker.fallback import adapter_name, read_recipe
from worker.fallback import main as fallback_main
from worker.serving import Worker
from worker.settings import load_settings
from worker.sync.recipes import (
    Recipe,
    RecipeLora,
    checkpoint_dir,
    checkpoint_dir_name,
    lora_path,
    recipe_from_release,
    recipe_path,
    write_recipe,
)
from worker.sync.templates import sync_templates

# Merging several adapters: PEFT warns about the second adapter config, which is the point.
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`")

TEMPLATE = "styled"
PLAIN = "plain"  # a recipe without LoRAs: the base checkpoint as is
CHECKPOINT = "civitai:133005"
SPEC_HASH = "5" * 64
# A LoRA touching the UNet and both text encoders (kohya names) and a PEFT one (alpha from its metadata).
LORAS = (("kohya_te", 0.7), ("peft", 0.5))
JOB = {"template": TEMPLATE, "prompt": "a lighthouse at dusk", "seed": 1234, **SMALL}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def link_tree(source: Path, target: Path) -> None:
    """Hard links where the filesystem allows (the kit is read-only to these tests), copies elsewhere."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link)


def link_file(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def recipe_for(kit, template: str = TEMPLATE, loras=LORAS) -> Recipe:
    return Recipe(
        template=template,
        spec_hash=SPEC_HASH,
        checkpoint=CHECKPOINT,
        loras=[
            RecipeLora(
                source=f"file:loras/{name}.safetensors", sha256=sha256_of(kit.loras[name]), scale=scale
            )
            for name, scale in loras
        ],
    )


@pytest.fixture(scope="module")
def merged(kit, tmp_path_factory) -> Path:
    """TEMPLATE's merged folder as the export contract has it (fp16 variant + fuseline.json), the LoRAs
    fused by diffusers' `fuse_lora`: the oracle tests/stages/test_merge_oracle.py proves the merge stage's
    export equal to (within 1 fp16 ulp). Built here with diffusers so the worker's tests do not depend on
    the build side. The base's own VAE, as the fallback decodes with the base folder's vae/."""
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path_factory.mktemp("merged") / TEMPLATE
    pipe = StableDiffusionXLPipeline.from_pretrained(kit.diffusers_dir, local_files_only=True)
    for name, _ in LORAS:
        pipe.load_lora_weights(str(kit.loras[name]), adapter_name=name)
    pipe.set_adapters([name for name, _ in LORAS], [scale for _, scale in LORAS])
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter layers
    pipe.to(torch.float16).save_pretrained(out, variant="fp16", safe_serialization=True)
    recipe = recipe_for(kit)
    ModelManifest(
        template=TEMPLATE,
        checkpoint=CheckpointRef(id="tiny", source=CHECKPOINT),
        loras=[
            LoraRef(source=x.source, sha256=x.sha256, scale=x.scale, placed_keys={}) for x in recipe.loras
        ],
        vae=VaeRef(source="checkpoint"),
        prediction_type="epsilon",
        spec_hash=SPEC_HASH,
        fuseline_version="test",
    ).write(out)
    return out


def make_volume(root: Path, kit, *, merged: Path | None = None, recipes=(), sources: bool = True) -> Path:
    """A volume holding any of: the merged folder, recipes, the base checkpoint and LoRAs in the layout."""
    (root / "models").mkdir(parents=True)
    if merged is not None:
        link_tree(merged, root / "models" / TEMPLATE)
    settings = settings_for(root)
    for recipe in recipes:
        write_recipe(root, recipe)
    if sources:
        link_tree(kit.diffusers_dir, checkpoint_dir(settings.volume, CHECKPOINT))
        for name, _ in LORAS:
            link_file(kit.loras[name], lora_path(settings.volume, sha256_of(kit.loras[name])))
    return root


def settings_for(volume: Path, **env: str):
    return load_settings({**TEST_ENV, "FUSELINE_VOLUME": str(volume), "FUSELINE_MAX_PIPELINES": "2", **env})


def pixels(result: dict) -> numpy.ndarray:
    (image,) = result["images"]
    picture = Image.open(io.BytesIO(base64.b64decode(image["data"])))
    assert picture.format == "PNG" and picture.size == (64, 64)
    return numpy.asarray(picture.convert("RGB"), dtype=numpy.int16)


@pytest.fixture(scope="module")
def fallback_worker(kit, tmp_path_factory) -> Worker:
    """A CPU worker on a volume with no merged folder, only recipes (TEMPLATE, PLAIN) and the sources."""
    root = make_volume(
        tmp_path_factory.mktemp("fallback-volume"), kit, recipes=[recipe_for(kit), recipe_for(kit, PLAIN, ())]
    )
    return Worker(settings_for(root))


@pytest.fixture(scope="module")
def merged_worker(kit, merged, tmp_path_factory) -> Worker:
    """A CPU worker on a volume with only the merged folder (no recipe, no sources)."""
    return Worker(
        settings_for(make_volume(tmp_path_factory.mktemp("merged-volume"), kit, merged=merged, sources=False))
    )


# ------------------------------------------------------------------------------------------- serving


def test_no_merged_folder_serves_base_plus_runtime_loras_flagged_degraded(kit, fallback_worker) -> None:
    result = fallback_worker.run(JOB)
    assert result["degraded"] is True
    warning = next(w for w in result["warnings"] if w.startswith("degraded:"))
    assert "merged model of template 'styled' was unavailable" in warning
    assert "applied at run time" in warning and "may differ slightly" in warning
    assert f"no template {TEMPLATE!r}" in warning  # why: the merged folder's own error
    # The output reports the recipe, as it reports a merged folder's manifest.
    assert result["template"]["model_hash"] == SPEC_HASH
    assert result["template"]["checkpoint"]["source"] == CHECKPOINT
    assert result["template"]["loras"] == [
        {"source": f"file:loras/{n}.safetensors", "sha256": sha256_of(kit.loras[n]), "scale": s}
        for n, s in LORAS
    ]
    image = pixels(result)
    assert image.std() > 1, "a flat image: the pipeline produced nothing"
    # Both LoRAs are live PEFT adapters with sanitised names and the recipe's scales.
    entry, loaded_now = fallback_worker.cache.get(TEMPLATE)
    assert not loaded_now and entry.degraded
    names = [adapter_name(i, f"file:loras/{n}.safetensors") for i, (n, _) in enumerate(LORAS)]
    assert names == ["lora0_file_loras_kohya_te_safetensors", "lora1_file_loras_peft_safetensors"]
    assert entry.pipe.get_active_adapters() == names
    assert set(entry.pipe.get_list_adapters()["text_encoder"]) == {names[0]}


def test_fallback_image_is_close_to_the_merged_models_for_the_same_seed(
    fallback_worker, merged_worker
) -> None:
    """Same seed, same prompt: the fallback computes W·x + s·B(A·x) in fp32 from the fp32 base, the merged
    folder holds W + s·BA rounded once to fp16 (the export), loaded back as fp32. The two differ only by
    that rounding (relative 2^-11 per weight), which after 3 steps and the VAE moves a pixel by at most a
    few of 255 levels. The tolerance is checked to be meaningful: without the LoRAs (PLAIN, same base, same
    seed) the image is far further from the merged one than the tolerance allows (measured on the kit:
    max 1 / mean 0.03 levels apart with the LoRAs, max 90 / mean 9 without them)."""
    fallback = pixels(fallback_worker.run(JOB))
    merged = pixels(merged_worker.run(JOB))
    plain = pixels(fallback_worker.run({**JOB, "template": PLAIN}))
    close = numpy.abs(fallback - merged)
    without_loras = numpy.abs(plain - merged)
    max_levels, mean_levels = 3, 0.25
    assert close.max() <= max_levels and close.mean() <= mean_levels, (close.max(), close.mean())
    assert without_loras.max() > 10 * max_levels and without_loras.mean() > 10 * mean_levels, (
        without_loras.max(),
        without_loras.mean(),
    )


def test_valid_merged_folder_wins_over_the_fallback(kit, merged, merged_worker, tmp_path: Path) -> None:
    volume = make_volume(tmp_path, kit, merged=merged, recipes=[recipe_for(kit)])
    worker = Worker(settings_for(volume))
    result = worker.run(JOB)
    assert result["degraded"] is False
    assert result["warnings"] == []
    # Bit for bit the merged-only volume's image: the merged model was loaded, not the fallback.
    assert (pixels(result) == pixels(merged_worker.run(JOB))).all()


def test_cached_fallback_gives_way_once_the_merged_folder_appears(
    kit, merged, merged_worker, tmp_path
) -> None:
    volume = make_volume(tmp_path, kit, recipes=[recipe_for(kit)])
    worker = Worker(settings_for(volume))
    assert worker.run(JOB)["degraded"] is True
    assert worker.run(JOB)["timings_ms"]["load"] == 0  # cached
    link_tree(merged, volume / "models" / TEMPLATE)  # e.g. a later sync completed
    result = worker.run(JOB)
    assert result["degraded"] is False and result["timings_ms"]["load"] > 0
    assert (pixels(result) == pixels(merged_worker.run(JOB))).all()
    assert worker.cache.loaded() == [TEMPLATE]


def test_merged_folder_refused_as_incomplete_falls_back(kit, merged, tmp_path: Path) -> None:
    """A merged folder whose weights are cut short passes the manifest check and fails at load: the
    fallback serves, and keeps serving from the cache (the broken folder is not reloaded per job)."""
    volume = make_volume(tmp_path, kit, merged=merged, recipes=[recipe_for(kit)])
    unet = next((volume / "models" / TEMPLATE / "unet").glob("*.safetensors"))
    data = unet.read_bytes()
    unet.unlink()  # a hard link to the module's merged folder: replace, never edit in place
    unet.write_bytes(data[: len(data) // 2])
    worker = Worker(settings_for(volume))
    result = worker.run(JOB)
    assert result["degraded"] is True
    assert "diffusers could not load" in next(w for w in result["warnings"] if w.startswith("degraded:"))
    assert worker.run(JOB)["timings_ms"]["load"] == 0


# -------------------------------------------------------------------------------------------- errors


def test_lora_with_wrong_sha256_is_model_invalid_naming_the_file(kit, tmp_path: Path) -> None:
    volume = make_volume(tmp_path, kit, recipes=[recipe_for(kit)])
    settings = settings_for(volume)
    wrong = lora_path(settings.volume, sha256_of(kit.loras["peft"]))
    wrong.unlink()
    link_file(kit.loras["locon"], wrong)  # another LoRA under this one's name
    with pytest.raises(ModelInvalid) as caught:
        Worker(settings).run(JOB)
    message = str(caught.value)
    assert message.startswith("[MODEL_INVALID] ")
    assert str(wrong) in message and "file:loras/peft.safetensors" in message
    assert f"has sha256 {sha256_of(kit.loras['locon'])}" in message


def test_pickle_lora_is_refused_without_loading_it(kit, tmp_path: Path) -> None:
    volume = make_volume(tmp_path, kit, recipes=[recipe_for(kit)])
    settings = settings_for(volume)
    path = lora_path(settings.volume, sha256_of(kit.loras["peft"]))
    path.unlink()
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1)}, path)  # a zip-pickle, as torch.save writes
    with pytest.raises(ModelInvalid, match=r"is a pickle \(torch\.save\) file") as caught:
        Worker(settings).run(JOB)
    assert str(path) in str(caught.value)


def test_nothing_present_is_unknown_template_as_without_fallback(kit, tmp_path: Path) -> None:
    volume = make_volume(tmp_path, kit, sources=False)
    with pytest.raises(UnknownTemplate) as caught:
        Worker(settings_for(volume)).run(JOB)
    assert str(caught.value) == (
        f"[UNKNOWN_TEMPLATE] no template {TEMPLATE!r} in {volume / 'models'}; available: none (the volume "
        "holds no model folders)"
    )


def test_recipe_without_its_files_is_unknown_template_saying_what_is_missing(
    kit, tmp_path: Path, capsys
) -> None:
    volume = make_volume(tmp_path, kit, recipes=[recipe_for(kit)], sources=False)
    settings = settings_for(volume)
    pickle = lora_path(settings.volume, sha256_of(kit.loras["peft"])).with_suffix(".ckpt")
    pickle.parent.mkdir(parents=True)
    pickle.write_bytes(b"\x80\x04")  # only its name is looked at: a pickle is never opened
    with pytest.raises(UnknownTemplate) as caught:
        Worker(settings).run(JOB)
    message = str(caught.value)
    assert message.startswith(f"[UNKNOWN_TEMPLATE] no template {TEMPLATE!r}")
    assert "runtime-LoRA fallback: the volume lacks" in message
    assert f"{checkpoint_dir(settings.volume, CHECKPOINT)}/" in message
    assert str(lora_path(settings.volume, sha256_of(kit.loras["kohya_te"]))) in message
    assert ".ckpt there is a pickle file, refused" in message
    # The operator's check lists the same paths.
    assert fallback_main(["--volume", str(volume)]) == 2
    out = capsys.readouterr().out
    assert (
        f"{TEMPLATE}: NOT ready, missing:" in out and f"{checkpoint_dir(settings.volume, CHECKPOINT)}/" in out
    )


def test_recipe_with_another_spec_hash_than_expected_is_refused(kit, tmp_path: Path) -> None:
    volume = make_volume(tmp_path, kit, recipes=[recipe_for(kit)])
    settings = settings_for(volume, FUSELINE_SPEC_HASHES=json.dumps({TEMPLATE: "6" * 64}))
    with pytest.raises(ModelInvalid, match="the recipe is stale") as caught:
        Worker(settings).run(JOB)
    assert str(recipe_path(volume, TEMPLATE)) in str(caught.value)
    assert f"no template {TEMPLATE!r}" in str(caught.value)  # and why the merged model was not used


# ------------------------------------------------------------------------------------ sync and layout


def test_sync_writes_the_recipe_before_a_failing_fetch_and_the_worker_serves_it(
    kit, tmp_path, capsys
) -> None:
    """The case the fallback is for: the release names a model the remote cannot deliver (here its listing
    is missing), yet the recipe from the release entry is on the volume and the template is served."""
    released = ReleasedTemplate(
        dir_md5="0" * 32 + ".dir",
        path=f"artifacts/models/{TEMPLATE}",
        size=1,
        nfiles=1,
        spec_hash=SPEC_HASH,
        checkpoint=CHECKPOINT,
        loras=[LoraSummary(source=x.source, sha256=x.sha256, scale=x.scale) for x in recipe_for(kit).loras],
    )
    remote = tmp_path / "remote"
    release = Release(channel="main", created=time.strftime("%Y%m%dT%H%M%SZ"), templates={TEMPLATE: released})
    (remote / release_key("main")).parent.mkdir(parents=True)
    (remote / release_key("main")).write_text(release.to_json())
    volume = make_volume(tmp_path / "volume", kit)

    report = sync_templates(str(remote / release_key("main")), volume)
    (result,) = report.templates
    assert result.status == "failed" and "[REMOTE_MISSING]" in (result.error or "")
    settings = settings_for(volume)
    assert read_recipe(settings, TEMPLATE) == recipe_from_release(TEMPLATE, released) == recipe_for(kit)
    mtime = recipe_path(volume, TEMPLATE).stat().st_mtime_ns
    assert write_recipe(volume, recipe_for(kit)) is False  # unchanged: not rewritten (no churn per start)
    assert recipe_path(volume, TEMPLATE).stat().st_mtime_ns == mtime
    assert Worker(settings).run(JOB)["degraded"] is True
    assert fallback_main(["--volume", str(volume)]) == 0
    assert f"{TEMPLATE}: ready" in capsys.readouterr().out


def test_layout_names() -> None:
    assert checkpoint_dir_name("civitai:133005") == "civitai-133005"
    assert (
        checkpoint_dir_name("hf:stabilityai/stable-diffusion-xl-base-1.0/sd_xl_base_1.0.safetensors@4621659")
        == "hf-stabilityai-stable-diffusion-xl-base-1.0-sd_xl_base_1.0.safetensors-4621659"
    )
    long = "https://example.com/" + "x" * 300
    name = checkpoint_dir_name(long)
    assert len(name) <= 120 and name != checkpoint_dir_name(long + "y")
    assert checkpoint_dir_name("file:../../etc") == "file-..-..-etc"  # one path component, never a walk
    assert "/" not in checkpoint_dir_name("file:/a/b") and not checkpoint_dir_name("..").startswith(".")
    assert adapter_name(3, "civitai:1.2/x-y") == "lora3_civitai_1_2_x_y"
    with pytest.raises(ValueError, match="64 lowercase hex"):
        RecipeLora(source="x", sha256="../../evil", scale=1.0)


# ------------------------------------------------------------------------ review fixes (file checks)


def padded_safetensors(tensors: dict, metadata: dict, wanted) -> bytes:
    """`tensors` saved as safetensors with a `pad` metadata entry grown until the header length (the
    file's first 8 bytes, little-endian) satisfies `wanted`."""
    from safetensors.torch import save

    for width in range(512):
        data = save(tensors, metadata={**metadata, "pad": "x" * width})
        if wanted(int.from_bytes(data[:8], "little")):
            return data
    raise AssertionError("no padding gives the wanted header length")


def test_safetensors_whose_header_length_starts_with_0x80_is_not_a_pickle(tmp_path: Path) -> None:
    """A header of exactly 128 bytes makes the file start with 0x80, a pickle's PROTO opcode: the file is
    still safetensors (header length that fits the file, then `{`), and accepted."""
    from worker.fallback import verify_lora_file

    data = padded_safetensors({"x": torch.zeros(4)}, {}, lambda n: n == 128)
    assert data[:8] == (128).to_bytes(8, "little") and data[8:9] == b"{"
    path = tmp_path / "lora.safetensors"
    path.write_bytes(data)
    verify_lora_file(path, LoraRef(source="file:x", sha256=sha256_of(path), scale=1.0, placed_keys={}))
    # Every pickle layout torch.save and pickle write is still refused, whatever its sha256.
    import pickle

    writers = {
        "zip": lambda p: torch.save({"w": torch.zeros(1)}, p),
        "legacy": lambda p: torch.save({"w": torch.zeros(1)}, p, _use_new_zipfile_serialization=False),
        "protocol 5": lambda p: p.write_bytes(pickle.dumps({"w": [0.0]}, protocol=5)),
    }
    for name, write in writers.items():
        write(path)
        ref = LoraRef(source=f"file:{name}", sha256=sha256_of(path), scale=1.0, placed_keys={})
        with pytest.raises(ModelInvalid, match=r"is a pickle \(torch\.save\) file"):
            verify_lora_file(path, ref)


def test_fallback_serves_a_lora_whose_header_length_has_a_0x80_low_byte(kit, tmp_path: Path) -> None:
    """The kit's kohya LoRA saved again with its header grown to 128 modulo 256 bytes: same tensors,
    a first byte of 0x80; the fallback applies it."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(kit.loras["kohya_te"], framework="pt") as handle:
        metadata = handle.metadata() or {}
    data = padded_safetensors(load_file(kit.loras["kohya_te"]), metadata, lambda n: n % 256 == 128)
    assert data[0] == 0x80
    sha256 = hashlib.sha256(data).hexdigest()
    recipe = Recipe(
        template=TEMPLATE,
        spec_hash=SPEC_HASH,
        checkpoint=CHECKPOINT,
        loras=[RecipeLora(source="file:loras/kohya_te.safetensors", sha256=sha256, scale=0.7)],
    )
    volume = make_volume(tmp_path, kit, recipes=[recipe])
    settings = settings_for(volume)
    lora_path(settings.volume, sha256).write_bytes(data)
    result = Worker(settings).run(JOB)
    assert result["degraded"] is True and result["template"]["loras"][0]["sha256"] == sha256


# ------------------------------------------------------------------- review fixes (serving, sync)


def test_a_merged_folder_installed_while_the_fallback_loads_makes_the_entry_stale(
    kit, merged, tmp_path: Path, caplog
) -> None:
    """The merged folder's marker is taken before the merged load is tried: a sync that installs the
    folder while the (slow) fallback loads leaves an entry found stale at the next job."""
    from fuseline.core.logs import event_fields
    from worker.fallback import (
        load_runtime_loras,
        load_serving,
        merged_became_available,
        merged_marker,
        resolve_template,
    )

    volume = make_volume(tmp_path, kit, recipes=[recipe_for(kit)])
    settings = settings_for(volume)
    with caplog.at_level("WARNING", logger="fuseline.worker.fallback"):
        entry = load_serving(settings, TEMPLATE, "cpu")
    (event,) = [event_fields(r) for r in caplog.records if event_fields(r)[0] == "template.fallback"]
    assert event[1]["template"] == TEMPLATE and f"no template {TEMPLATE!r}" in event[1]["reason"]
    assert entry.degraded and entry.merged_marker is None and not merged_became_available(settings, entry)

    # The race, step by step: marker and folder as load_serving takes them, then the sync's install, then
    # the load completes.
    refused = merged_marker(settings, TEMPLATE)
    folder = resolve_template(settings, TEMPLATE)
    link_tree(merged, volume / "models" / TEMPLATE)
    late = load_runtime_loras(settings, folder, "cpu", refused)
    assert late.degraded and merged_became_available(settings, late)


def test_a_template_only_the_fallback_serves_is_a_template_of_the_worker(fallback_worker, caplog) -> None:
    """Recipe and sources present, no merged folder: listed as present, checked at start (degraded, not
    a problem), named among the available templates of an UNKNOWN_TEMPLATE error."""
    from fuseline.core.logs import event_fields
    from worker.folders import available_templates
    from worker.startup import self_check

    settings = fallback_worker.settings
    assert available_templates(settings) == [PLAIN, TEMPLATE]
    with pytest.raises(UnknownTemplate, match=rf"available: {PLAIN}, {TEMPLATE}$"):
        fallback_worker.run({**JOB, "template": "nope"})
    with caplog.at_level("INFO", logger="fuseline.worker"):
        assert fallback_worker.startup() == []
    degraded = [
        event_fields(r)[1]["template"] for r in caplog.records if event_fields(r)[0] == "template.degraded"
    ]
    assert degraded == [PLAIN, TEMPLATE]
    check = self_check(fallback_worker)
    assert (check.ok, check.mode, check.templates, check.degraded) == (
        True,
        "files",
        [PLAIN, TEMPLATE],
        [PLAIN, TEMPLATE],
    )


def test_a_release_entry_the_recipe_refuses_is_a_warning_not_a_sync_failure(
    settings, volume: Path, tmp_path: Path, caplog
) -> None:
    """A LoRA sha256 that is not 64 hex digits and an unknown prediction_type make no recipe; the
    template itself syncs: no failure counted, no start problem, one warning event naming the template."""

    from fuseline.core.logs import event_fields
    from tests.worker.conftest import TEMPLATE as TINY
    from tests.worker.test_observability import publish_local

    release = Path(publish_local(volume, TINY, tmp_path / "remote"))
    data = json.loads(release.read_text())
    data["templates"][TINY]["loras"] = [{"source": "civitai:1", "sha256": "ABC123", "scale": 1.0}]
    data["templates"][TINY]["prediction_type"] = "sideways"
    release.write_text(json.dumps(data))
    synced = Worker(
        settings.model_copy(
            update={"volume": tmp_path / "fresh", "release": str(release), "preload": (TINY,)}
        )
    )
    with caplog.at_level("WARNING", logger="fuseline.worker"):
        assert synced.sync_volume() == []
    assert synced.sync_summary["failures"] == 0 and synced.sync_summary["templates"] == {TINY: "synced"}
    (event,) = [event_fields(r) for r in caplog.records if event_fields(r)[0] == "sync.recipe_not_written"]
    assert event[1]["template"] == TINY
    message = next(r.getMessage() for r in caplog.records if event_fields(r)[0] == "sync.recipe_not_written")
    assert "ValidationError" in message and "sha256 must be 64 lowercase hex digits, got 'ABC123'" in message
    assert not recipe_path(tmp_path / "fresh", TINY).exists()


def test_an_addon_on_a_fallback_pipeline_sits_beside_its_loras_and_leaves_them_as_they_were(
    kit, fallback_worker
) -> None:
    """A job's add-on is set beside the template's own runtime adapters, and afterwards the adapters are the
    template's alone at their scales again: the next job's image is the one before, bit for bit."""
    from stages.addon import write_addon
    from stages.lora import LoraInput

    volume = fallback_worker.settings.volume
    rules = {"default_scale": 0.5, "min_scale": 0.0, "max_scale": 1.0, "templates": None}
    if not (volume / "addons" / "extra").is_dir():
        source = LoraInput(kit.loras["kohya_diffusers"], 0.5, "file:loras/kohya_diffusers.safetensors")
        write_addon("extra", source, rules, {"tiny": kit.diffusers_dir}, volume / "addons" / "extra")
    before = fallback_worker.run(JOB)
    added = fallback_worker.run({**JOB, "loras": [{"name": "extra", "scale": 0.8}]})
    after = fallback_worker.run(JOB)
    assert added["degraded"] is True and added["template"]["addons"][0]["name"] == "extra"
    assert numpy.abs(pixels(added) - pixels(before)).max() > 0
    assert after["images"][0]["data"] == before["images"][0]["data"]
    entry, _ = fallback_worker.cache.get(TEMPLATE)
    names = [adapter_name(i, f"file:loras/{n}.safetensors") for i, (n, _) in enumerate(LORAS)]
    assert entry.pipe.get_active_adapters() == names
