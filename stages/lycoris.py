"""The LyCORIS weight updates on tensors: LoHa, LoKr and LoCon with a Tucker core (no files, no names).

stages/lora.py reads a file's LyCORIS modules into these; stages/fuse.py adds `delta(shape) * scale` to the
base weight, in fp32, and applies a DoRA magnitude (`dora_scale`) as it does for any DoRA update. Each
delta is the update the module's forward pass applies in the LyCORIS library at multiplier 1
(lycoris-lora 4.1.3, `LohaModule`/`LokrModule`/`LoConModule.forward`: `get_weight(shape) * scalar`, or
`make_weight() * scale` for LoCon), which is also what A1111's and ComfyUI's loaders apply:

    LoHa          (alpha/r) * (w1_a @ w1_b) ⊙ (w2_a @ w2_b)                      r = rows of w1_b
      Tucker      (alpha/r) * T(t1, w1_a, w1_b) ⊙ T(t2, w2_a, w2_b)              r = rows of w1_b
    LoKr          s * kron(W1, W2)     W1 = w1 or w1_a @ w1_b;  W2 = w2, w2_a @ w2_b or T(t2, w2_a, w2_b)
                  s = alpha/r, r = rows of w1_b, else of w2_b; s = 1 when w1 and w2 are both full
    LoCon Tucker  (alpha/r) * T(mid, up, down)                                   r = rows of down

with T(t, a, b)[p, q, ...] = sum_ij t[i, j, ...] a[i, p] b[j, q] (the Tucker core t contracted with a on
its first mode and b on its second; LyCORIS's `rebuild_tucker`). Conv updates without a core keep the
kernel flattened into the input dimension and are reshaped to the weight at the end.

Not LyCORIS's `get_diff_weight`/`get_merged_weight`: in 4.1.3 these multiply LoHa and LoKr deltas by
alpha/r a second time, which disagrees with its own forward and with A1111 and ComfyUI.

A missing alpha, or alpha 0, means alpha = r (scale 1): how LyCORIS's modules read it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def alpha_scale(alpha: float | None, rank: int) -> float:
    """alpha/r, with LyCORIS's reading of a missing or zero alpha as r."""
    return 1.0 if alpha is None or alpha == 0 else alpha / rank


