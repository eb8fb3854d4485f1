"""Worker fixtures: a volume of model folders made from the kit, and workers serving it on CPU.

Folders follow the export contract: an fp16-variant diffusers SDXL folder plus fuseline.json. Extra
templates hard-link the first folder's weights, so they cost a manifest, not another save.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from fuseline.core.manifest import CheckpointRef, LoraRef, ModelManifest, VaeRef
from testkit.models import Kit

TEMPLATE = "tiny"
# Spec hashes are opaque to the worker; these only need to differ per template.
SPEC_HASH = "0" * 64
# Generation settings small enough for the kit on 2 cores.
SMALL = {"width": 64, "height": 64, "steps": 3}
TEST_ENV = {"FUSELINE_MIN_SIZE": "64", "FUSELINE_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"}


LORA_SOURCE = "file:loras/kohya_sgm.safetensors"


def make_manifest(template: str, spec_hash: str = SPEC_HASH, kind: str | None = None) -> ModelManifest:
    return ModelManifest(
        template=template,
        checkpoint=CheckpointRef(
            id="sdxl-tiny", source="file:sdxl-tiny.safetensors", sha256="a" * 64, kind=kind
        ),
        loras=[
            LoraRef(source="file:loras/kohya_sgm.safetensors", sha256="b" * 64, scale=0.8, placed_keys={})
        ],
        vae=VaeRef(source="checkpoint"),
        prediction_type="epsilon",
        spec_hash=spec_hash,
        fuseline_version="test",
    )


def write_manifest(folder: Path, manifest: ModelManifest, defaults: dict | None = None) -> None:
    """fuseline.json as the build writes it, plus the optional `defaults` object the worker reads."""
    data = manifest.model_dump(mode="json")
    if defaults is not None:
        data["defaults"] = defaults
    (folder / "fuseline.json").write_text(json.dumps(data, indent=2, sort_keys=True))


def link_folder(source: Path, target: Path, skip: tuple[str, ...] = ()) -> None:
    """Hard-link every file of `source` into `target` except fuseline.json and the `skip` subfolders."""
    for path in source.rglob("*"):
        rel = path.relative_to(source)
        if path.is_dir() or rel.parts[0] in skip or rel.name == "fuseline.json":
            continue
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target / rel)


def write_vae_variant(source: Path, target: Path, edit) -> None:
    """Save `source`'s VAE to `target`/vae (fp16 variant, force_upcast off) after `edit(vae)`."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(source / "vae", variant="fp16", dtype=torch.float32)
    with torch.no_grad():
        edit(vae)
    # The fp16-fix VAE's setting: decode in fp16 without upcasting, so an overflow is possible.
    vae.register_to_config(force_upcast=False)
    vae.to(torch.float16).save_pretrained(target / "vae", variant="fp16", safe_serialization=True)


def _overflow_in_fp16(vae) -> None:
    # x1e6 on the first decoder activations: beyond fp16's 65504, harmless in fp32 (GroupNorm follows).
    for conv in (vae.post_quant_conv, vae.decoder.conv_in):
        conv.weight.mul_(1e3)
        conv.bias.mul_(1e3)


def _black_output(vae) -> None:
    # The last conv outputs -10 everywhere: every pixel clamps to black in any precision.
    vae.decoder.conv_out.weight.zero_()
    vae.decoder.conv_out.bias.fill_(-10.0)


