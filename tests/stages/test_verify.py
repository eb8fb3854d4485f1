"""VERIFY: load an export as the worker does, generate, and fail on NaN, black or constant images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from fuseline.core.manifest import CheckpointRef, ModelManifest, VaeRef
from stages.errors import StageError
from stages.verify import VerifySettings, image_metrics, verify_model

VAE_WEIGHTS = Path("vae/diffusion_pytorch_model.fp16.safetensors")
SETTINGS = VerifySettings(steps=2, width=64, height=64, seed=0)


def write_export(
    kit_dir: Path, out: Path, template: str = "t1", prediction: str = "epsilon", kind: str | None = None
) -> Path:
    """An export folder by the contract (fp16 variant + fuseline.json), made from a kit model (`kind`
    "inpaint": the kit's inpainting model)."""
    from diffusers import StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline

    pipeline_class = StableDiffusionXLInpaintPipeline if kind == "inpaint" else StableDiffusionXLPipeline
    pipe = pipeline_class.from_pretrained(kit_dir, local_files_only=True)
    pipe.scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config, prediction_type=prediction)
    pipe.to(torch.float16).save_pretrained(out, variant="fp16", safe_serialization=True)
    ModelManifest(
        template=template,
        checkpoint=CheckpointRef(id="tiny", source="file:kit", kind=kind),
        loras=[],
        vae=VaeRef(source="checkpoint"),
        prediction_type=prediction,
        spec_hash="0" * 64,
        fuseline_version="test",
    ).write(out)
    return out


@pytest.fixture(scope="module")
def export_dir(kit, tmp_path_factory) -> Path:
    return write_export(kit.diffusers_dir, tmp_path_factory.mktemp("export") / "t1")


@pytest.fixture
def broken_export(export_dir, tmp_path):
    """A copy of the export whose VAE output layer is replaced: (weight, bias) -> folder."""

    def make(weight: float, bias: float) -> Path:
        folder = tmp_path / "broken"
        shutil.copytree(export_dir, folder)
        tensors = load_file(folder / VAE_WEIGHTS)
        tensors["decoder.conv_out.weight"] = torch.full_like(tensors["decoder.conv_out.weight"], weight)
        tensors["decoder.conv_out.bias"] = torch.full_like(tensors["decoder.conv_out.bias"], bias)
        save_file(tensors, folder / VAE_WEIGHTS, metadata={"format": "pt"})
        return folder

    return make


def test_good_export_passes_and_writes_preview_and_metrics(export_dir, tmp_path):
    metrics = verify_model(export_dir, "t1", SETTINGS, guidance_scale=5.0, out=tmp_path)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == metrics
    assert set(written) == {"load_s", "step_s", "mean", "std", "min", "max", "nan_count", "black_fraction"}
    assert written["nan_count"] == 0 and written["std"] > SETTINGS.min_std
    image = Image.open(tmp_path / "preview.png")
    assert image.size == (64, 64) and image.mode == "RGB"


def test_same_seed_same_image(export_dir, tmp_path):
    a = verify_model(export_dir, "t1", SETTINGS, guidance_scale=5.0)
    b = verify_model(export_dir, "t1", SETTINGS, guidance_scale=5.0)
    stats = ("mean", "std", "min", "max")
    assert [a[k] for k in stats] == [b[k] for k in stats]


@pytest.mark.parametrize(
    ("weight", "bias", "words"),
    [
        (float("nan"), 0.0, "NaN/Inf pixel"),
        (0.0, -10.0, "are black"),
        (0.0, 0.0, "image is constant"),
    ],
)
def test_bad_images_fail_the_stage(broken_export, tmp_path, weight, bias, words):
    folder = broken_export(weight, bias)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(StageError, match=words) as info:
        verify_model(folder, "t1", SETTINGS, guidance_scale=5.0, out=out)
    assert info.value.code == "IMAGE_BAD"
    assert str(folder) in str(info.value)
    assert list(out.iterdir()) == [], "a failed check writes no preview or metrics"


def test_manifest_for_another_template_is_refused(export_dir):
    with pytest.raises(StageError, match="manifest is for template 't1'") as info:
        verify_model(export_dir, "other", SETTINGS, guidance_scale=5.0)
    assert info.value.code == "MANIFEST_MISMATCH"


def test_stale_spec_hash_is_refused(export_dir):
    with pytest.raises(StageError, match=r"merge@t1") as info:
        verify_model(export_dir, "t1", SETTINGS, guidance_scale=5.0, expected_spec_hash="1" * 64)
    assert info.value.code == "MANIFEST_STALE"


def test_v_prediction_export_samples_with_v_prediction(kit, tmp_path):
    folder = write_export(kit.diffusers_dir, tmp_path / "v", prediction="v_prediction")
    verify_model(folder, "t1", SETTINGS, guidance_scale=5.0)
    # A scheduler that disagrees with the manifest is caught, not sampled.
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["prediction_type"] = "epsilon"
    config_path.write_text(json.dumps(config))
    with pytest.raises(StageError, match=r"prediction_type 'epsilon'.*'v_prediction'") as info:
        verify_model(folder, "t1", SETTINGS, guidance_scale=5.0)
    assert info.value.code == "PREDICTION_MISMATCH"


def test_inpainting_export_is_verified_by_an_inpaint_generation(kit, tmp_path):
    folder = write_export(kit.inpaint_dir, tmp_path / "inpaint", kind="inpaint")
    metrics = verify_model(folder, "t1", SETTINGS, guidance_scale=5.0, out=tmp_path)
    assert metrics["nan_count"] == 0 and metrics["std"] > SETTINGS.min_std
    assert Image.open(tmp_path / "preview.png").size == (64, 64)
    # A manifest that does not say what the UNet is (here: an inpainting UNet called ordinary) is caught.
    manifest = json.loads((folder / "fuseline.json").read_text())
    del manifest["checkpoint"]["kind"]
    (folder / "fuseline.json").write_text(json.dumps(manifest))
    with pytest.raises(StageError, match=r"checkpoint.kind is None but the UNet says 'inpaint'") as info:
        verify_model(folder, "t1", SETTINGS, guidance_scale=5.0)
    assert info.value.code == "MANIFEST_MISMATCH"


def test_missing_model_says_which_stage_to_run(tmp_path):
    with pytest.raises(StageError, match=r"dvc repro merge@t9"):
        verify_model(tmp_path / "nothing", "t9", SETTINGS, guidance_scale=5.0)


def test_image_metrics_values():
    image = np.zeros((4, 4, 3))
    image[:2] = 1.0
    m = image_metrics(image)
    assert (m["mean"], m["min"], m["max"], m["black_fraction"], m["nan_count"]) == (0.5, 0.0, 1.0, 0.5, 0)
    image[0, 0, 0] = np.nan
    assert image_metrics(image)["nan_count"] == 1


@pytest.mark.parametrize(
    ("section", "words"),
    [({"width": 60}, "multiple of 8"), ({"steps": 0}, "1 or more"), ({"size": 3}, "unknown key")],
)
def test_verify_params_are_checked(section, words):
    with pytest.raises(StageError, match=words):
        VerifySettings.from_params(section)
