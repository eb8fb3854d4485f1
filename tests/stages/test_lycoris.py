"""The LyCORIS update math on tiny tensors, no files: each delta against an independent formulation (explicit
sums, torch's own convolutions), the scale rules, the shape checks, and DoRA's strength convention."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from stages.fuse import LoraFactors, WeightUpdate, dora_norm, fuse_weight, magnitude_problem
from stages.lycoris import LohaFactors, LokrFactors, TuckerLoconFactors, alpha_scale, tucker


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float64)


def _tucker_by_sums(core: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """T(core, a, b)[p, q, ...] = sum_ij core[i, j, ...] a[i, p] b[j, q], written out as loops."""
    out = torch.zeros(first.shape[1], second.shape[1], *core.shape[2:], dtype=torch.float64)
    for i, j in itertools.product(range(core.shape[0]), range(core.shape[1])):
        out += core[i, j] * torch.einsum("p,q->pq", first[i], second[j]).reshape(*out.shape[:2], 1, 1)
    return out


def test_tucker_is_the_core_contracted_on_both_modes():
    g = _gen(0)
    core, a, b = _randn(g, 2, 3, 3, 3), _randn(g, 2, 5), _randn(g, 3, 4)
    torch.testing.assert_close(tucker(core, a, b), _tucker_by_sums(core, a, b))


def test_loha_linear_is_alpha_over_rank_times_the_hadamard_product():
    g = _gen(1)
    w1_a, w1_b, w2_a, w2_b = _randn(g, 6, 3), _randn(g, 3, 5), _randn(g, 6, 3), _randn(g, 3, 5)
    factors = LohaFactors(w1_a.float(), w1_b.float(), w2_a.float(), w2_b.float(), alpha=1.5)
    expected = torch.empty(6, 5, dtype=torch.float64)
    for o, i in itertools.product(range(6), range(5)):
        expected[o, i] = (1.5 / 3) * (w1_a[o] @ w1_b[:, i]) * (w2_a[o] @ w2_b[:, i])
    assert factors.shape_problem((6, 5)) is None
    delta = factors.delta((6, 5))
    assert delta.dtype == torch.float32
    torch.testing.assert_close(delta.double(), expected, rtol=1e-5, atol=1e-6)


def test_loha_conv_without_core_keeps_the_kernel_in_the_input_dimension():
    g = _gen(2)
    w1_a, w1_b, w2_a, w2_b = _randn(g, 4, 2), _randn(g, 2, 3 * 9), _randn(g, 4, 2), _randn(g, 2, 3 * 9)
    factors = LohaFactors(w1_a.float(), w1_b.float(), w2_a.float(), w2_b.float(), alpha=None)
    expected = ((w1_a @ w1_b) * (w2_a @ w2_b)).reshape(4, 3, 3, 3)  # alpha absent: scale 1
    torch.testing.assert_close(factors.delta((4, 3, 3, 3)).double(), expected, rtol=1e-5, atol=1e-6)


def test_loha_tucker_multiplies_two_tucker_rebuilds():
    g = _gen(3)
    t1, t2 = _randn(g, 2, 2, 3, 3), _randn(g, 2, 2, 3, 3)
    w1_a, w1_b, w2_a, w2_b = _randn(g, 2, 5), _randn(g, 2, 4), _randn(g, 2, 5), _randn(g, 2, 4)
    factors = LohaFactors(
        *(t.float() for t in (w1_a, w1_b, w2_a, w2_b)), alpha=4.0, t1=t1.float(), t2=t2.float()
    )
    expected = 2.0 * _tucker_by_sums(t1, w1_a, w1_b) * _tucker_by_sums(t2, w2_a, w2_b)
    assert factors.shape_problem((5, 4, 3, 3)) is None
    torch.testing.assert_close(factors.delta((5, 4, 3, 3)).double(), expected, rtol=1e-5, atol=1e-6)


def _kron_by_entries(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """kron(W1, W2)[i*b + k, j*d + l, ...] = W1[i, j] * W2[k, l, ...]."""
    (a, c), (b, d) = w1.shape, w2.shape[:2]
    out = torch.empty(a * b, c * d, *w2.shape[2:], dtype=torch.float64)
    for i, j, k, l in itertools.product(range(a), range(c), range(b), range(d)):  # noqa: E741
        out[i * b + k, j * d + l] = w1[i, j] * w2[k, l]
    return out


def test_lokr_with_two_full_halves_is_their_kronecker_product_at_scale_one():
    g = _gen(4)
    w1, w2 = _randn(g, 2, 3), _randn(g, 4, 5)
    factors = LokrFactors(alpha=7.0, w1=w1.float(), w2=w2.float())
    assert factors.scale == 1.0  # alpha is ignored when nothing is low-rank
    assert factors.shape_problem((8, 15)) is None
    torch.testing.assert_close(
        factors.delta((8, 15)).double(), _kron_by_entries(w1, w2), rtol=1e-5, atol=1e-6
    )


def test_lokr_with_a_low_rank_half_scales_by_alpha_over_its_rank():
    g = _gen(5)
    w1, w2_a, w2_b = _randn(g, 2, 2), _randn(g, 4, 3), _randn(g, 3, 6)
    factors = LokrFactors(alpha=1.5, w1=w1.float(), w2_a=w2_a.float(), w2_b=w2_b.float())
    assert factors.scale == pytest.approx(0.5)
    expected = 0.5 * _kron_by_entries(w1, w2_a @ w2_b)
    torch.testing.assert_close(factors.delta((8, 12)).double(), expected, rtol=1e-5, atol=1e-6)


def test_lokr_both_halves_low_rank():
    g = _gen(6)
    w1_a, w1_b, w2_a, w2_b = _randn(g, 2, 1), _randn(g, 1, 3), _randn(g, 4, 1), _randn(g, 1, 5)
    factors = LokrFactors(
        alpha=2.0, w1_a=w1_a.float(), w1_b=w1_b.float(), w2_a=w2_a.float(), w2_b=w2_b.float()
    )
    expected = 2.0 * _kron_by_entries(w1_a @ w1_b, w2_a @ w2_b)
    torch.testing.assert_close(factors.delta((8, 15)).double(), expected, rtol=1e-5, atol=1e-6)


def test_lokr_conv_kernels_match_the_4d_kronecker_product():
    """A conv's kernel lives in W2 only: kron(W1[..., None, None], W2) over all four dimensions (what LyCORIS
    builds), whether W2 is a full (b, d, kh, kw) tensor, a low-rank product with the kernel flattened into
    its columns, or a Tucker rebuild."""
    g = _gen(7)
    w1 = _randn(g, 2, 3)
    w2 = _randn(g, 4, 2, 3, 3)
    full = LokrFactors(alpha=None, w1=w1.float(), w2=w2.float())
    expected = torch.kron(w1[:, :, None, None], w2)
    torch.testing.assert_close(full.delta((8, 6, 3, 3)).double(), expected, rtol=1e-5, atol=1e-6)

    w2_a, w2_b = _randn(g, 4, 2), _randn(g, 2, 2 * 9)
    flat = LokrFactors(alpha=1.0, w1=w1.float(), w2_a=w2_a.float(), w2_b=w2_b.float())
    expected = 0.5 * torch.kron(w1[:, :, None, None], (w2_a @ w2_b).reshape(4, 2, 3, 3))
    torch.testing.assert_close(flat.delta((8, 6, 3, 3)).double(), expected, rtol=1e-5, atol=1e-6)

    t2, w2_a, w2_b = _randn(g, 2, 2, 3, 3), _randn(g, 2, 4), _randn(g, 2, 2)
    core = LokrFactors(alpha=1.0, w1=w1.float(), w2_a=w2_a.float(), w2_b=w2_b.float(), t2=t2.float())
    assert core.scale == pytest.approx(0.5)  # the rank is the rows of w2_b, also with a core
    expected = 0.5 * torch.kron(w1[:, :, None, None], _tucker_by_sums(t2, w2_a, w2_b))
    assert core.shape_problem((8, 6, 3, 3)) is None
    torch.testing.assert_close(core.delta((8, 6, 3, 3)).double(), expected, rtol=1e-5, atol=1e-6)


def test_tucker_locon_delta_matches_its_three_convolutions():
    """LoCon with a core runs down (1x1), mid (kxk) and up (1x1) as convolutions; the delta is the kernel
    of their composition."""
    g = _gen(8)
    down, mid, up = (
        torch.randn(3, 4, 1, 1, generator=g),
        torch.randn(3, 3, 3, 3, generator=g),
        torch.randn(5, 3, 1, 1, generator=g),
    )
    factors = TuckerLoconFactors(down=down, mid=mid, up=up, alpha=1.5)
    assert factors.shape_problem((5, 4, 3, 3)) is None
    delta = factors.delta((5, 4, 3, 3))
    x = torch.randn(2, 4, 7, 7, generator=g)
    composed = nn.functional.conv2d(nn.functional.conv2d(nn.functional.conv2d(x, down), mid, padding=1), up)
    torch.testing.assert_close(
        nn.functional.conv2d(x, delta, padding=1), 0.5 * composed, rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize(
    ("alpha", "rank", "scale"), [(None, 4, 1.0), (0.0, 4, 1.0), (2.0, 4, 0.5), (8.0, 4, 2.0)]
)
def test_alpha_scale_reads_missing_or_zero_alpha_as_the_rank(alpha, rank, scale):
    assert alpha_scale(alpha, rank) == scale


def _z(*shape: int) -> torch.Tensor:
    return torch.zeros(shape)


def _hada(out: int, inp: int, **extra: torch.Tensor) -> LohaFactors:
    return LohaFactors(_z(out, 2), _z(2, inp), _z(out, 2), _z(2, inp), None, **extra)


def _hada_core(out: int, inp: int, **cores: torch.Tensor) -> LohaFactors:
    return LohaFactors(_z(2, out), _z(2, inp), _z(2, out), _z(2, inp), None, **cores)


def _mid(rank: int) -> TuckerLoconFactors:
    return TuckerLoconFactors(_z(3, 4, 1, 1), _z(rank, 3, 3, 3), _z(5, 3, 1, 1), None)


@pytest.mark.parametrize(
    ("factors", "weight", "fragment"),
    [
        (_hada(6, 5), (6, 5), None),
        (_hada(6, 5), (6, 4), "LoHa factors do not fit"),
        (_hada(6, 5), (6,), "matrix or conv"),
        (_hada_core(6, 5, t1=_z(2, 2, 3, 3)), (6, 5, 3, 3), "one Tucker core"),
        (_hada_core(6, 5, t1=_z(2, 2, 3, 3), t2=_z(2, 2, 1, 1)), (6, 5, 3, 3), "LoHa factors do not fit"),
        (LokrFactors(None, w1=_z(2, 3), w2=_z(4, 5)), (8, 15), None),
        (LokrFactors(None, w1=_z(2, 3), w2=_z(4, 5)), (8, 16), "LoKr factors do not fit"),
        (LokrFactors(None, w1=_z(2, 3)), (8, 15), "lokr_w2"),
        (LokrFactors(None, w1=_z(2, 3), w1_a=_z(2, 1), w1_b=_z(1, 3), w2=_z(4, 5)), (8, 15), "lokr_w1"),
        (LokrFactors(None, w1=_z(2, 3), w2=_z(4, 5), t2=_z(2, 2, 3, 3)), (8, 15), "Tucker core"),
        (LokrFactors(None, w1=_z(2, 3), w2_a=_z(4, 2), w2_b=_z(2, 10)), (8, 6, 3, 3), "do not fit"),
        (_mid(3), (5, 4, 3, 3), None),
        (_mid(3), (5, 4, 1, 1), "Tucker LoCon"),
        (_mid(2), (5, 4, 3, 3), "Tucker LoCon"),
    ],
)
def test_shape_problems(factors, weight, fragment):
    problem = factors.shape_problem(weight)
    if fragment is None:
        assert problem is None
    else:
        assert problem is not None and fragment in problem


# --------------------------------------------------------------------------------------------------------
# In the fuse: LyCORIS updates at a strength, and DoRA magnitudes on either axis


def _loha(g: torch.Generator, out: int, inp: int, rank: int = 2) -> LohaFactors:
    return LohaFactors(
        torch.randn(out, rank, generator=g),
        torch.randn(rank, inp, generator=g),
        torch.randn(out, rank, generator=g),
        torch.randn(rank, inp, generator=g),
        alpha=1.0,
    )


def test_lycoris_updates_add_their_delta_times_the_strength_in_order():
    g = _gen(9)
    w = torch.randn(6, 5, generator=g)
    loha, lora = (
        _loha(g, 6, 5),
        LoraFactors(torch.randn(2, 5, generator=g), torch.randn(6, 2, generator=g), 2.0),
    )
    fused = fuse_weight(w, [WeightUpdate(loha, 0.7), WeightUpdate(lora, -0.5)])
    expected = w + 0.7 * loha.delta((6, 5)) - 0.5 * (lora.up @ lora.down)
    torch.testing.assert_close(fused, expected)


@pytest.mark.parametrize("per_input", [False, True])
def test_dora_at_strength_one_gives_the_magnitude_as_the_channel_norms(per_input):
    """m / ||W + D|| * (W + D): each output row (or, for a per-input magnitude, each input column) of the
    result has norm m, for LyCORIS and LoRA factors alike."""
    g = _gen(10)
    w = torch.randn(6, 5, 3, 3, generator=g)
    axis = 1 if per_input else 0
    magnitude = 1.0 + torch.rand(w.shape[axis], generator=g)
    shape = (1, 5, 1, 1) if per_input else (6, 1, 1, 1)  # how LyCORIS stores dora_scale
    loha = LohaFactors(
        *(torch.randn(shape, generator=g) for shape in ((6, 2), (2, 45), (6, 2), (2, 45))),
        alpha=1.0,
        magnitude=magnitude.reshape(shape),
        magnitude_per_input=per_input,
    )
    assert magnitude_problem(loha, w.shape) is None
    fused = fuse_weight(w, [WeightUpdate(loha, 1.0)])
    torch.testing.assert_close(
        dora_norm(fused, per_input=per_input).flatten(), magnitude, rtol=1e-5, atol=1e-5
    )


def test_dora_magnitude_on_the_wrong_axis_is_a_problem():
    loha = LohaFactors(
        _z(6, 2), _z(2, 5), _z(6, 2), _z(2, 5), None, magnitude=_z(1, 5), magnitude_per_input=False
    )
    assert "6 rows" in magnitude_problem(loha, (6, 5))
    loha = LohaFactors(
        _z(6, 2), _z(2, 5), _z(6, 2), _z(2, 5), None, magnitude=_z(6, 1), magnitude_per_input=True
    )
    assert "5 columns" in magnitude_problem(loha, (6, 5))


def test_dora_strength_is_inside_the_norm_as_peft_has_it():
    """fuseline's DoRA convention at a strength s other than 1: m / ||W + s*D|| * (W + s*D) (PEFT's, for
    PEFT- and kohya-format DoRA alike). LyCORIS computes (W + D) * (s * (m / ||W + D|| - 1) + 1) and
    ComfyUI interpolates, W + s * (W1 - W) with W1 its weight at strength 1; fuseline and LyCORIS agree at
    s = 1 (docs/templates.md)."""
    g = _gen(11)
    w = torch.randn(4, 6, generator=g)
    down, up = torch.randn(2, 6, generator=g), torch.randn(4, 2, generator=g)
    magnitude = 1.0 + torch.rand(4, generator=g)
    factors = LoraFactors(down, up, alpha=2.0, magnitude=magnitude)
    d = up @ down  # alpha / r = 1

    def dora(delta: torch.Tensor) -> torch.Tensor:
        merged = w + delta
        return magnitude[:, None] / merged.norm(dim=1, keepdim=True) * merged

    s = 0.6
    ours = fuse_weight(w, [WeightUpdate(factors, s)])
    torch.testing.assert_close(ours, dora(s * d))
    lycoris = (w + d) * (s * (magnitude[:, None] / (w + d).norm(dim=1, keepdim=True) - 1) + 1)
    comfyui = w + s * (dora(d) - w)
    assert not torch.allclose(ours, lycoris, atol=1e-3) and not torch.allclose(ours, comfyui, atol=1e-3)
    at_one = fuse_weight(w, [WeightUpdate(factors, 1.0)])
    lycoris_one = (w + d) * (magnitude[:, None] / (w + d).norm(dim=1, keepdim=True))
    torch.testing.assert_close(at_one, lycoris_one)
    torch.testing.assert_close(at_one, dora(d))
