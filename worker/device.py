"""The device a worker generates on: which one, and the errors it raises that are the GPU's, not a model
folder's (out of memory: recoverable by freeing memory; a sticky CUDA error: the worker must be replaced).
torch is imported inside each function: importing this module costs nothing."""

from __future__ import annotations

import gc

# Substrings of torch/CUDA messages for errors after which the CUDA context is corrupt (a sticky error:
# every later kernel launch fails). Out-of-memory is not one of them: freeing memory recovers from it.
_FATAL_DEVICE_MARKERS = (
    "CUDA error",
    "device-side assert",
    "illegal memory access",
    "CUBLAS_STATUS_EXECUTION_FAILED",
    "unspecified launch failure",
)


def default_device(configured: str | None) -> str:
    """`configured` (FUSELINE_DEVICE) when set, else "cuda" when a GPU is there, else "cpu"."""
    import torch

    if configured:
        return configured
    return "cuda" if torch.cuda.is_available() else "cpu"


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError)


def free_memory() -> None:
    """Collect garbage and give cached GPU memory back (after evicting pipelines)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def unrecoverable_device_error(exc: BaseException) -> BaseException | None:
    """The CUDA error (not out-of-memory) in `exc` or its cause/context chain, else None.

    torch.AcceleratorError is torch's type for CUDA runtime errors; a RuntimeError carrying a CUDA error
    message counts too (cuBLAS, extensions). The chain is followed even past `raise … from None`, because
    wrappers such as ModelInvalid ("diffusers could not load …") hide a device error that way."""
    import torch

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        message = str(current)
        out_of_memory = isinstance(current, torch.OutOfMemoryError) or "out of memory" in message.lower()
        if not out_of_memory and (
            isinstance(current, torch.AcceleratorError)
            or (isinstance(current, RuntimeError) and any(m in message for m in _FATAL_DEVICE_MARKERS))
        ):
            return current
        current = current.__cause__ or current.__context__
    return None
