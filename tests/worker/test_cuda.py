"""The CUDA path: fp16 pipelines, a real fp16 VAE overflow, a real out-of-memory. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from tests.worker.conftest import SMALL, TEMPLATE
from worker.errors import OutOfMemory
from worker.serving import VRAM_SHARE, Worker

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def cuda_worker(settings) -> Worker:
    return Worker(settings.model_copy(update={"device": "cuda"}))


def test_fp16_on_cuda_and_reproducible(cuda_worker: Worker) -> None:
    job = {"template": TEMPLATE, "prompt": "a (red:1.2) fox", **SMALL, "seed": 5}
    first = cuda_worker.run(job)
    assert cuda_worker.run(job)["images"][0]["data"] == first["images"][0]["data"]
    entry, _ = cuda_worker.cache.get(TEMPLATE)
    assert entry.pipe.unet.dtype == torch.float16 and entry.pipe.device.type == "cuda"
    total = torch.cuda.get_device_properties("cuda").total_memory
    assert cuda_worker.cache.max_bytes == int(total * VRAM_SHARE)


def test_fp16_vae_overflow_is_retried_in_fp32_on_cuda(cuda_worker: Worker) -> None:
    # No cast by the test: on CUDA the folder's fp16 VAE runs in fp16 and really overflows.
    result = cuda_worker.run({"template": "hot-vae", "prompt": "a cat", **SMALL, "seed": 1})
    assert result["warnings"] == [
        "NaN/Inf in the decoded pixels in the torch.float16 VAE decode; decoded again in float32"
    ]
    entry, _ = cuda_worker.cache.get("hot-vae")
    assert entry.pipe.vae.dtype == torch.float16


def test_out_of_memory_frees_caches_retries_once_then_reports(cuda_worker: Worker) -> None:
    cuda_worker.cache.get(TEMPLATE)
    cuda_worker.cache.get("tiny-defaults")
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties("cuda").total_memory
    # A cap a few MB above what the cached pipelines hold: a 4-image 2048x1152 job cannot fit.
    cap = torch.cuda.memory_reserved() + 8 * 1024**2
    torch.cuda.set_per_process_memory_fraction(cap / total)
    try:
        big = {"template": TEMPLATE, "prompt": "a cat", "width": 2048, "height": 1152, "steps": 1}
        with pytest.raises(OutOfMemory, match="out of GPU memory also after freeing cached pipelines"):
            cuda_worker.run({**big, "num_images": 4})
        # The retry evicted every other pipeline.
        assert cuda_worker.cache.loaded() == [TEMPLATE]
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    # The worker is still usable.
    assert cuda_worker.run({"template": TEMPLATE, "prompt": "a cat", **SMALL, "seed": 1})["images"]