def tucker(core: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """T(core, first, second): (r1, r2, *kernel) core, (r1, p) and (r2, q) factors -> (p, q, *kernel)."""
    return torch.einsum("i j ..., i p, j q -> p q ...", core, first, second)


def _fp32(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(torch.float32)


def _kernel_numel(shape: Sequence[int]) -> int:
    return math.prod(shape[2:])


def _weight_problem(shape: Sequence[int]) -> str | None:
    if len(shape) < 2:
        return f"a LyCORIS update needs a matrix or conv kernel, the base weight is {list(shape)}"
    return None


def _shapes(**tensors: torch.Tensor | None) -> str:
    return ", ".join(f"{name} {list(t.shape)}" for name, t in tensors.items() if t is not None)


@dataclass(frozen=True)
class LohaFactors:
    """LoHa (`hada_*`): the Hadamard product of two low-rank products, each with an optional Tucker core.

    Without cores w1_a, w2_a are (out, r) and w1_b, w2_b (r, in * kernel); with cores (conv kernels)
    w1_a, w2_a are (r, out), w1_b, w2_b (r, in) and t1, t2 (r, r, kh, kw).
    """

    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    alpha: float | None
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    magnitude_per_input: bool = False

    @property
    def rank(self) -> int:
        return int(self.w1_b.shape[0])

    def shape_problem(self, weight_shape: Sequence[int]) -> str | None:
        shape = tuple(weight_shape)
        if (problem := _weight_problem(shape)) is not None:
            return problem
        found = _shapes(
            w1_a=self.w1_a, w1_b=self.w1_b, w2_a=self.w2_a, w2_b=self.w2_b, t1=self.t1, t2=self.t2
        )
        if (self.t1 is None) != (self.t2 is None):
            return f"LoHa has one Tucker core of two ({found})"
        halves = ((self.w1_a, self.w1_b, self.t1), (self.w2_a, self.w2_b, self.t2))
        for a, b, core in halves:
            if a.ndim != 2 or b.ndim != 2:
                return f"LoHa factors must be matrices ({found})"
            if core is None:
                fits = (a.shape[0], a.shape[1], b.shape[1]) == (shape[0], b.shape[0], math.prod(shape[1:]))
            else:
                fits = (
                    core.ndim == len(shape)
                    and tuple(core.shape[2:]) == shape[2:]
                    and (a.shape[0], b.shape[0]) == tuple(core.shape[:2])
                    and (a.shape[1], b.shape[1]) == shape[:2]
                )
            if not fits:
                return f"LoHa factors do not fit base weight {list(shape)} ({found})"
        return None

    def delta(self, weight_shape: Sequence[int]) -> torch.Tensor:
        """(alpha/r) * W1 ⊙ W2 in fp32, shaped like the base weight."""
        w1_a, w1_b, w2_a, w2_b = (_fp32(t) for t in (self.w1_a, self.w1_b, self.w2_a, self.w2_b))
        if self.t1 is None:
            # LyCORIS's order: both products, their Hadamard product, then the scale.
            product = (w1_a @ w1_b) * (w2_a @ w2_b)
        else:
            product = tucker(_fp32(self.t1), w1_a, w1_b) * tucker(_fp32(self.t2), w2_a, w2_b)
        return (product * alpha_scale(self.alpha, self.rank)).reshape(tuple(weight_shape))


@dataclass(frozen=True)
class LokrFactors:
    """LoKr (`lokr_*`): kron(W1, W2), each half a full matrix or a low-rank product (W2 of a conv kernel
    also a Tucker core t2 with w2_a (r, b), w2_b (r, d)). W1 is (a, c), W2 (b, d) or (b, d, kh, kw), or
    (b, d * kh * kw) as a flattened low-rank product; the base weight is (a * b, c * d, kh, kw)."""

    alpha: float | None
    w1: torch.Tensor | None = None
    w1_a: torch.Tensor | None = None
    w1_b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2_a: torch.Tensor | None = None
    w2_b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    magnitude_per_input: bool = False

    @property
    def scale(self) -> float:
        """alpha/r, r the rank of a decomposed half (the rows of its `_b` factor, in every layout including
        the Tucker one); 1 when both halves are full matrices."""
        if self.w1_b is not None:
            return alpha_scale(self.alpha, int(self.w1_b.shape[0]))
        if self.w2_b is not None:
            return alpha_scale(self.alpha, int(self.w2_b.shape[0]))
        return 1.0

    def _found(self) -> str:
        return _shapes(
            w1=self.w1, w1_a=self.w1_a, w1_b=self.w1_b, w2=self.w2, w2_a=self.w2_a, w2_b=self.w2_b, t2=self.t2
        )

    def _halves_problem(self) -> str | None:
        if (self.w1 is None) == (self.w1_a is None or self.w1_b is None):
            return "LoKr needs lokr_w1, or lokr_w1_a with lokr_w1_b, and not both"
        if (self.w2 is None) == (self.w2_a is None or self.w2_b is None):
            return "LoKr needs lokr_w2, or lokr_w2_a with lokr_w2_b, and not both"
        if self.t2 is not None and self.w2 is not None:
            return "LoKr has a Tucker core lokr_t2 without lokr_w2_a/lokr_w2_b"
        return None

    def shape_problem(self, weight_shape: Sequence[int]) -> str | None:
        shape = tuple(weight_shape)
        if (problem := _weight_problem(shape) or self._halves_problem()) is not None:
            return problem
        kernel = _kernel_numel(shape)
        if self.w1 is not None:
            if self.w1.ndim != 2:
                return f"LoKr w1 must be a matrix ({self._found()})"
            a, c = self.w1.shape
        else:
            if self.w1_a.ndim != 2 or self.w1_b.ndim != 2 or self.w1_a.shape[1] != self.w1_b.shape[0]:
                return f"LoKr w1_a @ w1_b is not a matrix product ({self._found()})"
            a, c = self.w1_a.shape[0], self.w1_b.shape[1]
        if self.w2 is not None:
            b = self.w2.shape[0]
            if self.w2.ndim > 2:  # a full conv half (b, d, kh, kw)
                fits = self.w2.ndim == len(shape) and tuple(self.w2.shape[2:]) == shape[2:]
                fits = fits and c * self.w2.shape[1] == shape[1]
            else:  # (b, d), the kernel (if any) flattened into d
                width = self.w2.shape[1] if self.w2.ndim == 2 else -1
                fits = width % kernel == 0 and c * width == math.prod(shape[1:])
        elif self.t2 is not None:
            b = self.w2_a.shape[1] if self.w2_a.ndim == 2 else -1
            fits = (
                self.t2.ndim == len(shape)
                and tuple(self.t2.shape[2:]) == shape[2:]
                and self.w2_a.ndim == 2
                and self.w2_b.ndim == 2
                and (self.w2_a.shape[0], self.w2_b.shape[0]) == tuple(self.t2.shape[:2])
                and c * self.w2_b.shape[1] == shape[1]
            )
        else:
            b = self.w2_a.shape[0]
            width = self.w2_b.shape[1] if self.w2_b.ndim == 2 else -1
            fits = (
                self.w2_a.ndim == 2
                and self.w2_b.ndim == 2
                and self.w2_a.shape[1] == self.w2_b.shape[0]
                and width % kernel == 0
                and c * width == math.prod(shape[1:])
            )
        if not fits or a * b != shape[0]:
            return f"LoKr factors do not fit base weight {list(shape)} ({self._found()})"
        return None

    def delta(self, weight_shape: Sequence[int]) -> torch.Tensor:
        """s * kron(W1, W2) in fp32, shaped like the base weight."""
        shape = tuple(weight_shape)
        w1 = _fp32(self.w1) if self.w1 is not None else _fp32(self.w1_a) @ _fp32(self.w1_b)
        if self.w2 is not None:
            w2 = _fp32(self.w2)
        elif self.t2 is not None:
            w2 = tucker(_fp32(self.t2), _fp32(self.w2_a), _fp32(self.w2_b))
        else:
            w2 = _fp32(self.w2_a) @ _fp32(self.w2_b)
        # kron of the matrices with the kernel kept flattened into the columns of W2: column
        # c_i * (d * k) + (d_j * k + t) is input channel c_i * d + d_j, tap t, as the weight lays them out.
        product = torch.kron(w1, w2.reshape(w2.shape[0], -1))
        return (product * self.scale).reshape(shape)


@dataclass(frozen=True)
class TuckerLoconFactors:
    """LoCon with a Tucker core (`lora_mid`): down (r, in, 1, 1), mid (r, r, kh, kw), up (out, r, 1, 1)."""

    down: torch.Tensor
    mid: torch.Tensor
    up: torch.Tensor
    alpha: float | None
    magnitude: torch.Tensor | None = None
    magnitude_per_input: bool = False

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def shape_problem(self, weight_shape: Sequence[int]) -> str | None:
        shape = tuple(weight_shape)
        if (problem := _weight_problem(shape)) is not None:
            return problem
        down, mid, up = self.down, self.mid, self.up
        fits = (
            len(shape) > 2
            and mid.ndim == len(shape)
            and tuple(mid.shape[2:]) == shape[2:]
            and math.prod(down.shape[2:]) == 1
            and math.prod(up.shape[2:]) == 1
            and up.ndim >= 2
            and down.ndim >= 2
            and (up.shape[0], down.shape[1]) == shape[:2]
            and (mid.shape[0], mid.shape[1]) == (up.shape[1], down.shape[0])
        )
        if not fits:
            found = _shapes(lora_down=down, lora_mid=mid, lora_up=up)
            return f"Tucker LoCon factors do not fit base weight {list(shape)} ({found})"
        return None

    def delta(self, weight_shape: Sequence[int]) -> torch.Tensor:
        """(alpha/r) * T(mid, up, down) in fp32, shaped like the base weight."""
        core = tucker(_fp32(self.mid), _fp32(self.up).flatten(1).T, _fp32(self.down).flatten(1))
        return (core * alpha_scale(self.alpha, self.rank)).reshape(tuple(weight_shape))


LycorisFactors = LohaFactors | LokrFactors | TuckerLoconFactors
