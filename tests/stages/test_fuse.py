"""The fusing math on tiny tensors, no files: checked against the formulas and against PEFT's own merge."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from stages.fuse import LoraFactors, WeightUpdate, factor_shape_problem, fuse_weight, lora_delta, scaling


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_linear_update_is_w_plus_scale_alpha_over_rank_up_down():
    g = _gen(0)
    w, down, up = (
        torch.randn(6, 5, generator=g),
        torch.randn(3, 5, generator=g),
        torch.randn(6, 3, generator=g),
    )
    fused = fuse_weight(w, [WeightUpdate(LoraFactors(down, up, alpha=1.5), scale=0.8)])
    expected = w.double() + 0.8 * (1.5 / 3) * (up.double() @ down.double())
    torch.testing.assert_close(fused.double(), expected, rtol=1e-6, atol=1e-6)
    assert fused.dtype == torch.float32


def test_fp16_inputs_are_upcast_and_base_is_not_modified():
    g = _gen(1)
    w = torch.randn(4, 4, generator=g).half()
    before = w.clone()
    down, up = torch.randn(2, 4, generator=g).half(), torch.randn(4, 2, generator=g).half()
    fused = fuse_weight(w, [WeightUpdate(LoraFactors(down, up, alpha=2.0), scale=1.0)])
    assert fused.dtype == torch.float32
    assert torch.equal(w, before)
    torch.testing.assert_close(fused, w.float() + up.float() @ down.float())


def test_updates_accumulate_in_fp32_in_order():
    g = _gen(2)
    w = torch.randn(8, 8, generator=g)
    a = LoraFactors(torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g), alpha=1.0)
    b = LoraFactors(torch.randn(4, 8, generator=g), torch.randn(8, 4, generator=g), alpha=8.0)
    fused = fuse_weight(w, [WeightUpdate(a, 0.7), WeightUpdate(b, -0.5)])
    expected = w + lora_delta(a, 0.7, w.shape) + lora_delta(b, -0.5, w.shape)
    torch.testing.assert_close(fused, expected)
    assert not torch.allclose(fused, w + lora_delta(a, 0.7, w.shape))


def test_conv_locon_delta_matches_a_convolution():
    """LoCon: down (r, in, kh, kw), up (out, r, 1, 1). The delta is the composed kernel of both convs, which
    is also what PEFT computes with conv2d; check it by running the convolutions."""
    g = _gen(3)
    down, up = torch.randn(3, 4, 3, 3, generator=g), torch.randn(5, 3, 1, 1, generator=g)
    delta = lora_delta(LoraFactors(down, up, alpha=3.0), 1.0, (5, 4, 3, 3))
    x = torch.randn(2, 4, 7, 7, generator=g)
    composed = nn.functional.conv2d(nn.functional.conv2d(x, down, padding=1), up)
    torch.testing.assert_close(nn.functional.conv2d(x, delta, padding=1), composed, rtol=1e-4, atol=1e-4)


def test_rslora_divides_by_sqrt_rank():
    factors = LoraFactors(torch.zeros(4, 2), torch.zeros(2, 4), alpha=8.0, rslora=True)
    assert scaling(factors, 0.5) == pytest.approx(0.5 * 8.0 / math.sqrt(4))
    assert scaling(LoraFactors(torch.zeros(4, 2), torch.zeros(2, 4), alpha=8.0), 0.5) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("down", "up", "weight", "fragment"),
    [
        ((4, 8), (6, 4), (6, 8), None),
        ((4, 8, 3, 3), (6, 4, 1, 1), (6, 8, 3, 3), None),
        ((4, 8, 1, 1), (6, 4, 1, 1), (6, 8), None),  # kohya stores some linear LoRAs as 1x1 convs
        ((4, 8), (7, 4), (6, 8), "up factor [7, 4]"),
        ((4, 9), (6, 4), (6, 8), "down factor [4, 9]"),
        ((4, 8), (6, 3), (6, 8), "up factor [6, 3]"),
        ((4, 8, 1, 1), (6, 4, 1, 1), (6, 8, 3, 3), "down factor [4, 8, 1, 1]"),
        ((4, 8, 3, 3), (6, 4, 3, 3), (6, 8, 3, 3), "spatial kernel"),
        ((4, 8), (6, 4), (6,), "matrix or conv"),
    ],
)
def test_factor_shape_problems(down, up, weight, fragment):
    problem = factor_shape_problem(LoraFactors(torch.zeros(down), torch.zeros(up), alpha=1.0), weight)
    if fragment is None:
        assert problem is None
    else:
        assert problem is not None and fragment in problem


def test_dora_magnitude_size_is_checked():
    factors = LoraFactors(torch.zeros(2, 4), torch.zeros(3, 2), alpha=1.0, magnitude=torch.ones(4))
    assert "magnitude" in factor_shape_problem(factors, (3, 4))


def _peft_merged(base: nn.Module, adapters: list[tuple[LoraFactors, float]], dora: bool) -> torch.Tensor:
    """PEFT's own merge of the same factors into a copy of `base` (the oracle diffusers' fuse_lora uses)."""
    from peft import LoraConfig, inject_adapter_in_model

    model = nn.Sequential(base)
    names = []
    for i, (factors, _) in enumerate(adapters):
        name = f"a{i}"
        config = LoraConfig(r=factors.rank, lora_alpha=factors.alpha, target_modules=["0"], use_dora=dora)
        inject_adapter_in_model(config, model, adapter_name=name)
        layer = model[0]
        layer.lora_A[name].weight.data = factors.down.float().reshape(layer.lora_A[name].weight.shape)
        layer.lora_B[name].weight.data = factors.up.float().reshape(layer.lora_B[name].weight.shape)
        if dora:
            magnitude = layer.lora_magnitude_vector[name].weight
            magnitude.data = factors.magnitude.float().reshape(magnitude.shape)
        names.append(name)
    layer = model[0]
    layer.set_adapter(names)
    for name, (_, scale) in zip(names, adapters, strict=True):
        layer.set_scale(name, scale)
    layer.merge(adapter_names=names)
    return layer.get_base_layer().weight.detach()


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_dora_matches_peft_merge_with_two_adapters(kind):
    """DoRA: m * (W + dW) / ||W + dW|| per output channel, with the norm of the unmerged weight plus the
    adapter's own delta, chained after a plain adapter exactly as PEFT merges them."""
    torch.manual_seed(4)
    base = nn.Linear(6, 5, bias=False) if kind == "linear" else nn.Conv2d(4, 5, 3, bias=False)
    in_shape = (6,) if kind == "linear" else (4, 3, 3)
    up_shape = (5, 2) if kind == "linear" else (5, 2, 1, 1)
    g = _gen(5)
    adapters = []
    for alpha, scale in ((2.0, 0.7), (4.0, -0.4)):
        down, up = torch.randn(2, *in_shape, generator=g), torch.randn(*up_shape, generator=g)
        magnitude = base.weight.detach().flatten(1).norm(dim=1) * (1 + 0.3 * torch.randn(5, generator=g))
        adapters.append((LoraFactors(down, up, alpha=alpha, magnitude=magnitude), scale))
    original = base.weight.detach().clone()
    ours = fuse_weight(original, [WeightUpdate(f, s) for f, s in adapters])
    oracle = _peft_merged(base, adapters, dora=True)
    torch.testing.assert_close(ours, oracle, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours, original, atol=1e-3)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_plain_lora_matches_peft_merge_bit_for_bit():
    torch.manual_seed(6)
    base = nn.Linear(16, 12, bias=False)
    g = _gen(7)
    adapters = [
        (LoraFactors(torch.randn(4, 16, generator=g), torch.randn(12, 4, generator=g), alpha=8.0), 0.7),
        (LoraFactors(torch.randn(2, 16, generator=g), torch.randn(12, 2, generator=g), alpha=1.0), -0.5),
    ]
    ours = fuse_weight(base.weight.detach().clone(), [WeightUpdate(f, s) for f, s in adapters])
    assert torch.equal(ours, _peft_merged(base, adapters, dora=False))


