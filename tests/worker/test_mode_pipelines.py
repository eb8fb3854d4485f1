"""img2img and inpainting pipelines built from a loaded template's own components (worker/mode_pipelines.py):
the very same tensors, built once per cache entry and dropped with it; an inpainting checkpoint's template
refuses the modes its UNet cannot run; a manifest that misnames its UNet is refused at load."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch

from tests.worker.conftest import BLOCK_VAE_TEMPLATE, INPAINT_TEMPLATE, TEMPLATE, TEST_ENV, copy_template
from tests.worker.image_samples import b64, encoded, halves
from worker.errors import ModelInvalid, ModeUnsupported
from worker.mode_pipelines import checkpoint_kind, mode_pipeline

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def tensor_pointers(pipe) -> dict[str, int]:
    """Every parameter and buffer of the pipeline's models, by name, with its storage address."""
    return {
        f"{name}.{key}": tensor.data_ptr()
        for name in ("unet", "vae", "text_encoder", "text_encoder_2")
        for key, tensor in [*getattr(pipe, name).named_parameters(), *getattr(pipe, name).named_buffers()]
    }


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_mode_pipelines_hold_the_loaded_pipelines_own_tensors(modes_worker, mode: str) -> None:
    entry, _ = modes_worker.cache.get(TEMPLATE)
    before = tensor_pointers(entry.pipe)
    pipe = mode_pipeline(entry, mode)
    assert (
        type(pipe).__name__
        == {"img2img": "StableDiffusionXLImg2ImgPipeline", "inpaint": "StableDiffusionXLInpaintPipeline"}[
            mode
        ]
    )
    for name in COMPONENTS:
        assert getattr(pipe, name) is getattr(entry.pipe, name), name
    assert tensor_pointers(pipe) == before  # the same storage, tensor by tensor
    assert (
        tensor_pointers(entry.pipe) == before and entry.pipe.dtype == torch.float32
    )  # nothing cast or moved
    assert mode_pipeline(entry, mode) is pipe  # built once per cache entry
    assert mode_pipeline(entry, "txt2img") is entry.pipe


def test_a_job_in_each_mode_leaves_the_shared_weights_where_they_were(modes_worker) -> None:
    entry, _ = modes_worker.cache.get(BLOCK_VAE_TEMPLATE)
    before = tensor_pointers(entry.pipe)
    picture = b64(encoded(halves((64, 64), (200, 30, 30), (30, 30, 200)), "PNG"))
    mask = b64(encoded(halves((64, 64), (0,), (255,), mode="L"), "PNG"))
    job = {"template": BLOCK_VAE_TEMPLATE, "prompt": "a fox", "steps": 2, "seed": 1}
    for extra in ({"width": 64, "height": 64}, {"image": picture}, {"image": picture, "mask": mask}):
        modes_worker.run({**job, **extra})
    assert tensor_pointers(entry.pipe) == before
    assert set(entry.mode_pipes) == {"img2img", "inpaint"}


def test_mode_pipelines_go_with_their_cache_entry(modes_worker) -> None:
    entry, _ = modes_worker.cache.get(TEMPLATE)
    pipe = weakref.ref(mode_pipeline(entry, "img2img"))
    unet = weakref.ref(entry.pipe.unet)
    modes_worker.cache.evict(TEMPLATE)
    del entry
    gc.collect()
    assert pipe() is None and unet() is None  # no second owner keeps the weights alive
    again, loaded_now = modes_worker.cache.get(TEMPLATE)
    assert loaded_now and again.mode_pipes == {}


def test_an_inpainting_checkpoints_template_serves_inpaint_only(modes_worker) -> None:
    entry, _ = modes_worker.cache.get(INPAINT_TEMPLATE)
    assert entry.folder.manifest.checkpoint.kind == "inpaint" and checkpoint_kind(entry.pipe) == "inpaint"
    assert entry.pipe.unet.config.in_channels == 9
    inpaint = mode_pipeline(entry, "inpaint")
    assert inpaint.unet is entry.pipe.unet
    for mode in ("txt2img", "img2img"):
        with pytest.raises(
            ModeUnsupported, match=rf"'{INPAINT_TEMPLATE}' is built on an inpainting checkpoint"
        ):
            mode_pipeline(entry, mode)


def test_the_worker_refuses_other_modes_before_fetching_anything(modes_worker) -> None:
    # A URL nothing answers: fetching it would fail with IMAGE_FETCH_FAILED, not MODE_UNSUPPORTED.
    for extra in ({}, {"image": "https://127.0.0.1:9/x.png"}):
        with pytest.raises(ModeUnsupported) as info:
            modes_worker.run({"template": INPAINT_TEMPLATE, "prompt": "a fox", **extra})
        assert str(info.value).startswith(f"[MODE_UNSUPPORTED] template '{INPAINT_TEMPLATE}' is built on")


def test_a_manifest_that_misnames_its_unet_is_refused_at_load(modes_volume: Path, tmp_path: Path) -> None:
    from worker.pipelines import load_template
    from worker.settings import load_settings

    (tmp_path / "models").mkdir()
    folder = copy_template(modes_volume, INPAINT_TEMPLATE, tmp_path)
    manifest = json.loads((folder / "fuseline.json").read_text())
    del manifest["checkpoint"]["kind"]
    (folder / "fuseline.json").unlink()  # a hard link into the session volume: replace, never edit in place
    (folder / "fuseline.json").write_text(json.dumps(manifest))
    settings = load_settings({**TEST_ENV, "FUSELINE_VOLUME": str(tmp_path)})
    with pytest.raises(ModelInvalid, match=r"in_channels 9 but fuseline.json's checkpoint.kind is None"):
        load_template(settings, INPAINT_TEMPLATE)
