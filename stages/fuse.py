"""The LoRA fusing math on tensors: no files, no names, no formats (stages/lora.py turns files into these).

One base weight W receives the updates of every LoRA of a template that targets it, in template order:

    plain LoRA   W <- W + s * (alpha / r) * up @ down                  (conv factors flattened, then reshaped)
    LyCORIS      W <- W + s * D            (D: the LoHa/LoKr/Tucker LoCon update, stages/lycoris.py)
    DoRA         W <- m / ||W0 + d|| * (W + d),  d = s * (alpha / r) * up @ down  (or s * D)

everything in fp32 (the caller casts the result to fp16 once). s is the LoRA's strength (its scale, times
its block weight for the module). The DoRA norm is taken per output channel (per input channel for a
LyCORIS magnitude stored that way, `wd_on_out=False`) over the *unmerged* base weight W0 plus this
adapter's own delta, which is how PEFT merges several adapters (`_unmerged_base_weight` in
peft.tuners.lora.layer); diffusers' `fuse_lora` is PEFT's merge. The strength is inside the norm, as PEFT
has it, for PEFT- and kohya-format DoRA alike (LyCORIS and ComfyUI scale DoRA differently at strengths
other than 1; docs/templates.md compares them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from stages.lycoris import LycorisFactors


@dataclass(frozen=True)
class LoraFactors:
    """One LoRA's low-rank update of one base weight, as read from the file (any float dtype).

    `down` is (r, in) for a linear layer or (r, in, kh, kw) for a conv (LoCon); `up` is (out, r) or
    (out, r, 1, 1). `magnitude` is DoRA's per-output-channel magnitude vector (`out` values, any shape).
    `rslora` divides alpha by sqrt(r) instead of r (PEFT's `use_rslora`). `magnitude_per_input`: the
    magnitude holds one value per input channel (a kohya-format `dora_scale` written with LyCORIS's
    `wd_on_out=False`).
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    magnitude: torch.Tensor | None = None
    rslora: bool = False
    magnitude_per_input: bool = False

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass(frozen=True)
class WeightUpdate:
    """A LoRA's factors with the strength the template gives that LoRA (for this module)."""

    factors: LoraFactors | LycorisFactors
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
        return f"up factor {list(up.shape)} has a spatial kernel (a LoCon keeps it in down or in lora_mid)"
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
    return magnitude_problem(factors, shape)


def magnitude_problem(factors: LoraFactors | LycorisFactors, weight_shape: Sequence[int]) -> str | None:
    """Why the factors' DoRA magnitude does not fit a weight of `weight_shape`, or None."""
    magnitude = factors.magnitude
    if magnitude is None:
        return None
    axis, what = (1, "columns") if factors.magnitude_per_input else (0, "rows")
    if magnitude.numel() != weight_shape[axis]:
        found = f"DoRA magnitude has {magnitude.numel()} values"
        return f"{found}, the base weight has {weight_shape[axis]} {what}"
    return None


def lora_delta(factors: LoraFactors, scale: float, weight_shape: Sequence[int]) -> torch.Tensor:
    """scale * alpha/r * up @ down in fp32, shaped like the base weight (conv kernels: flatten, reshape)."""
    up = factors.up.to(torch.float32).flatten(1)
    down = factors.down.to(torch.float32).flatten(1)
    return (up @ down).reshape(tuple(weight_shape)) * scaling(factors, scale)


def stacked_lora(updates: Sequence[WeightUpdate]) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain LoRA updates of one weight as a single low-rank product, in fp32: (up, down) with
    up @ down == sum of scaling_i * up_i @ down_i, up (out, R) holding each LoRA's up columns times its
    multiplier and down (R, in) the down rows stacked, R the sum of the ranks (conv factors flattened).

    One product of rank R costs the same arithmetic as the separate ones, but passes over the full-size
    weight once instead of once per LoRA (B1, docs/benchmarks.md). Scaling the (out, r) factor instead of
    the product changes only fp32 rounding, far below one fp16 ulp of the fused weight."""
    ups, downs = [], []
    for update in updates:
        factors = update.factors
        if not isinstance(factors, LoraFactors) or factors.magnitude is not None:
            raise TypeError("stacked_lora takes plain LoRA factors only (no LyCORIS, no DoRA)")
        ups.append(factors.up.flatten(1).to(torch.float32) * scaling(factors, update.scale))
        downs.append(factors.down.flatten(1).to(torch.float32))
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


def update_delta(update: WeightUpdate, weight_shape: Sequence[int]) -> torch.Tensor:
    """The update's delta at its strength, in fp32, shaped like the base weight."""
    if isinstance(update.factors, LoraFactors):
        return lora_delta(update.factors, update.scale, weight_shape)
    return update.factors.delta(weight_shape) * update.scale


def dora_norm(weight: torch.Tensor, per_input: bool = False) -> torch.Tensor:
    """L2 norm of each output channel (row of a matrix, filter of a conv), as a (out, 1, ...) column; with
    `per_input`, of each input channel (over outputs and kernel taps), as a (1, in, 1, ...) row."""
    if per_input:
        return torch.linalg.vector_norm(weight, dim=(0, *range(2, weight.ndim)), keepdim=True)
    norm = torch.linalg.vector_norm(weight, dim=tuple(range(1, weight.ndim)))
    return norm.view(-1, *([1] * (weight.ndim - 1)))


def fuse_weight(base: torch.Tensor, updates: Sequence[WeightUpdate]) -> torch.Tensor:
    """The base weight with every update applied in order, in fp32. Never modifies `base`."""
    original = base.to(torch.float32)
    fused = original
    for update in updates:
        delta = update_delta(update, original.shape)
        magnitude = update.factors.magnitude
        if magnitude is None:
            fused = fused + delta
        else:
            norm = dora_norm(original + delta, per_input=update.factors.magnitude_per_input)
            factor = magnitude.to(torch.float32).reshape(norm.shape) / norm
            fused = factor * (fused + delta)
    return fused
