"""The LoRA fusing math on tensors: no files, no names, no formats (stages/lora.py turns files into these).

One base weight W receives the updates of every LoRA of a template that targets it, in template order:

    plain LoRA   W <- W + s * (alpha / r) * up @ down                  (conv factors flattened, then reshaped)
    DoRA         W <- m / ||W0 + d|| * (W + d),  d = s * (alpha / r) * up @ down

everything in fp32 (the caller casts the result to fp16 once). The DoRA norm is taken per output channel
over the *unmerged* base weight W0 plus this adapter's own delta, which is how PEFT merges several adapters
(`_unmerged_base_weight` in peft.tuners.lora.layer); diffusers' `fuse_lora` is PEFT's merge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoraFactors:
    """One LoRA's low-rank update of one base weight, as read from the file (any float dtype).

    `down` is (r, in) for a linear layer or (r, in, kh, kw) for a conv (LoCon); `up` is (out, r) or
    (out, r, 1, 1). `magnitude` is DoRA's per-output-channel magnitude vector (`out` values, any shape).
    `rslora` divides alpha by sqrt(r) instead of r (PEFT's `use_rslora`).
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    magnitude: torch.Tensor | None = None
    rslora: bool = False

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass(frozen=True)
class WeightUpdate:
    """A LoRA's factors with the strength the template gives that LoRA."""

    factors: LoraFactors
    scale: float


def scaling(factors: LoraFactors, scale: float) -> float:
    """The multiplier of up @ down, computed in the same order PEFT's `set_scale` does (scale * alpha / r),
    so the fp32 products agree bit for bit with the oracle."""
    divisor = math.sqrt(factors.rank) if factors.rslora else factors.rank
    return scale * factors.alpha / divisor


def factor_shape_problem(factors: LoraFactors, weight_shape: Sequence[int]) -> str | None:
    """Why these factors cannot update a weight of `weight_shape`, or None when they fit."""
    shape = tuple(weight_shape)
    down, up = factors.down, factors.up
    if len(shape) < 2 or down.ndim < 2 or up.ndim < 2:
        return f"a LoRA needs a matrix or conv kernel, the base weight is {list(shape)}"
    rank = factors.rank
    in_numel = math.prod(shape[1:])
    expected_down = (rank, *shape[1:]) if down.ndim == len(shape) else (rank, in_numel)
    if up.ndim > 2 and math.prod(up.shape[2:]) != 1:
        return f"up factor {list(up.shape)} has a spatial kernel (LyCORIS Tucker variants are not supported)"
    if tuple(up.shape[:2]) != (shape[0], rank):
        expected_up = [shape[0], rank]
        return f"up factor {list(up.shape)} does not fit base weight {list(shape)} (expected {expected_up})"
    if down.ndim == len(shape) and tuple(down.shape) != expected_down:
        return (
            f"down factor {list(down.shape)} does not fit base weight {list(shape)} "
            f"(expected {list(expected_down)})"
        )
    if down.ndim != len(shape) and math.prod(down.shape[1:]) != in_numel:
        return f"down factor {list(down.shape)} does not fit base weight {list(shape)}"
    if factors.magnitude is not None and factors.magnitude.numel() != shape[0]:
        return f"DoRA magnitude has {factors.magnitude.numel()} values, the base weight has {shape[0]} rows"
    return None


def lora_delta(factors: LoraFactors, scale: float, weight_shape: Sequence[int]) -> torch.Tensor:
    """scale * alpha/r * up @ down in fp32, shaped like the base weight (conv kernels: flatten, reshape)."""
    up = factors.up.to(torch.float32).flatten(1)
    down = factors.down.to(torch.float32).flatten(1)
    return (up @ down).reshape(tuple(weight_shape)) * scaling(factors, scale)


def dora_norm(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output channel (row of a matrix, filter of a conv), as a (out, 1, ...) column."""
    norm = torch.linalg.vector_norm(weight, dim=tuple(range(1, weight.ndim)))
    return norm.view(-1, *([1] * (weight.ndim - 1)))


def fuse_weight(base: torch.Tensor, updates: Sequence[WeightUpdate]) -> torch.Tensor:
    """The base weight with every update applied in order, in fp32. Never modifies `base`."""
    original = base.to(torch.float32)
    fused = original
    for update in updates:
        delta = lora_delta(update.factors, update.scale, original.shape)
        magnitude = update.factors.magnitude
        if magnitude is None:
            fused = fused + delta
        else:
            norm = dora_norm(original + delta)
            factor = magnitude.to(torch.float32).reshape(norm.shape) / norm
            fused = factor * (fused + delta)
    return fused
