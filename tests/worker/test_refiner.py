"""A template with an SDXL refiner, served on CPU from the kit's tiny base and tiny refiner: the ensemble
of experts through the worker, against diffusers' own two-pipeline recipe."""

from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import numpy
import pytest
import torch
from PIL import Image

from fuseline.core.manifest import CheckpointRef, RefinerManifest
from tests.worker.conftest import TEMPLATE, TEST_ENV, copy_template, make_manifest, write_manifest
from worker.errors import InvalidInput, ModelInvalid

JOB = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 4, "seed": 11}


@pytest.fixture(scope="module")
def refiner_volume(kit, volume: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/refined: the tiny template naming refiner `tiny-refiner` (default switch 0.75), its
    text_encoder_2 written by the merge's export as the build writes it; refiners/tiny-refiner: the kit's
    tiny refiner converted by the convert stage; models/tiny: the same template without a refiner."""
    from stages.convert import convert_checkpoint
    from stages.export import export_component
    from testkit.refiner import build_refiner

    root = tmp_path_factory.mktemp("refiner-volume")
    (root / "models").mkdir()
    refined = copy_template(volume, TEMPLATE, root, "refined")
    shutil.rmtree(refined / "text_encoder_2")
    export_component(kit.diffusers_dir / "text_encoder_2", refined / "text_encoder_2", 2000)
    (refined / "fuseline.json").unlink()
    manifest = make_manifest("refined").model_copy(update={"refiner": "tiny-refiner"})
    write_manifest(refined, manifest, defaults={"refiner": {"switch_at": 0.75}})
    plain = copy_template(volume, TEMPLATE, root, "plain")
    (plain / "fuseline.json").unlink()
    write_manifest(plain, make_manifest("plain"))
    shutil.rmtree(plain / "text_encoder_2")
    shutil.copytree(refined / "text_encoder_2", plain / "text_encoder_2")

    tiny_refiner = build_refiner(tmp_path_factory.mktemp("refiner-kit"))
    target = root / "refiners" / "tiny-refiner"
    target.parent.mkdir()
    convert_checkpoint(tiny_refiner.single_file, target, config_dir=tiny_refiner.config_dir)
    RefinerManifest(
        refiner="tiny-refiner",
        checkpoint=CheckpointRef(id="tiny-refiner", source="file:sdxl-refiner-tiny.safetensors"),
        prediction_type="epsilon",
        spec_hash="9" * 64,
        fuseline_version="test",
    ).write(target)
    return root


@pytest.fixture(scope="module")
def refiner_worker(refiner_volume: Path):
    from worker.serving import Worker
    from worker.settings import load_settings

    env = {**TEST_ENV, "FUSELINE_VOLUME": str(refiner_volume), "FUSELINE_MAX_PIPELINES": "2"}
    return Worker(load_settings(env))


def pixels(result: dict) -> numpy.ndarray:
    (image,) = result["images"]
    picture = Image.open(io.BytesIO(base64.b64decode(image["data"]))).convert("RGB")
    return numpy.asarray(picture, dtype=numpy.int16)


def test_refiner_template_generates_with_its_default_split(refiner_worker) -> None:
    refined = refiner_worker.run({**JOB, "template": "refined"})
    assert refined["parameters"]["refiner"] == {"switch_at": 0.75} and refined["warnings"] == []
    picture = pixels(refined)
    assert picture.shape == (64, 64, 3) and picture.std() > 2
    # The refiner changes the image (the tiny refiner's last step moves it by a fraction of a level on
    # average): the same job with the refiner switched off differs...
    off = refiner_worker.run({**JOB, "template": "refined", "refiner": {"switch_at": 1}})
    assert "refiner" not in off["parameters"]
    assert numpy.abs(picture - pixels(off)).mean() > 0.05
    # ...and that one is the template's model alone, as a template without a refiner gives it.
    plain = refiner_worker.run({**JOB, "template": "plain"})
    assert numpy.array_equal(pixels(off), pixels(plain))
    # A request's own split.
    later = refiner_worker.run({**JOB, "template": "refined", "refiner": {"switch_at": 0.5}})
    assert later["parameters"]["refiner"] == {"switch_at": 0.5}
    assert numpy.abs(pixels(later) - picture).mean() > 0.05


def test_refiner_shares_the_vae_and_an_identical_text_encoder(refiner_worker) -> None:
    entry, _ = refiner_worker.cache.get("refined")
    assert entry.refiner is not None and entry.refiner.vae is entry.pipe.vae
    assert entry.refiner.text_encoder_2 is entry.pipe.text_encoder_2
    unet_bytes = sum(p.numel() * p.element_size() for p in entry.refiner.unet.parameters())
    from worker.pipelines import pipeline_weight_bytes

    assert entry.nbytes == pipeline_weight_bytes(entry.pipe) + unet_bytes  # nothing counted twice


def test_refined_image_matches_diffusers_ensemble_of_experts(refiner_worker, refiner_volume: Path) -> None:
    """Oracle: diffusers' documented two-pipeline recipe on the same folders (base with denoising_end and
    output_type latent, refiner with denoising_start, the base's VAE), from prompt strings."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    ours = pixels(refiner_worker.run({**JOB, "template": "refined"}))
    base = StableDiffusionXLPipeline.from_pretrained(
        refiner_volume / "models" / "refined", variant="fp16", dtype=torch.float32, local_files_only=True
    )
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        refiner_volume / "refiners" / "tiny-refiner",
        variant="fp16",
        dtype=torch.float32,
        local_files_only=True,
        vae=base.vae,
        text_encoder_2=base.text_encoder_2,
    )
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    generator = [torch.Generator("cpu").manual_seed(JOB["seed"])]
    with torch.no_grad():
        latents = base(
            prompt=JOB["prompt"], num_inference_steps=4, denoising_end=0.75, output_type="latent",
            width=64, height=64, guidance_scale=4.5, generator=generator,
        ).images  # fmt: skip
        image = refiner(
            prompt=JOB["prompt"], image=latents, num_inference_steps=4, denoising_start=0.75,
            guidance_scale=4.5, generator=generator, output_type="np",
        ).images[0]  # fmt: skip
    theirs = (image * 255).round().astype(numpy.int16)
    difference = numpy.abs(ours - theirs)
    # Measured: identical (0 levels apart); 2 levels leave room for decode rounding on other machines.
    assert difference.max() <= 2, f"max {difference.max()}, mean {difference.mean():.3f}"