# --------------------------------------------------------------------------------------------------------
# stages.merge.WeightFuser: the merge's in-place accumulation, against fuse_weight (the reference above)


def _fp16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance of two fp16 tensors in units in the last place (bit patterns ordered as integers)."""

    def ordered(x: torch.Tensor) -> torch.Tensor:
        bits = x.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -32768 - bits, bits)

    return (ordered(a) - ordered(b)).abs()


@pytest.mark.parametrize(
    ("weight", "down", "up"),
    [
        ((96, 80), (8, 80), (96, 8)),
        ((64, 32, 3, 3), (8, 32, 3, 3), (64, 8, 1, 1)),  # LoCon conv
        ((64, 48), (8, 48, 1, 1), (64, 8, 1, 1)),  # kohya linear stored as 1x1 conv
    ],
)
def test_weight_fuser_matches_fuse_weight_within_one_fp16_ulp(weight, down, up):
    from stages.merge import WeightFuser

    g = _gen(8)
    base = (torch.randn(weight, generator=g) * 0.05).half()
    updates = [
        WeightUpdate(
            LoraFactors(
                (torch.randn(down, generator=g) * 0.1).half(),
                (torch.randn(up, generator=g) * 0.1).half(),
                4.0,
            ),
            scale,
        )
        for scale in (0.8, -0.5)
    ]
    before = base.clone()
    ours = WeightFuser()(base, updates)
    reference = fuse_weight(base, updates)
    assert ours.dtype == torch.float32 and ours.shape == base.shape
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    assert torch.equal(base, before)
    ulps = _fp16_ulps(ours.half(), reference.half())
    assert int(ulps.max()) <= 1
    assert not torch.equal(ours, base.float())
    # Straight into an fp16 destination (the export's): the same values as casting the fp32 result.
    destination = torch.empty(base.shape, dtype=torch.float16)
    written = WeightFuser()(base, updates, lambda: destination)
    assert written is destination or written.data_ptr() == destination.data_ptr()
    assert torch.equal(destination, ours.half())


def test_stacked_lora_is_the_sum_of_the_scaled_products():
    """Two LoRAs of different ranks (one conv, flattened) as one product: sum_i s_i * up_i @ down_i."""
    from stages.fuse import stacked_lora

    g = _gen(11)
    first = LoraFactors(torch.randn(4, 8, 3, 3, generator=g), torch.randn(6, 4, 1, 1, generator=g), 2.0)
    second = LoraFactors(torch.randn(2, 72, generator=g).half(), torch.randn(6, 2, generator=g).half(), 1.0)
    updates = [WeightUpdate(first, 0.8), WeightUpdate(second, -0.3)]
    up, down = stacked_lora(updates)
    assert up.shape == (6, 6) and down.shape == (6, 72) and up.dtype == down.dtype == torch.float32
    expected = sum(lora_delta(u.factors, u.scale, (6, 8, 3, 3)) for u in updates).reshape(6, 72)
    torch.testing.assert_close(up @ down, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError):
        stacked_lora([WeightUpdate(LoraFactors(first.down, first.up, 2.0, magnitude=torch.ones(6)), 1.0)])


@pytest.mark.parametrize("threads", [2, 3])
def test_weight_fuser_split_over_threads_gives_the_same_bytes(threads):
    """A weight large enough to be split over threads fuses to exactly what one thread computes (each row
    is computed by one thread with the same ops), and the threads are gone after close."""
    import threading

    from stages.merge import WeightFuser

    g = _gen(12)
    rows, cols = 257, (WeightFuser.SPLIT_MIN_ELEMENTS // 257) + 3
    base = (torch.randn(rows, cols, generator=g) * 0.05).half()
    updates = [
        WeightUpdate(
            LoraFactors(torch.randn(4, cols, generator=g), torch.randn(rows, 4, generator=g), 2.0), s
        )
        for s in (0.8, 0.5)
    ]
    single = torch.empty(rows, cols, dtype=torch.float16)
    WeightFuser()(base, updates, lambda: single)
    split = torch.empty(rows, cols, dtype=torch.float16)
    with WeightFuser(threads) as fuser:
        fuser(base, updates, lambda: split)
    assert torch.equal(single, split)
    assert not [t for t in threading.enumerate() if t.name.startswith("fuseline-fuse")]


def test_weight_fuser_reuses_its_buffer_and_results_do_not_leak_between_weights():
    """The second weight is fused in the first one's buffer: a smaller one after a larger one must not see
    the larger one's values, and a larger one grows the buffer."""
    from stages.merge import WeightFuser

    g = _gen(9)
    fuser = WeightFuser()
    shapes = [(32, 16), (8, 4), (40, 20)]
    for shape in shapes:
        base = torch.randn(shape, generator=g).half()
        factors = LoraFactors(
            torch.randn(2, shape[1], generator=g), torch.randn(shape[0], 2, generator=g), 2.0
        )
        update = [WeightUpdate(factors, 0.5)]
        ours = fuser(base, update).clone()
        torch.testing.assert_close(ours, fuse_weight(base, update), rtol=1e-5, atol=1e-5)


def test_weight_fuser_sends_dora_to_fuse_weight():
    from stages.merge import WeightFuser

    g = _gen(10)
    base = torch.randn(5, 6, generator=g)
    plain = LoraFactors(torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g), 2.0)
    dora = LoraFactors(
        torch.randn(2, 6, generator=g),
        torch.randn(5, 2, generator=g),
        2.0,
        magnitude=torch.rand(5, generator=g) + 1,
    )
    updates = [WeightUpdate(plain, 0.7), WeightUpdate(dora, 0.4)]
    assert torch.equal(WeightFuser()(base, updates), fuse_weight(base, updates))
