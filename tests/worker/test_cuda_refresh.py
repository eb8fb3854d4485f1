"""An unrecoverable CUDA error fails the job with `[CUDA_ERROR]` and `refresh_worker`, which runpod turns
into `stopPod` so that RunPod replaces the worker. On CPU: the served pipeline's UNet raises the exception
type torch uses for CUDA errors (torch.AcceleratorError) from a real forward hook; nothing in the handler
is replaced."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import torch
from torch.overrides import TorchFunctionMode

from tests.worker.conftest import SMALL, TEMPLATE
from worker.device import unrecoverable_device_error
from worker.errors import ModelInvalid
from worker.handler import get_worker, handler

pytestmark = pytest.mark.usefixtures("served")

# The text torch gives a device-side assert (first line), plus its usual second line.
DEVICE_ASSERT = (
    "CUDA error: device-side assert triggered\n"
    "CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below "
    "might be incorrect."
)
JOB = {"id": "job-cuda", "input": {"prompt": "a lighthouse", **SMALL, "seed": 3}}


@pytest.fixture
def unet_raises() -> Iterator[list[BaseException]]:
    """The served worker's UNet raises the exception put in the returned list, at its next forward."""
    entry, _ = get_worker().cache.get(TEMPLATE)
    to_raise: list[BaseException] = []

    def hook(_module, _args):
        if to_raise:
            raise to_raise[0]

    handle = entry.pipe.unet.register_forward_pre_hook(hook)
    yield to_raise
    handle.remove()


def test_cuda_error_fails_the_job_and_asks_for_a_new_worker(unet_raises) -> None:
    unet_raises.append(torch.AcceleratorError(DEVICE_ASSERT))
    result = handler(JOB)
    assert set(result) == {"error", "refresh_worker"} and result["refresh_worker"] is True
    assert result["error"] == (
        "[CUDA_ERROR] AcceleratorError: CUDA error: device-side assert triggered; the GPU cannot be used "
        "after this error, so this worker is being replaced; retry the job"
    )


def test_runpod_turns_refresh_worker_into_stop_pod(unet_raises) -> None:
    """runpod 1.12's own job runner (the one its worker loop and local API use) pops `refresh_worker` and
    sends `stopPod` with the failure."""
    from runpod.serverless.modules.rp_job import run_job

    unet_raises.append(RuntimeError("CUDA error: an illegal memory access was encountered"))
    run_result = asyncio.run(run_job(handler, {**JOB, "input": dict(JOB["input"])}))
    assert run_result["stopPod"] is True
    assert run_result["error"].startswith("[CUDA_ERROR] RuntimeError: CUDA error: an illegal memory access")
    assert "output" not in run_result and "refresh_worker" not in str(run_result)


def test_other_failures_keep_the_worker(unet_raises) -> None:
    unet_raises.append(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    result = handler(JOB)
    assert set(result) == {"error"}
    assert result["error"].startswith("[INTERNAL_ERROR] RuntimeError: mat1 and mat2 shapes")
    # With the hook silent again the same worker serves the next job.
    unet_raises.clear()
    assert "images" in handler(JOB)


@pytest.mark.parametrize(
    ("exc", "fatal"),
    [
        (torch.AcceleratorError("CUDA error: unspecified launch failure"), True),
        (RuntimeError("CUDA error: device-side assert triggered"), True),
        (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx( handle, ...)`"), True),
        # Out-of-memory is recoverable (evict and retry), whichever way torch reports it.
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
        (RuntimeError("CUDA error: out of memory"), False),
        (RuntimeError("Expected all tensors to be on the same device"), False),
        (ValueError("CUDA error: in a ValueError is not torch's"), False),
    ],
)
def test_which_errors_are_unrecoverable(exc: BaseException, fatal: bool) -> None:
    assert (unrecoverable_device_error(exc) is exc) is fatal


def test_a_cuda_error_wrapped_in_a_worker_error_is_found() -> None:
    # As worker/pipelines.py wraps any load failure: `raise ModelInvalid(...) from None`.
    try:
        try:
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
        except Exception as exc:
            raise ModelInvalid(f"template 'x': diffusers could not load it: {exc}") from None
    except ModelInvalid as wrapped:
        found = unrecoverable_device_error(wrapped)
    assert isinstance(found, torch.AcceleratorError)


class DeviceFails(TorchFunctionMode):
    """Every torch call in this context raises the CUDA error type, as every call does on a GPU after a
    sticky CUDA error (torch's own mode mechanism; diffusers' loading runs through it unchanged)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        raise torch.AcceleratorError(DEVICE_ASSERT)


def test_a_cuda_error_while_loading_is_not_taken_for_a_broken_folder(kit, settings, tmp_path) -> None:
    """Loading the merged folder, or the runtime-LoRA fallback, meets a CUDA error: it propagates as is
    (like out-of-memory), not as MODEL_INVALID, and the fallback is not tried on the broken GPU; the job
    answers CUDA_ERROR with refresh_worker, and the start reports it as a problem instead of crashing."""

    from tests.worker.test_fallback import TEMPLATE as STYLED
    from tests.worker.test_fallback import make_volume, recipe_for, settings_for
    from worker.fallback import load_serving
    from worker.pipelines import load_template
    from worker.serving import Worker

    fallback_ready = settings_for(make_volume(tmp_path, kit, recipes=[recipe_for(kit)]))
    with DeviceFails():
        with pytest.raises(torch.AcceleratorError):
            load_template(settings, TEMPLATE, "cpu")
        with pytest.raises(torch.AcceleratorError):
            load_serving(fallback_ready, STYLED, "cpu")
        problems = Worker(
            settings.model_copy(update={"default_template": TEMPLATE, "preload": (TEMPLATE,)})
        ).startup()
    assert problems == [f"template {TEMPLATE!r}: AcceleratorError: CUDA error: device-side assert triggered"]
    worker = get_worker()
    worker.cache.evict(TEMPLATE)
    with DeviceFails():
        result = handler(JOB)
    assert result["refresh_worker"] is True and result["error"].startswith("[CUDA_ERROR] AcceleratorError: ")