def test_refiner_asked_of_a_template_without_one_is_invalid_input(refiner_worker) -> None:
    with pytest.raises(InvalidInput, match=r"refiner.*has no refiner"):
        refiner_worker.run({**JOB, "template": "plain", "refiner": {"switch_at": 0.8}})


def test_missing_refiner_folder_is_the_templates_error(refiner_volume: Path, tmp_path: Path) -> None:
    from worker.serving import Worker
    from worker.settings import load_settings

    (tmp_path / "models").mkdir()
    shutil.copytree(
        refiner_volume / "models" / "refined", tmp_path / "models" / "refined", copy_function=os.link
    )
    worker = Worker(load_settings({**TEST_ENV, "FUSELINE_VOLUME": str(tmp_path)}))
    with pytest.raises(ModelInvalid, match=r"names refiner 'tiny-refiner'.*not on the volume"):
        worker.run({**JOB, "template": "refined"})


@pytest.mark.parametrize("template", ["refined", "plain"])
def test_a_refiner_an_image_job_cannot_use_is_refused_before_its_picture_is_fetched(
    refiner_worker, template: str
) -> None:
    # A URL the worker would refuse to fetch (loopback): the refiner's error comes first, so nothing was
    # fetched for a job that could not run.
    job = {
        **JOB,
        "template": template,
        "image": "https://127.0.0.1:9/picture.png",
        "refiner": {"switch_at": 0.8},
    }
    with pytest.raises(InvalidInput, match=r"refiner: (the refiner hands over|template 'plain' has no)"):
        refiner_worker.run(job)


def test_an_image_job_on_a_refiner_template_runs_without_the_default_refiner(refiner_worker) -> None:
    from tests.worker.image_samples import b64, encoded

    picture = Image.fromarray(numpy.full((64, 64, 3), 128, dtype=numpy.uint8))
    job = {**JOB, "template": "refined", "image": b64(encoded(picture, "PNG")), "strength": 0.5}
    result = refiner_worker.run(job)
    assert result["mode"] == "img2img" and "refiner" not in result["parameters"]