@pytest.fixture(scope="session")
def volume(kit: Kit, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A RunPod-style volume: models/<template>/ folders built from the kit.

    tiny            the kit's pipeline exported fp16, manifest without defaults
    tiny-defaults   same weights, manifest with generation defaults
    wrong-name      same weights, manifest naming template "tiny"
    no-manifest     same weights, no fuseline.json
    hot-vae         VAE that overflows in fp16 but decodes in fp32
    black-vae       VAE that decodes every image to black
    """
    import torch
    from diffusers import StableDiffusionXLPipeline

    root = tmp_path_factory.mktemp("volume")
    models = root / "models"
    tiny = models / TEMPLATE
    pipe = StableDiffusionXLPipeline.from_pretrained(kit.diffusers_dir, local_files_only=True)
    pipe.to(torch.float16).save_pretrained(tiny, variant="fp16", safe_serialization=True)
    write_manifest(tiny, make_manifest(TEMPLATE))

    for name in ("tiny-defaults", "wrong-name", "no-manifest"):
        link_folder(tiny, models / name)
    write_manifest(
        models / "tiny-defaults",
        make_manifest("tiny-defaults", "1" * 64),
        defaults={"steps": 2, "guidance_scale": 2.0, "negative_prompt": "blurry", "scheduler": "euler_a"},
    )
    write_manifest(models / "wrong-name", make_manifest(TEMPLATE))

    for name, edit in (("hot-vae", _overflow_in_fp16), ("black-vae", _black_output)):
        link_folder(tiny, models / name, skip=("vae",))
        write_vae_variant(tiny, models / name, edit)
        write_manifest(models / name, make_manifest(name, "2" * 64))
    return root


# The image modes' volume (tests/worker/test_modes*.py, the local API's "Done when" checks).
BLOCK_VAE_TEMPLATE = "tiny-blockvae"
INPAINT_TEMPLATE = "tiny-inpaint"


@pytest.fixture(scope="session")
def modes_volume(kit: Kit, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A volume for the image modes, kept apart from `volume` (whose template list tests pin):

    tiny            the kit's pipeline exported fp16 (its random VAE does not reproduce pictures)
    tiny-blockvae   the same UNet and text encoders with the kit's block VAE, which reproduces 8x8-block
                    pictures exactly (testkit.block_vae): "close to the input" can be measured in pixels
    tiny-inpaint    the kit's 9-channel inpainting UNet with the block VAE, `checkpoint.kind: "inpaint"`
    """
    import torch
    from diffusers import AutoencoderKL, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline

    models = tmp_path_factory.mktemp("modes-volume") / "models"
    pipe = StableDiffusionXLPipeline.from_pretrained(kit.diffusers_dir, local_files_only=True)
    pipe.to(torch.float16).save_pretrained(models / TEMPLATE, variant="fp16", safe_serialization=True)
    write_manifest(models / TEMPLATE, make_manifest(TEMPLATE))
    block_vae = AutoencoderKL.from_pretrained(kit.block_vae_dir, local_files_only=True).to(torch.float16)
    link_folder(models / TEMPLATE, models / BLOCK_VAE_TEMPLATE, skip=("vae",))
    block_vae.save_pretrained(models / BLOCK_VAE_TEMPLATE / "vae", variant="fp16", safe_serialization=True)
    write_manifest(models / BLOCK_VAE_TEMPLATE, make_manifest(BLOCK_VAE_TEMPLATE, "3" * 64))
    inpaint = StableDiffusionXLInpaintPipeline.from_pretrained(kit.inpaint_dir, local_files_only=True)
    inpaint.vae = block_vae
    inpaint.to(torch.float16).save_pretrained(
        models / INPAINT_TEMPLATE, variant="fp16", safe_serialization=True
    )
    write_manifest(models / INPAINT_TEMPLATE, make_manifest(INPAINT_TEMPLATE, "4" * 64, kind="inpaint"))
    return models.parent


@pytest.fixture(scope="session")
def modes_worker(modes_volume: Path):
    """A CPU worker over the image modes' volume, with its pipelines cached for the session."""
    from worker.serving import Worker
    from worker.settings import load_settings

    return Worker(
        load_settings({**TEST_ENV, "FUSELINE_VOLUME": str(modes_volume), "FUSELINE_MAX_PIPELINES": "4"})
    )


@pytest.fixture(scope="session")
def settings(volume: Path):
    from worker.settings import load_settings

    return load_settings({**TEST_ENV, "FUSELINE_VOLUME": str(volume), "FUSELINE_MAX_PIPELINES": "4"})


@pytest.fixture(scope="session")
def tiny_worker(settings):
    """A CPU worker over the session volume; its pipelines stay cached for every test that uses it."""
    from worker.serving import Worker

    return Worker(settings)


@pytest.fixture(scope="session")
def served(volume: Path) -> Iterator[None]:
    """The process environment `handler()` reads, as a deployment would set it (restored afterwards)."""
    import worker.handler

    env = {**TEST_ENV, "FUSELINE_VOLUME": str(volume), "FUSELINE_DEFAULT_TEMPLATE": TEMPLATE}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    worker.handler._worker = None
    yield
    worker.handler._worker = None
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def scratch_volume(volume: Path, tmp_path: Path) -> Path:
    """An empty volume of this test's own, for folders a test breaks on purpose."""
    (tmp_path / "models").mkdir()
    return tmp_path


def copy_template(volume: Path, template: str, target_volume: Path, new_name: str | None = None) -> Path:
    target = target_volume / "models" / (new_name or template)
    shutil.copytree(volume / "models" / template, target, copy_function=os.link)
    return target


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and on a shared 2-core machine OpenMP threads spinning
    against other processes made one 64 px generation 15x slower (6.6 s against 0.44 s)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
