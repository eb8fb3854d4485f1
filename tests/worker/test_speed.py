"""FUSELINE_SPEED options: each one takes effect on the loaded pipeline and leaves the image unchanged.

"Unchanged" is measured on the decoded 8-bit pixels against the plain path with the same seed: reordering
fp32 arithmetic (channels-last convolutions, one fused QKV matmul) may move a value across a rounding
boundary, so at most one level on a tiny share of pixels is allowed; a wrong layout or a dropped
projection changes every pixel.
"""

from __future__ import annotations

import base64
import io

import numpy
import pytest
from PIL import Image

from fuseline.core.errors import ConfigInvalid
from tests.worker.conftest import SMALL, TEMPLATE
from worker.settings import SpeedOptions

JOB = {"template": TEMPLATE, "prompt": "a lighthouse at dusk", "seed": 7, **SMALL}


def pixels(result: dict) -> numpy.ndarray:
    assert "error" not in result, result
    data = base64.b64decode(result["images"][0]["data"])
    return numpy.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=int)


@pytest.fixture(scope="module")
def plain(tiny_worker) -> numpy.ndarray:
    return pixels(tiny_worker.run(dict(JOB)))


def worker_with(settings, speed: SpeedOptions):
    from worker.serving import Worker

    return Worker(settings.model_copy(update={"speed": speed}))


def assert_same_image(image: numpy.ndarray, reference: numpy.ndarray) -> None:
    diff = numpy.abs(image - reference)
    assert diff.max() <= 1, f"max pixel difference {diff.max()}"
    assert (diff > 0).mean() < 0.01, f"{(diff > 0).mean():.2%} of values differ"


@pytest.mark.parametrize("option", ["channels_last", "fuse_qkv"])
def test_option_takes_effect_and_keeps_the_image(settings, plain, option: str) -> None:
    import torch

    worker = worker_with(settings, SpeedOptions(options=(option,)))
    image = pixels(worker.run(dict(JOB)))
    entry, _ = worker.cache.get(TEMPLATE)
    unet = entry.pipe.unet
    if option == "channels_last":
        assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        assert not unet.conv_in.weight.is_contiguous()
    else:
        fused = [m for m in unet.modules() if getattr(m, "fused_projections", False)]
        # Self-attention gets one QKV matmul, cross-attention one KV matmul; the fused processor must run
        # them (fused weights that no processor uses would leave the image unchanged for nothing).
        assert any(hasattr(m, "to_qkv") for m in fused)
        assert all(hasattr(m, "to_qkv") or hasattr(m, "to_kv") for m in fused)
        assert all(type(m.processor).__name__.startswith("Fused") for m in fused)
    assert_same_image(image, plain)


@pytest.mark.slow
def test_compile_runs_the_compiled_unet_and_keeps_the_image(settings, plain) -> None:
    """aot_eager traces and runs the UNet through torch.compile's graph capture without needing a C
    compiler: the wiring and the graph are tested here; inductor's kernels only on a GPU (B6)."""
    import torch

    worker = worker_with(settings, SpeedOptions(options=("compile",), compile_backend="aot_eager"))
    image = pixels(worker.run(dict(JOB)))
    entry, _ = worker.cache.get(TEMPLATE)
    assert isinstance(entry.pipe.unet, torch._dynamo.eval_frame.OptimizedModule)
    assert_same_image(image, plain)


def test_parse_speed_options() -> None:
    assert not SpeedOptions.from_env({})
    parsed = SpeedOptions.from_env(
        {"FUSELINE_SPEED": " Compile, channels_last,compile ", "FUSELINE_COMPILE_MODE": "max-autotune"}
    )
    assert parsed.options == ("compile", "channels_last") and parsed.compile_mode == "max-autotune"
    with pytest.raises(ConfigInvalid, match=r"unknown option.*turbo.*valid: channels_last"):
        SpeedOptions.from_env({"FUSELINE_SPEED": "channels_last,turbo"})
    with pytest.raises(ConfigInvalid, match="does not include 'compile'"):
        SpeedOptions.from_env({"FUSELINE_COMPILE_MODE": "max-autotune"})


def test_compile_warms_the_default_template_at_its_default_size(settings, volume, tmp_path, caplog) -> None:
    """With `compile`, the start runs one 1-step generation at the default template's default size, so
    the UNet is compiled for the size jobs ask for before the first job (the self-check's 64 px image
    compiles for 64 px only)."""
    import torch

    from fuseline.core.logs import event_fields
    from tests.worker.conftest import copy_template, make_manifest, write_manifest
    from worker.serving import Worker

    folder = copy_template(volume, TEMPLATE, tmp_path, "warm")
    (folder / "fuseline.json").unlink()  # a hard link to the session volume's: replace, never edit
    write_manifest(folder, make_manifest("warm", "3" * 64), defaults={"width": 320, "height": 256})
    speed = SpeedOptions(options=("compile",), compile_backend="aot_eager")
    worker = Worker(
        settings.model_copy(
            update={"volume": tmp_path, "default_template": "warm", "preload": ("warm",), "speed": speed}
        )
    )
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    with caplog.at_level("INFO", logger="fuseline.worker"):
        assert worker.startup() == []
    (warmed,) = [event_fields(r)[1] for r in caplog.records if event_fields(r)[0] == "template.warmed"]
    assert (warmed["template"], warmed["width"], warmed["height"]) == ("warm", 320, 256) and warmed["ms"] > 0
    assert torch._dynamo.utils.counters["frames"]["ok"] > frames  # dynamo compiled the UNet's forward
    # Without `compile` there is nothing to warm: no extra generation at start.
    caplog.clear()
    plain = Worker(
        settings.model_copy(update={"volume": tmp_path, "default_template": "warm", "preload": ("warm",)})
    )
    with caplog.at_level("INFO", logger="fuseline.worker"):
        assert plain.startup() == []
    assert not [r for r in caplog.records if event_fields(r)[0] == "template.warmed"]


def test_fp8_is_an_option_and_is_refused_at_start_on_a_device_without_fp8(settings) -> None:
    """fp8 parses as a FUSELINE_SPEED option, but a worker on the CPU (no fp8 matmuls) refuses to start
    with CONFIG_INVALID naming the option, the device and the fix, before loading anything."""
    speed = SpeedOptions.from_env({"FUSELINE_SPEED": "fp8,channels_last"})
    assert speed.options == ("fp8", "channels_last")
    with pytest.raises(ConfigInvalid) as err:
        worker_with(settings, speed)
    assert err.value.code == "CONFIG_INVALID"
    message = str(err.value)
    assert "fp8" in message and "'cpu'" in message and "remove fp8 from FUSELINE_SPEED" in message


def test_fp8_is_refused_where_a_pipeline_is_switched_too(tiny_worker) -> None:
    """apply_speed_options (what the GPU benchmark and the loader call) checks the pipeline's own device."""
    from worker.speed import apply_speed_options, fp8_problem

    entry, _ = tiny_worker.cache.get(TEMPLATE)
    assert fp8_problem("cpu") is not None
    with pytest.raises(ConfigInvalid, match="fp8"):
        apply_speed_options(entry.pipe, SpeedOptions(options=("fp8",)))
