"""Tests of MaskedConv2d, the RBF interpolation and the sparse engine (REFERENCE.md §3-4).

The sparse execution must equal the dense one (the oracle) within
``1e-4 * max(1, max|dense|)`` in fp32 on every kernel size, stride, dilation, groups, padding,
bias, batch and mask; the dense execution must equal a straightforward implementation of the
formula written here, independently of the library.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anytimeify.masking import _ext
from anytimeify.masking.conv import MaskedConv2d, conv_output_size
from anytimeify.masking.engine import CostModel, IndexCache, MaskPlan, choose_strategy
from anytimeify.masking.engine import choose_strategy as choose_strategy_
from anytimeify.masking.interp import interpolate, rbf_kernel, support_radius

SETTINGS = dict(derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------- helpers
def tolerance(reference: torch.Tensor) -> float:
    """The contract: 1e-4 * max(1, max|dense output|)."""
    return 1e-4 * max(1.0, float(reference.abs().max())) if reference.numel() else 1e-4


@contextmanager
def extension(enabled: bool) -> Iterator[None]:
    """Run with the compiled kernels enabled or forced off (ANYTIMEIFY_NO_EXT)."""
    previous = os.environ.get("ANYTIMEIFY_NO_EXT")
    os.environ["ANYTIMEIFY_NO_EXT"] = "0" if enabled else "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["ANYTIMEIFY_NO_EXT"]
        else:
            os.environ["ANYTIMEIFY_NO_EXT"] = previous


def reference_masked_conv(conv: nn.Conv2d, x: torch.Tensor, mask: torch.Tensor, lam: float) -> torch.Tensor:
    """y*m + I(y*m)*(1-m) written out from REFERENCE.md §3, in float64, independent of the library.

    I is a 7x7 filter: weight exp(-lam^2 d^2) at squared distance d^2 (the centre's d^2 is 1e5),
    normalised by the sum of the whole 7x7 kernel plus 1e-5 (the reference implementation's
    ``kernel / (kernel.sum() + 10**(-5))``), zero padding, the same for every channel; applied by
    shifting (the centre always meets a skipped, zero position).
    """
    y = F.conv2d(x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double(),
                 conv.stride, conv.padding, conv.dilation, conv.groups)
    m = mask.double()
    ym = y * m
    weights = {}
    for dy in range(-3, 4):
        for dx in range(-3, 4):
            weights[(dy, dx)] = math.exp(-(lam ** 2) * (1e5 if dy == dx == 0 else dy * dy + dx * dx))
    total = sum(weights.values()) + 1e-5
    weights[(0, 0)] = 0.0
    height, width = ym.shape[-2:]
    padded = F.pad(ym, (3, 3, 3, 3))
    interp = torch.zeros_like(ym)
    for (dy, dx), w in weights.items():
        if w:
            interp += (w / total) * padded[..., 3 + dy:3 + dy + height, 3 + dx:3 + dx + width]
    return ym + interp * (1 - m)


@st.composite
def conv_cases(draw, max_size: int = 12, rows: bool = False):
    """A conv, an input and a mask (per-sample density, all-kept / all-skipped samples included).

    With ``rows`` only convs the row-vectorised implicit GEMM runs (ungrouped, dilation 1,
    horizontal stride 1, up to 40 output channels, any count but multiples of 16 above 16)."""
    k = draw(st.sampled_from([1, 3, 5, 7]))
    stride = draw(st.sampled_from([1, 2]))
    dilation = 1 if rows else draw(st.sampled_from([1, 2]))
    group_kind = "1" if rows else draw(st.sampled_from(["1", "2", "depthwise"]))
    if group_kind == "depthwise":
        in_channels = draw(st.integers(1, 6))
        groups = in_channels
        out_channels = in_channels * draw(st.integers(1, 2))
    elif rows:
        groups = 1
        in_channels = draw(st.integers(1, 20))
        out_channels = draw(st.integers(1, 40).filter(lambda c: c <= 16 or c % 16))
        stride = (stride, 1)
    else:
        groups = int(group_kind)
        in_channels = groups * draw(st.integers(1, 4))
        out_channels = groups * draw(st.integers(1, 4))
    # padding up to the kernel's half extent: torch 2.14.1's oneDNN conv (brgemm perform_outwork)
    # intermittently segfaults on larger paddings, in the plain nn.Conv2d as well
    half = (k // 2) * dilation
    pad_kind = draw(st.sampled_from(["same", "zero", "int", "tuple"]))
    if pad_kind == "same":
        padding = half
    elif pad_kind == "zero":
        padding = 0
    elif pad_kind == "int":
        padding = draw(st.integers(0, half))
    else:
        padding = (draw(st.integers(0, half)), draw(st.integers(0, half)))
    bias = draw(st.booleans())
    batch = draw(st.integers(1, 3))
    span = dilation * (k - 1) + 1
    pads = padding if isinstance(padding, tuple) else (padding, padding)
    height = draw(st.integers(max(1, span - 2 * pads[0]), max(1, span - 2 * pads[0]) + max_size))
    width = draw(st.integers(max(1, span - 2 * pads[1]), max(1, span - 2 * pads[1]) + max_size))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    generator = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(in_channels, out_channels, k, stride, padding, dilation, groups, bias)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) / math.sqrt(in_channels // groups * k * k))
        if bias:
            conv.bias.copy_(torch.randn(out_channels, generator=generator))
    x = torch.randn(batch, in_channels, height, width, generator=generator)
    if draw(st.booleans()):
        x = x.contiguous(memory_format=torch.channels_last)
    out_h, out_w = conv_output_size(conv, height, width)
    kinds = draw(st.lists(st.sampled_from(["random", "random", "random", "kept", "skipped"]),
                          min_size=batch, max_size=batch))
    rows = []
    for kind in kinds:
        if kind == "kept":
            rows.append(torch.ones(1, 1, out_h, out_w, dtype=torch.bool))
        elif kind == "skipped":
            rows.append(torch.zeros(1, 1, out_h, out_w, dtype=torch.bool))
        else:
            density = draw(st.sampled_from([0.05, 0.2, 0.5, 0.8, 0.95]))
            rows.append(torch.rand(1, 1, out_h, out_w, generator=generator) < density)
    mask = torch.cat(rows)
    if draw(st.booleans()):
        mask = mask.float()
    return conv, x, mask


# ----------------------------------------------------------------------- sparse == dense (sweep)
@settings(max_examples=520, **SETTINGS)
@given(case=conv_cases(), lam=st.sampled_from([3.0, 3.0, 0.5, 1.0, 2.0, 5.0]),
       strategy=st.sampled_from(["auto", "dense", "gather", "implicit", "implicit_rows"]), use_ext=st.booleans(),
       shift=st.booleans(), activation=st.sampled_from([None, "relu"]),
       residual=st.sampled_from([None, "nchw", "channels_last"]), reader_radius=st.sampled_from([None, None, 0, 1]),
       engine_dense=st.booleans())
def test_sparse_equals_dense(case, lam, strategy, use_ext, shift, activation, residual, reader_radius,
                             engine_dense):
    conv, x, mask = case
    masked = MaskedConv2d.from_conv(conv)
    masked.engine_dense = engine_dense  # all kept: the engine's dense kernels (set by freeze())
    # a conv whose only reader looks within reader_radius of the kept positions (set by freeze())
    # may leave the other rows unwritten: only the rows that reader reads must agree
    masked.reader_radius = reader_radius
    # the inference epilogue (a folded BN's shift, a fused ReLU) must agree too
    masked.set_epilogue(shift=torch.randn(conv.out_channels) if shift else None, activation=activation)
    res = None
    if residual is not None:  # a residual connection folded into the conv
        out_h, out_w = conv_output_size(conv, x.shape[2], x.shape[3])
        res = torch.randn(x.shape[0], conv.out_channels, out_h, out_w)
        if residual == "channels_last":
            res = res.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        masked.interp_lambda.fill_(lam)
        dense = masked(x, mask, residual=res)
        masked.execution = "sparse"
        masked.strategy = strategy
        with extension(use_ext):
            sparse = masked(x, mask, residual=res)
    assert sparse.shape == dense.shape
    if reader_radius is not None and dense.numel():
        read = F.max_pool2d(mask.float(), 2 * reader_radius + 1, 1, reader_radius) > 0  # (B, 1, H, W)
        read = read.expand_as(dense)
        sparse, dense = sparse[read], dense[read]
    assert (sparse - dense).abs().max() <= tolerance(dense) if dense.numel() else True


@pytest.mark.skipif(not _ext.available() and os.environ.get("CI") != "true",
                    reason="C++ extension not built (no compiler?)")
@settings(max_examples=150, **SETTINGS)
@given(case=conv_cases(max_size=40, rows=True), lam=st.sampled_from([3.0, 0.5, 1.0, 2.0]), shift=st.booleans(),
       activation=st.sampled_from([None, "relu"]), residual=st.sampled_from([None, "nchw", "channels_last"]),
       reader_radius=st.sampled_from([None, None, 0, 1]))
def test_sparse_rows_equals_dense(case, lam, shift, activation, residual, reader_radius):
    """The row-vectorised implicit GEMM, with every epilogue, equals the dense oracle (wider maps:
    runs of kept positions longer than a block of 32)."""
    assert _ext.available(), "the masked-conv C++ extension did not build (see the log for the compiler error)"
    test_sparse_equals_dense.hypothesis.inner_test(case, lam, "implicit_rows", True, shift, activation, residual,
                                                   reader_radius, True)


# -------------------------------------------------------------- dense == the formula, written out
@settings(max_examples=150, **SETTINGS)
@given(case=conv_cases(max_size=9), lam=st.sampled_from([3.0, 0.5, 1.0, 1.7, 5.0]))
def test_dense_matches_formula(case, lam):
    conv, x, mask = case
    masked = MaskedConv2d.from_conv(conv)
    with torch.no_grad():
        masked.interp_lambda.fill_(lam)
        out = masked(x, mask)
        expected = reference_masked_conv(conv, x, mask, lam)
    assert torch.allclose(out.double(), expected, atol=1e-5 * max(1.0, float(expected.abs().max())), rtol=0)


# ------------------------------------------------------------------------- reduced support radius
@pytest.mark.parametrize("lam", [0.5, 1.0, 2.0, 3.0, 5.0])
@settings(max_examples=20, **SETTINGS)
@given(seed=st.integers(0, 2 ** 31 - 1), density=st.sampled_from([0.1, 0.3, 0.6, 0.9]),
       size=st.integers(3, 20), use_ext=st.booleans())
def test_reduced_support_matches_full_kernel(lam, seed, density, size, use_ext):
    generator = torch.Generator().manual_seed(seed)
    mask = (torch.rand(2, 1, size, size + 3, generator=generator) < density).float()
    y = torch.randn(2, 5, size, size + 3, generator=generator) * 10
    full = interpolate(y * mask, torch.tensor(lam))
    radius = support_radius(lam)
    cropped = interpolate(y * mask, torch.tensor(lam), support=radius)
    assert (cropped - full).abs().max() <= 1e-6 * max(1.0, float(full.abs().max()))
    conv = nn.Conv2d(5, 4, 3, padding=1)
    masked = MaskedConv2d.from_conv(conv)
    x = torch.randn(2, 5, size, size + 3, generator=generator)
    with torch.no_grad():
        masked.interp_lambda.fill_(lam)
        dense = masked(x, mask)
        masked.execution = "sparse"
        with extension(use_ext):
            sparse = masked(x, mask)
    assert (sparse - dense).abs().max() <= tolerance(dense)


def test_support_radius_values():
    # SPARSE-NOTES fact 6: lambda = 3 needs only the 8 nearest neighbours; lambda near 1 the full 7x7
    assert support_radius(3.0) == 1
    assert support_radius(5.0) == 1
    assert support_radius(2.0) == 2
    assert support_radius(1.0) == 3
    assert support_radius(0.5) == 3
    for lam in (0.5, 1.0, 2.0, 3.0, 5.0):
        r = support_radius(lam)
        kernel = rbf_kernel(torch.tensor(lam, dtype=torch.float64))
        outside = kernel.sum() - kernel[3 - r:4 + r, 3 - r:4 + r].sum()
        assert float(outside) < 1e-9
        if r > 1:  # and one ring less would drop more
            assert float(kernel.sum() - kernel[4 - r:3 + r, 4 - r:3 + r].sum()) >= 1e-9


# ------------------------------------------------------------------------------ the interpolation
@pytest.mark.parametrize("lam", [3.0, 1.3, 0.3, 0.001])
def test_rbf_kernel_definition(lam):
    """The reference implementation's kernel (conv_mask.py): exp(-lambda^2 * square_dis) with the
    centre's square_dis 1e5, divided by its sum plus 1e-5."""
    kernel = rbf_kernel(torch.tensor(lam, dtype=torch.float64))
    assert kernel.shape == (7, 7)
    raw = torch.tensor([[math.exp(-(lam ** 2) * (1e5 if i == j == 0 else i * i + j * j)) for j in range(-3, 4)]
                        for i in range(-3, 4)], dtype=torch.float64)
    assert torch.allclose(kernel, raw / (raw.sum() + 1e-5), rtol=1e-12, atol=0)
    # the epsilon: at lambda = 3 the raw kernel sums to about 5e-4, so the weights sum to about 0.98
    if lam == 3.0:
        assert 4.9e-4 < float(raw.sum()) < 5.0e-4
        assert abs(float(kernel.sum()) - float(raw.sum() / (raw.sum() + 1e-5))) < 1e-12
        assert 0.97 < float(kernel.sum()) < 0.99
    assert float(kernel[3, 3]) == (0.0 if lam > 0.01 else float(raw[3, 3] / (raw.sum() + 1e-5)))


def test_lambda_3_is_nearly_the_mean_of_4_nearest_neighbours():
    # REFERENCE.md §3: at lambda = 3 the filter is "effectively" the mean of the 4 nearest
    # neighbours, skipped ones counted as 0, shrunk by the epsilon of the normalisation. Exactly,
    # each of them weighs e^-9 / (4 e^-9 (1 + e^-9 + ...) + 1e-5), i.e. 0.25 * S / (S + 1e-5) with
    # S = 4 e^-9 (1 + ...) (about 0.98 * 0.25), and each diagonal neighbour e^-9 times that: a
    # skipped position whose diagonal neighbours are all skipped (a checkerboard mask) gets that
    # multiple of the 4-neighbour mean to within 1.3e-4 relative.
    generator = torch.Generator().manual_seed(0)
    height, width = 9, 12
    y = torch.randn(1, 3, height, width, generator=generator, dtype=torch.float64)
    rows = torch.arange(height)[:, None]
    cols = torch.arange(width)[None, :]
    mask = (((rows + cols) % 2) == 0).to(torch.float64)[None, None]
    interp = interpolate(y * mask, torch.tensor(3.0, dtype=torch.float64))
    padded = F.pad(y * mask, (1, 1, 1, 1))
    four_sum = (padded[..., :-2, 1:-1] + padded[..., 2:, 1:-1] + padded[..., 1:-1, :-2] + padded[..., 1:-1, 2:])
    skipped = mask.expand_as(y) == 0
    nearest = float(rbf_kernel(torch.tensor(3.0, dtype=torch.float64))[3, 4])
    ring = 4 * math.exp(-9)  # the 4 nearest neighbours' raw weights; the rest add 1.2e-4 of it
    shrink = ring / (ring + 1e-5)  # about 0.98
    assert abs(nearest - 0.25 * shrink) < 0.25 * 1.3e-4
    assert torch.allclose(interp[skipped], (nearest * four_sum)[skipped], atol=1e-6, rtol=0)
    assert torch.allclose(interp[skipped], (shrink * four_sum / 4)[skipped], atol=0, rtol=1.3e-4)
    # and through the module, in fp32, against the 4-neighbour mean
    conv = nn.Conv2d(3, 3, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
    masked = MaskedConv2d.from_conv(conv)
    with torch.no_grad():
        out = masked(y.float(), mask.float())
        masked.execution = "sparse"
        out_sparse = masked(y.float(), mask.float())
    assert torch.allclose(out.double()[skipped], (shrink * four_sum / 4)[skipped], atol=1e-5, rtol=1.3e-4)
    assert torch.allclose(out_sparse.double()[skipped], (shrink * four_sum / 4)[skipped], atol=1e-5, rtol=1.3e-4)


def test_interpolate_gradient_reaches_lambda():
    lam = torch.tensor(2.0, requires_grad=True)
    y = torch.randn(1, 2, 6, 6)
    mask = (torch.rand(1, 1, 6, 6) < 0.5).float()
    interpolate(y * mask, lam).sum().backward()
    assert lam.grad is not None and torch.isfinite(lam.grad)


# ----------------------------------------------------------------------------------- the module
def test_from_conv_shares_parameters_and_names():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=True)
    masked = MaskedConv2d.from_conv(conv)
    assert masked.weight is conv.weight and masked.bias is conv.bias
    assert list(masked.state_dict().keys()) == ["weight", "bias", "interp_lambda"]
    assert masked.interp_lambda.item() == 3.0 and masked.interp_lambda.requires_grad
    assert (masked.stride, masked.padding, masked.kernel_size) == (conv.stride, conv.padding, conv.kernel_size)
    no_bias = MaskedConv2d.from_conv(nn.Conv2d(4, 6, 1, bias=False), execution="sparse")
    assert no_bias.bias is None and no_bias.execution == "sparse"
    assert list(no_bias.state_dict().keys()) == ["weight", "interp_lambda"]


def test_unsupported_configurations_raise():
    with pytest.raises(ValueError, match="padding_mode"):
        MaskedConv2d.from_conv(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="execution"):
        MaskedConv2d.from_conv(nn.Conv2d(2, 2, 3), execution="fast")
    with pytest.raises(TypeError, match="Conv2d"):
        MaskedConv2d.from_conv(nn.Linear(2, 2))


def test_all_kept_is_the_plain_conv():
    conv = nn.Conv2d(5, 7, 3, stride=2, padding=1)
    masked = MaskedConv2d.from_conv(conv)
    x = torch.randn(2, 5, 11, 9)
    mask = torch.ones(2, 1, *conv_output_size(conv, 11, 9), dtype=torch.bool)
    with torch.no_grad():
        plain = conv(x)
        assert torch.equal(masked(x, mask), plain)
        assert torch.equal(masked(x, None), plain)
        masked.execution = "sparse"
        # the sparse path runs the plain conv, but oneDNN may pick another kernel (and summation
        # order) for its memory format on this CPU: equal up to float rounding, not bit for bit
        assert (masked(x, mask) - plain).abs().max() <= 1e-5 * max(1.0, plain.abs().max().item())


def test_all_skipped_is_zero():
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=True)
    masked = MaskedConv2d.from_conv(conv, execution="sparse")
    x = torch.randn(2, 3, 7, 8)
    mask = torch.zeros(2, 1, 7, 8)
    with torch.no_grad():
        out = masked(x, mask)
        masked.execution = "dense"
        assert torch.equal(masked(x, mask), torch.zeros(2, 4, 7, 8))
    assert torch.equal(out, torch.zeros(2, 4, 7, 8))


def test_dense_gradients_reach_weight_bias_lambda_and_input():
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=True)
    masked = MaskedConv2d.from_conv(conv)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    mask = (torch.rand(2, 1, 8, 8) < 0.5).float().requires_grad_(True)
    masked(x, mask).square().sum().backward()
    for name, param in masked.named_parameters():
        assert param.grad is not None and float(param.grad.abs().sum()) > 0, name
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert mask.grad is None  # masks carry no gradient


def test_sparse_refuses_gradients():
    masked = MaskedConv2d.from_conv(nn.Conv2d(2, 2, 3, padding=1), execution="sparse")
    x = torch.randn(1, 2, 5, 5)
    mask = torch.ones(1, 1, 5, 5)
    with pytest.raises(RuntimeError, match="inference only"):
        masked(x, mask)
    with torch.inference_mode():
        masked(x, mask)
        inference_mask = torch.rand(1, 1, 5, 5) < 0.5  # inference tensors have no version counter
        plan = IndexCache().plan(inference_mask)
        masked(x, inference_mask, plan=plan)


def test_wrong_mask_shape_names_both_shapes():
    masked = MaskedConv2d.from_conv(nn.Conv2d(2, 3, 3, stride=2, padding=1))
    x = torch.randn(2, 2, 9, 10)
    bad = torch.ones(2, 1, 9, 10)
    with pytest.raises(ValueError) as info:
        masked(x, bad)
    message = str(info.value)
    assert "(2, 1, 9, 10)" in message and "(2, 1, 5, 5)" in message
    with pytest.raises(ValueError, match=r"\(1, 1, 5, 5\)"):
        masked(x, torch.ones(1, 1, 5, 5))


# ---------------------------------------------------------------------------------- plans, reuse
def test_plan_is_reused_across_layers_and_checked():
    torch.manual_seed(0)
    first = MaskedConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1, bias=False), execution="sparse")
    second = MaskedConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1), execution="sparse")
    first.strategy = second.strategy = "gather"
    x = torch.randn(2, 4, 10, 10)
    mask = torch.rand(2, 1, 10, 10) < 0.4
    cache = IndexCache()
    with torch.no_grad():
        plan = cache.plan(mask)
        assert cache.plan(mask) is plan and len(cache) == 1
        y = second(first(x, mask, plan=plan), mask, plan=plan)
        # index lists built once (one geometry, one halo radius) and used by both layers
        assert sum(1 for key in plan._gather if key[0] != "chunks") == 1 and len(plan._halo) == 1
        first.execution = second.execution = "dense"
        expected = second(first(x, mask), mask)
        assert (y - expected).abs().max() <= tolerance(expected)
        other = mask.clone()
        first.execution = "sparse"
        with pytest.raises(ValueError, match="plan was built for another mask"):
            first(x, other, plan=plan)
        mask[0, 0, 0, 0] = ~mask[0, 0, 0, 0]  # in-place edit invalidates the plan
        with pytest.raises(ValueError, match="modified in place"):
            first(x, mask, plan=plan)
        assert cache.plan(mask) is not plan


def test_plans_of_interleaved_calls_do_not_interfere():
    conv = MaskedConv2d.from_conv(nn.Conv2d(3, 5, 3, padding=1), execution="sparse")
    x_a, x_b = torch.randn(1, 3, 9, 9), torch.randn(2, 3, 9, 9)
    mask_a, mask_b = torch.rand(1, 1, 9, 9) < 0.3, torch.rand(2, 1, 9, 9) < 0.7
    with torch.no_grad():
        plan_a, plan_b = MaskPlan(mask_a), MaskPlan(mask_b)
        out_a1 = conv(x_a, mask_a, plan=plan_a).clone()
        out_b = conv(x_b, mask_b, plan=plan_b)
        out_a2 = conv(x_a, mask_a, plan=plan_a)
        conv.execution = "dense"
        assert torch.equal(out_a1, out_a2)
        assert (out_b - conv(x_b, mask_b)).abs().max() <= tolerance(out_b)


def test_cost_model_choices():
    """The analytical cost model (tuning off), for the AVX-512 kernels it was calibrated on."""
    from functools import partial

    from anytimeify.masking.conv import conv_geometry
    from anytimeify.masking.engine import DEFAULT_ISA

    avx512 = CostModel(isa=DEFAULT_ISA)
    choose_strategy = partial(choose_strategy_, cost_model=avx512)

    geometry = conv_geometry(nn.Conv2d(48, 48, 3, padding=1))
    assert choose_strategy(geometry, 1000, 1000) == "dense"
    assert choose_strategy(geometry, 1000, 0) == "gather"
    assert choose_strategy(geometry, 1000, 50) == "gather"
    assert choose_strategy(geometry, 1000, 990) == "dense"
    slow_gather = CostModel(gemm_gmacs=1e-3, isa=DEFAULT_ISA)
    assert choose_strategy(geometry, 1000, 50, cost_model=slow_gather) == "dense"
    # with the compiled implicit GEMM: it replaces the gathered conv, and wins up to higher densities
    assert choose_strategy(geometry, 1000, 0, implicit=True) == "implicit"
    assert choose_strategy(geometry, 1000, 600, implicit=True) == "implicit"
    assert choose_strategy(geometry, 1000, 600) == "dense"
    assert choose_strategy(geometry, 1000, 990, implicit=True) == "dense"
    assert choose_strategy(geometry, 1000, 600, cost_model=CostModel(implicit_gmacs=1e-3, isa=DEFAULT_ISA), implicit=True) == "dense"
    # the implicit GEMM is slower on wide layers (384 input channels): it stops paying earlier
    wide = conv_geometry(nn.Conv2d(384, 384, 3, padding=1))
    assert choose_strategy(geometry, 1000, 900, implicit=True) == "implicit"
    assert choose_strategy(geometry, 1000, 960, implicit=True) == "dense"
    assert choose_strategy(wide, 1000, 850, implicit=True) == "implicit"
    assert choose_strategy(wide, 1000, 900, implicit=True) == "dense"
    # 18 output channels fill 32 lanes of the channel-blocked implicit GEMM's register blocks and
    # 32 of oneDNN's; the row-vectorised kernel wastes none, so it wins up to high keep fractions
    # where the kept positions form runs along the rows (clustered masks)...
    thin = conv_geometry(nn.Conv2d(18, 18, 3, padding=1))
    assert avx512.dense_rate(thin) == pytest.approx(60.0 * 18 / 32)
    assert choose_strategy(thin, 1000, 800, implicit=True, runs=10) == "implicit_rows"
    assert choose_strategy(thin, 1000, 990, implicit=True, runs=10) == "implicit_rows"
    # ...but not where every kept position is a run of its own (its blocks would be mostly waste)
    assert choose_strategy(thin, 1000, 500, implicit=True, runs=500) == "implicit"
    # it is never chosen without the compiled kernels, nor for layers it cannot run or never wins
    assert choose_strategy(thin, 1000, 800, runs=10) in ("gather", "dense")
    assert choose_strategy(geometry, 1000, 800, implicit=True, runs=10) != "implicit_rows"
    # the cost model describes the CPU: elsewhere the dense kernel plus the blend runs
    assert choose_strategy(geometry, 1000, 50, device_type="cuda") == "dense"
    assert choose_strategy(geometry, 1000, 0, device_type="cuda") == "gather"
    # a dense output above the 32 MB mmap threshold is a fresh allocation, which costs too
    head = conv_geometry(nn.Conv2d(720, 720, 1))
    small, large = 1000, (64 << 20) // (4 * 720)
    assert avx512.dense_cost(head, large, 0) / large > avx512.dense_cost(head, small, 0) / small


# CI must exercise the compiled path: there an unavailable extension fails instead of skipping
@pytest.mark.skipif(not _ext.available() and os.environ.get("CI") != "true",
                    reason="C++ extension not built (no compiler?)")
def test_extension_kernels_match_pytorch():
    from anytimeify.masking.engine import halo_stencil

    assert _ext.available(), "the masked-conv C++ extension did not build (see the log for the compiler error)"
    generator = torch.Generator().manual_seed(1)
    mask = torch.rand(2, 1, 11, 13, generator=generator) < 0.3
    plan = MaskPlan(mask)
    out = torch.randn(plan.positions, 6, generator=generator)
    out.index_fill_(0, plan.skipped_index, 0)
    for radius in (1, 2, 3):
        halo, neighbours = plan.halo_index(radius)
        weights = torch.rand(neighbours.shape[1], generator=generator)
        a, b = out.clone(), out.clone()
        halo_stencil(a, halo, neighbours, weights, use_extension=False)
        halo_stencil(b, halo, neighbours, weights, use_extension=True)
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-6)
    for channels in (18, 37):  # whole vectors and a rest of fewer lanes, at every vector width
        wide = torch.randn(plan.positions, channels, generator=generator)
        wide.index_fill_(0, plan.skipped_index, 0)
        halo, neighbours = plan.halo_index(2)
        weights = torch.rand(neighbours.shape[1], generator=generator)
        a, b = wide.clone(), wide.clone()
        halo_stencil(a, halo, neighbours, weights, use_extension=False)
        halo_stencil(b, halo, neighbours, weights, use_extension=True)
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-6)
        assert torch.equal(a[plan.kept_index], b[plan.kept_index])
    ext = _ext.load()
    rows = ext.masked_output(plan.positions, 6, plan.kept_index, torch.empty(0), torch.empty(0), False, True)
    rows.index_copy_(0, plan.kept_index, out[plan.kept_index])
    assert torch.equal(rows, out)
    big = MaskPlan(torch.rand(1, 1, 300, 400, generator=generator) < 0.5)  # large enough for huge pages
    rows = ext.masked_output(big.positions, 16, big.kept_index, torch.empty(0), torch.empty(0), False, True)
    assert torch.equal(rows[big.skipped_index], torch.zeros(int(big.skipped_index.numel()), 16))
    fill = torch.randn(16, generator=generator)
    rows = ext.masked_output(big.positions, 16, big.kept_index, fill, torch.empty(0), False, True)
    assert torch.equal(rows[big.skipped_index], fill.expand(int(big.skipped_index.numel()), 16))
    dense = torch.randn(big.positions, 16, generator=generator)
    filled = dense.clone()
    ext.fill_skipped(filled, big.kept_index, fill)
    assert torch.equal(filled[big.kept_index], dense[big.kept_index])
    assert torch.equal(filled[big.skipped_index], fill.expand(int(big.skipped_index.numel()), 16))
    # with a residual: act(fill + residual) on the skipped rows
    residual = torch.randn(big.positions, 16, generator=generator)
    for relu in (False, True):
        rows = ext.masked_output(big.positions, 16, big.kept_index, fill, residual, relu, True)
        expected = fill + residual[big.skipped_index]
        assert torch.equal(rows[big.skipped_index], expected.clamp_min(0) if relu else expected)
    # write_skipped=False writes no row (the memory keeps whatever it held)
    rows = ext.masked_output(big.positions, 16, big.kept_index, fill, residual, True, False)
    written = (fill + residual[big.skipped_index]).clamp_min(0)
    assert not torch.equal(rows[big.skipped_index], written)
    with pytest.raises(RuntimeError, match="fill must be"):
        ext.masked_output(10, 16, torch.arange(3), torch.zeros(5), torch.empty(0), False, True)
    with pytest.raises(RuntimeError, match="residual must be"):
        ext.masked_output(10, 16, torch.arange(3), torch.zeros(16), torch.zeros(9, 16), False, True)


@pytest.mark.skipif(not _ext.available() and os.environ.get("CI") != "true",
                    reason="C++ extension not built (no compiler?)")
@pytest.mark.parametrize("in_channels,out_channels,k,stride,padding,dilation,size", [
    (3, 5, 3, 1, 1, 1, (23, 17)), (7, 19, 1, 1, 0, 1, (23, 17)), (16, 48, 3, 2, 1, 1, (23, 17)),
    (12, 70, 3, 1, 2, 2, (23, 17)), (20, 96, 5, 1, 2, 1, (23, 17)), (9, 130, 3, 2, 0, 1, (23, 17)),
    (40, 64, 1, 2, 0, 1, (23, 17)), (6, 33, 3, 1, 0, 3, (23, 17)),
    # enough kept positions for several groups of positions per task (weights shared in L1)
    (16, 48, 3, 1, 1, 1, (70, 90)), (24, 32, 3, 1, 1, 2, (70, 90)), (8, 20, 3, 2, 1, 1, (130, 150)),
])
@pytest.mark.parametrize("variant", [0, 1, 2])
def test_implicit_gemm_matches_conv2d(in_channels, out_channels, k, stride, padding, dilation, size, variant):
    """The compiled implicit GEMM writes exactly the conv's kept rows, for every register-block width
    of the kernels' ISA, in both of its kernels (0: chosen by shape; 1: weights shared in L1; 2:
    accumulators in registers)."""
    check_implicit_gemm(in_channels, out_channels, k, stride, padding, dilation, size, variant)


def check_implicit_gemm(in_channels, out_channels, k, stride, padding, dilation, size, variant):
    """The implicit GEMM of the loaded kernels against ``F.conv2d``, once per block width they take."""
    from anytimeify.masking.engine import _pack_implicit, implicit_block, kernel_isa

    assert _ext.available(), "the masked-conv C++ extension did not build (see the log for the compiler error)"
    weight, bias = _kernel_weights(in_channels, out_channels, k)
    blocks = kernel_isa()["blocks"]
    assert implicit_block(out_channels) in blocks
    for block in blocks:
        packed, padded_bias = _pack_implicit(weight, bias, [block])
        assert packed.shape[-1] == block

        def run(x_nhwc, kept, out, oh, ow, relu, slots, side, residual, packed=packed, padded_bias=padded_bias):
            _ext.load().implicit_conv(x_nhwc, packed, padded_bias, kept, out, oh, ow, k, k, stride, stride, padding,
                                      padding, dilation, dilation, relu, slots, side, residual, variant)

        _check_implicit_kernel(run, weight, bias, size, (stride, stride), (padding, padding), dilation)


@pytest.mark.skipif(not _ext.available() and os.environ.get("CI") != "true",
                    reason="C++ extension not built (no compiler?)")
@pytest.mark.parametrize("in_channels,out_channels,k,stride,padding,size", [
    (18, 18, 3, 1, (1, 1), (37, 45)), (5, 19, 3, 1, (1, 1), (20, 33)), (18, 36, 5, 1, (2, 2), (17, 50)),
    (7, 3, 1, 1, (0, 0), (9, 9)), (4, 1, 3, 2, (0, 0), (9, 70)), (3, 30, 3, 2, (2, 1), (31, 8)),
    (20, 72, 3, 1, (1, 1), (23, 17)), (9, 40, 3, 1, (0, 2), (5, 3)), (16, 16, 7, 1, (3, 3), (12, 40)),
    (18, 18, 3, 1, (1, 1), (64, 130)),  # several tasks per thread, blocks of 32 positions in long rows
])
def test_implicit_rows_matches_conv2d(in_channels, out_channels, k, stride, padding, size):
    """The row-vectorised implicit GEMM (thin outputs) writes exactly the conv's kept rows, for every
    chunk width of the kernels' ISA, vertical stride, asymmetric padding and map borders."""
    check_implicit_rows(in_channels, out_channels, k, stride, padding, size)


def check_implicit_rows(in_channels, out_channels, k, stride, padding, size):
    """The row kernel of the loaded kernels against ``F.conv2d``, with its largest chunk and with 4."""
    from anytimeify.masking.conv import conv_geometry
    from anytimeify.masking.engine import _pack_rows, kernel_isa, rows_layout

    assert _ext.available(), "the masked-conv C++ extension did not build (see the log for the compiler error)"
    weight, bias = _kernel_weights(in_channels, out_channels, k)
    geometry = conv_geometry(nn.Conv2d(in_channels, out_channels, k, (stride, 1), padding))
    chunks_allowed = kernel_isa()["row_chunks"]
    for max_chunk in sorted({max(chunks_allowed), 4}):
        chunk, chunks = rows_layout(geometry, max_chunk)
        assert chunk in chunks_allowed and chunk * chunks >= out_channels > chunk * (chunks - 1)
        packed, padded_bias = _pack_rows(weight, bias, chunk, chunks)

        def run(x_nhwc, kept, out, oh, ow, relu, slots, side, residual, packed=packed, padded_bias=padded_bias,
                chunk=chunk):
            _ext.load().implicit_rows(x_nhwc, packed, padded_bias, kept, out, oh, ow, stride, *padding, chunk, relu,
                                      slots, side, residual)

        _check_implicit_kernel(run, weight, bias, size, (stride, 1), padding, 1)


def test_rows_layout_eligibility():
    from anytimeify.masking.conv import conv_geometry
    from anytimeify.masking.engine import rows_layout

    # with chunks of up to 12 channels (32 vector registers): 18 channels: 2 chunks of 9, rounded
    # up to 10; 19: 2 x 10; 72: 6 x 12; 3: one chunk of 4
    assert rows_layout(conv_geometry(nn.Conv2d(18, 18, 3, padding=1)), 12) == (10, 2)
    assert rows_layout(conv_geometry(nn.Conv2d(720, 19, 1)), 12) == (10, 2)
    assert rows_layout(conv_geometry(nn.Conv2d(72, 72, 3, padding=1)), 12) == (12, 6)
    assert rows_layout(conv_geometry(nn.Conv2d(8, 3, 3, stride=(2, 1))), 12) == (4, 1)
    # up to 6 (16 registers: AVX2, SSE): 18 channels 3 x 6; 19: 4 chunks of 5, rounded up to 6; 36: 6 x 6
    assert rows_layout(conv_geometry(nn.Conv2d(18, 18, 3, padding=1)), 6) == (6, 3)
    assert rows_layout(conv_geometry(nn.Conv2d(720, 19, 1)), 6) == (6, 4)
    assert rows_layout(conv_geometry(nn.Conv2d(36, 36, 3, padding=1)), 6) == (6, 6)
    assert rows_layout(conv_geometry(nn.Conv2d(8, 3, 3, stride=(2, 1))), 6) == (4, 1)
    # it cannot run strided or dilated along x, dilated along y, or grouped; and multiples of 16
    # above 16 channels go to the channel-blocked kernel, which wastes no lanes there
    for conv in (nn.Conv2d(18, 18, 3, stride=2), nn.Conv2d(18, 18, 3, dilation=(2, 1)),
                 nn.Conv2d(18, 18, 3, dilation=(1, 2)), nn.Conv2d(18, 18, 3, groups=2), nn.Conv2d(48, 48, 3)):
        assert rows_layout(conv_geometry(conv)) is None


def _kernel_weights(in_channels, out_channels, k):
    generator = torch.Generator().manual_seed(in_channels * 1000 + out_channels)
    return (torch.randn(out_channels, in_channels, k, k, generator=generator),
            torch.randn(out_channels, generator=generator))


def _check_implicit_kernel(run, weight, bias, size, stride, padding, dilation):
    """``run(x_nhwc, kept, out, oh, ow, relu, slots, side, residual)`` (an implicit GEMM kernel) must
    write ``act(conv + bias [+ residual])`` into exactly the kept rows, and conv + bias into the
    side rows of the kept rows with a slot."""
    out_channels, in_channels = weight.shape[:2]
    generator = torch.Generator().manual_seed(out_channels * 7 + in_channels)
    x = torch.randn(2, in_channels, *size, generator=generator)
    ref = F.conv2d(x, weight, bias, stride, padding, dilation)
    oh, ow = ref.shape[2:]
    positions = ref.shape[0] * oh * ow
    kept = torch.nonzero(torch.rand(positions, generator=generator) < 0.4).reshape(-1)
    x_nhwc = x.permute(0, 2, 3, 1).contiguous()
    no_slots, empty = torch.empty(0, dtype=torch.int32), torch.empty(0)
    out = torch.full((positions, out_channels), 7.0)
    run(x_nhwc, kept, out, oh, ow, False, no_slots, empty, empty)
    expected = ref.permute(0, 2, 3, 1).reshape(positions, out_channels)
    assert torch.allclose(out[kept], expected[kept], atol=1e-4, rtol=1e-5)
    untouched = torch.ones(positions, dtype=torch.bool)
    untouched[kept] = False
    assert bool((out[untouched] == 7.0).all()), "rows that are not kept must not be written"
    # a ReLU applied as the rows are written; rows with a slot also keep their value before it
    slots = torch.full((positions,), -1, dtype=torch.int32)
    chosen = kept[torch.rand(kept.numel(), generator=generator) < 0.5]
    slots[chosen] = torch.arange(chosen.numel(), dtype=torch.int32)
    side = torch.zeros(chosen.numel(), out_channels)
    relu_out = torch.full((positions, out_channels), 7.0)
    run(x_nhwc, kept, relu_out, oh, ow, True, slots, side, empty)
    assert torch.allclose(relu_out[kept], expected[kept].clamp_min(0), atol=1e-4, rtol=1e-5)
    assert torch.allclose(side, expected[chosen], atol=1e-4, rtol=1e-5)
    assert bool((relu_out[untouched] == 7.0).all())
    # a residual added in the same pass (with and without the ReLU); side rows keep conv + bias
    residual = torch.randn(positions, out_channels, generator=generator)
    for relu in (False, True):
        res_out = torch.full((positions, out_channels), 7.0)
        side.zero_()
        run(x_nhwc, kept, res_out, oh, ow, relu, slots, side, residual)
        summed = expected[kept] + residual[kept]
        assert torch.allclose(res_out[kept], summed.clamp_min(0) if relu else summed, atol=1e-4, rtol=1e-5)
        assert torch.allclose(side, expected[chosen], atol=1e-4, rtol=1e-5)
        assert bool((res_out[untouched] == 7.0).all())


# ------------------------------------------------------------------ the engine's unmasked convs
@pytest.mark.parametrize("kernel", ["onednn", "implicit", "implicit_rows"])
@pytest.mark.parametrize("in_channels,out_channels,k,stride,padding,dilation,groups,bias,size", [
    (18, 18, 3, 1, 1, 1, 1, True, (37, 45)), (5, 19, 1, 1, 0, 1, 1, False, (20, 33)),
    (16, 48, 3, 2, 1, 1, 1, True, (23, 17)), (6, 36, 3, (2, 1), (0, 2), 1, 1, True, (15, 40)),
    (12, 20, 3, 1, 2, 2, 1, True, (23, 17)), (8, 8, 3, 1, 1, 1, 4, True, (10, 12)),  # grouped: PyTorch's conv
])
def test_dense_conv2d_matches_conv2d(kernel, in_channels, out_channels, k, stride, padding, dilation, groups, bias,
                                     size):
    """Every kernel of the engine's unmasked conv computes the conv, in channels-last layout; where
    a kernel cannot run (row kernel on a strided or dilated conv, grouped convs) another one does."""
    from anytimeify.masking.conv import conv_geometry
    from anytimeify.masking.engine import dense_conv2d

    conv = nn.Conv2d(in_channels, out_channels, k, stride, padding, dilation, groups, bias)
    x = torch.randn(2, in_channels, *size, generator=torch.Generator().manual_seed(out_channels))
    with torch.no_grad():
        expected = conv(x)
        for use_ext in (True, False):
            with extension(use_ext):
                got = dense_conv2d(x, conv.weight, conv.bias, conv_geometry(conv), kernel=kernel)
            assert got.shape == expected.shape
            assert (got - expected).abs().max() <= tolerance(expected)
    with pytest.raises(ValueError, match="kernel must be one of"):
        dense_conv2d(x, conv.weight, conv.bias, conv_geometry(conv), kernel="fast")


@pytest.mark.parametrize("kernel", ["onednn", "implicit", "implicit_rows"])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("relu", [False, True])
def test_dense_conv2d_adds_a_residual_before_the_activation(kernel, layout, relu):
    """act(conv(x) + residual) from every kernel: the implicit GEMMs add a channels-last residual as
    they write each row, the rest (and a residual in another layout) in one more pass."""
    from anytimeify.masking.conv import conv_geometry
    from anytimeify.masking.engine import dense_conv2d

    g = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(18, 36, 3, padding=1)
    x = torch.randn(2, 18, 21, 30, generator=g).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(2, 36, 21, 30, generator=g)
    if layout == "channels_last":
        residual = residual.contiguous(memory_format=torch.channels_last)
    before = residual.clone()
    with torch.no_grad():
        expected = conv(x) + residual
        expected = expected.relu() if relu else expected
        for use_ext in (True, False):
            with extension(use_ext):
                got = dense_conv2d(x, conv.weight, conv.bias, conv_geometry(conv), kernel=kernel,
                                   activation="relu" if relu else None, residual=residual)
            assert (got - expected).abs().max() <= tolerance(expected), (kernel, use_ext)
            assert torch.equal(residual, before)  # the residual is read, never written
        with pytest.raises(ValueError, match="residual shape"):
            dense_conv2d(x, conv.weight, conv.bias, conv_geometry(conv), kernel=kernel, residual=residual[:, :5])


def test_engine_conv_module():
    """EngineConv2d shares the conv's parameters, picks its kernel by the cost model and falls back
    to the plain conv for training, autograd and tensors the kernels do not take."""
    from anytimeify.masking.conv import EngineConv2d

    conv = nn.Conv2d(18, 18, 3, padding=1)
    engine_conv = EngineConv2d.from_conv(conv).eval()
    assert engine_conv.weight is conv.weight and engine_conv.bias is conv.bias
    assert list(engine_conv.state_dict()) == list(conv.state_dict())
    x = torch.randn(1, 18, 40, 64)
    with torch.no_grad():
        expected = conv(x)
        assert (engine_conv(x) - expected).abs().max() <= tolerance(expected)
        with extension(False):  # without the compiled kernels it is PyTorch's conv
            assert torch.equal(engine_conv(x), expected)
    # gradients flow (the plain conv runs) when autograd needs them
    x.requires_grad_(True)
    engine_conv(x).sum().backward()
    assert x.grad is not None and conv.weight.grad is not None
    # a residual folded into it: act(conv(x) + residual), with and without the compiled kernels
    engine_conv.activation = "relu"
    residual = torch.randn(1, 18, 40, 64)
    with torch.no_grad():
        expected = (conv(x) + residual).relu()
        assert (engine_conv(x, residual=residual) - expected).abs().max() <= tolerance(expected)
        with extension(False):
            assert torch.equal(engine_conv(x, residual=residual), expected)
    engine_conv.activation = None
    # the module runs dense_kernel's choice; the analytical cost model's (tuning off) for the
    # AVX-512 kernels it was calibrated on: thin outputs -> the row kernel; outputs above 32 MB
    # (fresh pages for PyTorch's conv) -> the implicit GEMM with a pooled output; a small 48-channel
    # conv -> oneDNN
    from anytimeify.masking.engine import DEFAULT_COST_MODEL, DEFAULT_ISA, dense_kernel

    if _ext.available():
        assert engine_conv.kernel((1, 18, 256, 512)) == dense_kernel(engine_conv.geometry, 1, 256, 512,
                                                                      DEFAULT_COST_MODEL)
    avx512 = CostModel(isa=DEFAULT_ISA)
    assert dense_kernel(engine_conv.geometry, 1, 256, 512, avx512) == "implicit_rows"
    assert dense_kernel(EngineConv2d.from_conv(nn.Conv2d(64, 256, 1)).geometry, 1, 256, 512, avx512) == "implicit"
    assert dense_kernel(EngineConv2d.from_conv(nn.Conv2d(48, 48, 3, padding=1)).geometry, 1, 64, 64, avx512) == "onednn"
    with pytest.raises(TypeError, match="plain torch.nn.Conv2d"):
        EngineConv2d.from_conv(MaskedConv2d.from_conv(nn.Conv2d(2, 2, 1)))
    with pytest.raises(ValueError, match="padding_mode='zeros'"):
        EngineConv2d.from_conv(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))


# --------------------------------------------------------------------------------- MAC counting
def test_paper_macs_hand_computed():
    # 3x3 conv 4 -> 6, stride 1, padding 1 on 2 x 4 x 5 x 5; per sample dense = 6*4*9*25 = 5400
    conv = MaskedConv2d.from_conv(nn.Conv2d(4, 6, 3, padding=1, bias=True))
    mask = torch.zeros(2, 1, 5, 5, dtype=torch.bool)
    mask[0, 0, :2, :] = True          # sample 0: 10 of 25 kept, p = 0.4
    mask[1, 0, 0, 0] = True           # sample 1: 1 of 25 kept, p = 0.04
    x_shape = (2, 4, 5, 5)
    assert conv.dense_macs(x_shape) == 2 * 5400
    p0, p1 = 0.4, 0.04
    expected = (5400 * p0 + (1 - p0) * p0 * 6 * 49 * 25) + (5400 * p1 + (1 - p1) * p1 * 6 * 49 * 25)
    # = (2160 + 1764) + (216 + 282.24) = 4422.24
    assert conv.paper_macs(x_shape, mask) == pytest.approx(expected, rel=1e-12)
    assert conv.paper_macs(x_shape, mask) == pytest.approx(4422.24, rel=1e-12)
    assert conv.paper_macs(x_shape, None) == 10800
    assert conv.paper_macs(x_shape, torch.ones(2, 1, 5, 5)) == 10800
    assert conv.paper_macs(x_shape, torch.zeros(2, 1, 5, 5)) == 0


def test_executed_macs_hand_computed():
    # 1x1 conv 3 -> 2 on 1 x 3 x 5 x 5, one kept pixel in the middle, lambda = 3 (3x3 support):
    # gather: 1 kept position x 2*3 MACs = 6; halo: the 8 neighbours x 8 taps x 2 channels = 128
    conv = MaskedConv2d.from_conv(nn.Conv2d(3, 2, 1, bias=True), execution="sparse")
    conv.strategy = "gather"
    mask = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    mask[0, 0, 2, 2] = True
    x_shape = (1, 3, 5, 5)
    assert conv.executed_macs(x_shape, mask) == 1 * 2 * 3 + 8 * 8 * 2
    # the dense kernel: all 25 positions x 6 MACs + the same halo
    conv.strategy = "dense"
    assert conv.executed_macs(x_shape, mask) == 25 * 6 + 8 * 8 * 2
    # lambda = 1 needs the full 7x7: every other position is in the halo, 48 taps each
    conv.strategy = "gather"
    with torch.no_grad():
        conv.interp_lambda.fill_(1.0)
    assert conv.executed_macs(x_shape, mask) == 6 + 24 * 48 * 2
    # corner pixel, lambda = 3: halo of 3 positions
    with torch.no_grad():
        conv.interp_lambda.fill_(3.0)
    corner = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    corner[0, 0, 0, 0] = True
    assert conv.executed_macs(x_shape, corner) == 6 + 3 * 8 * 2
    # all kept: the plain conv only; all skipped: nothing
    assert conv.executed_macs(x_shape, torch.ones(1, 1, 5, 5)) == 150
    assert conv.executed_macs(x_shape, torch.zeros(1, 1, 5, 5)) == 0
    # dense execution: full conv + full 7x7 depthwise interpolation (49 taps per output element)
    conv.execution = "dense"
    assert conv.executed_macs(x_shape, mask) == 150 + 2 * 49 * 25
    assert conv.executed_macs(x_shape, None) == 150


def test_gathered_conv_in_several_chunks(monkeypatch):
    from anytimeify.masking import kernels

    monkeypatch.setattr(kernels, "CHUNK_BYTES", 1)  # chunks of 1024 kept positions
    conv = nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2)
    masked = MaskedConv2d.from_conv(conv, execution="sparse")
    masked.strategy = "gather"
    x = torch.randn(2, 4, 40, 60)
    mask = torch.rand(2, 1, 40, 60) < 0.6
    with torch.no_grad():
        out = masked(x, mask)
        masked.execution = "dense"
        expected = masked(x, mask)
    assert MaskPlan(mask).kept > 2048
    assert (out - expected).abs().max() <= tolerance(expected)


def test_executed_macs_strided_grouped():
    # 3x3, stride 2, groups 2, 4 -> 6 channels, 9x9 input -> 5x5 output; per output 6 * 2 * 9 = 108
    conv = MaskedConv2d.from_conv(nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), execution="sparse")
    conv.strategy = "gather"
    mask = torch.zeros(2, 1, 5, 5, dtype=torch.bool)
    mask[0, 0, 2, 2] = True
    mask[1, 0, 0, 0] = True
    halo = 8 + 3
    assert conv.executed_macs((2, 4, 9, 9), mask) == 2 * 108 + halo * 8 * 6


@pytest.mark.skipif(not _ext.available() and os.environ.get("CI") != "true",
                    reason="C++ extension not built (no compiler?)")
@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("sizes", [
    [(6, 16, 20), (5, 8, 10), (4, 4, 5), (3, 2, 3)],   # HRNet's halving branches
    [(5, 7, 9), (3, 4, 5), (2, 1, 1), (4, 3, 9)],       # odd sizes, a 1x1 map, a map larger along x
])
def test_branch_fusion_kernel_matches_pytorch(sizes, align_corners):
    from anytimeify.exits import fuse_branches

    assert _ext.available(), "the masked-conv C++ extension did not build (see the log for the compiler error)"
    generator = torch.Generator().manual_seed(len(sizes[1]) + int(align_corners))
    features = [torch.randn(2, c, h, w, generator=generator) for c, h, w in sizes]
    expected = torch.cat([features[0]] + [F.interpolate(f, size=features[0].shape[-2:], mode="bilinear",
                                                        align_corners=align_corners) for f in features[1:]], dim=1)
    with torch.no_grad():
        fused = fuse_branches(features, align_corners)
    assert fused.is_contiguous(memory_format=torch.channels_last)  # the kernel ran
    assert fused.shape == expected.shape
    assert (fused - expected).abs().max() <= 1e-5
    # with autograd the PyTorch ops run (the kernel has no backward), gradients flow
    leaf = features[1].clone().requires_grad_(True)
    out = fuse_branches([features[0], leaf] + features[2:], align_corners)
    assert (out - expected).abs().max() <= 1e-5
    out.sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0


@pytest.mark.skipif(not _ext.available() and os.environ.get("CI") != "true",
                    reason="C++ extension not built (no compiler?)")
@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (1, 64, 16, 32), (1, 3, 1, 1), (1, 20, 2, 3)])
def test_exit_step_kernels_match_pytorch(shape, align_corners):
    """A redesigned exit's up step (bilinear x2) and down step (2x2 average pooling) run as compiled
    channels-last passes in inference, with PyTorch's results; with autograd PyTorch's ops run."""
    from anytimeify.exits import AvgPool2x2, Upsample2x

    assert _ext.available(), "the masked-conv C++ extension did not build (see the log for the compiler error)"
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1]))
    up_ref = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=align_corners)
    with torch.no_grad():
        up = Upsample2x(align_corners)(x)
        assert up.is_contiguous(memory_format=torch.channels_last)  # the kernel ran
        assert up.shape == up_ref.shape and (up - up_ref).abs().max() <= 1e-5
        if min(shape[2:]) >= 2:
            pooled = AvgPool2x2()(x)
            pool_ref = F.avg_pool2d(x, 2, 2)
            assert pooled.is_contiguous(memory_format=torch.channels_last)
            assert pooled.shape == pool_ref.shape and (pooled - pool_ref).abs().max() <= 1e-6
        else:  # too small to pool: PyTorch's own error
            with pytest.raises(RuntimeError, match="too small"):
                AvgPool2x2()(x)
    leaf = x.clone().requires_grad_(True)
    out = Upsample2x(align_corners)(leaf)
    out.sum().backward()
    assert (out - up_ref).abs().max() <= 1e-5 and leaf.grad is not None


@pytest.mark.skipif(not _ext.available() and os.environ.get("CI") != "true",
                    reason="C++ extension not built (no compiler?)")
@pytest.mark.parametrize("relu", [None, "relu"])
@pytest.mark.parametrize("resizes", [
    # HRNet's fuse layer of the first branch: the identity, then x2, x4, x8 nearest upsampling
    [None, {"scale_factor": 2.0, "mode": "nearest"}, {"scale_factor": 4.0, "mode": "nearest"},
     {"scale_factor": 8.0, "mode": "nearest"}],
    # an upsampled first term, a fixed output size, nearest-exact, a non-power-of-two scale
    [{"scale_factor": 2.0, "mode": "nearest"}, {"size": (24, 48), "mode": "nearest"},
     {"scale_factor": 3.0, "mode": "nearest-exact"}, None],
    # the segmentation HRNet's fuse layer (the reference implementation's): bilinear, align_corners=False
    [None, {"scale_factor": 2.0, "mode": "bilinear", "align_corners": False},
     {"scale_factor": 4.0, "mode": "bilinear", "align_corners": False},
     {"scale_factor": 8.0, "mode": "bilinear", "align_corners": False}],
    # bilinear first term, sizes (5x7 -> 24x48: a ratio that is no scale factor), align_corners,
    # mixed with nearest
    [{"size": (24, 48), "mode": "bilinear", "align_corners": False}, None,
     {"size": (24, 48), "mode": "bilinear", "align_corners": True}, {"scale_factor": 2.0, "mode": "nearest"}],
])
def test_fuse_sum_kernel_matches_pytorch(resizes, relu):
    """HRNet's fuse layer in one pass: PyTorch's upsample + add chain + ReLU, bit for bit with
    nearest resizes, up to float rounding with bilinear ones."""
    from anytimeify.masking.engine import fuse_sum

    assert _ext.available(), "the masked-conv C++ extension did not build (see the log for the compiler error)"
    generator = torch.Generator().manual_seed(len(str(resizes)))
    terms = []
    for r in resizes:
        if r is None:
            h, w = 24, 48
        elif "size" in r:
            h, w = 5, 7  # resized to 24 x 48 by size
        else:
            h, w = int(24 / r["scale_factor"]), int(48 / r["scale_factor"])
        terms.append(torch.randn(2, 6, h, w, generator=generator).contiguous(memory_format=torch.channels_last))
    expected = F.interpolate(terms[0], **resizes[0]) if resizes[0] else terms[0]
    for t, r in zip(terms[1:], resizes[1:]):
        expected = expected + (F.interpolate(t, **r) if r else t)
    if relu:
        expected = torch.relu(expected)
    bilinear = any(r is not None and r["mode"] == "bilinear" for r in resizes)

    def same(got):
        return (got - expected).abs().max() <= 1e-5 * expected.abs().max() if bilinear else torch.equal(got, expected)

    with torch.no_grad():
        out = fuse_sum(terms, resizes, relu)
    assert out.shape == expected.shape == (2, 6, 24, 48)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert same(out)
    # the compiled kernel itself, with PyTorch's source indices (and weights, bilinear)
    from anytimeify.masking.engine import _resize_tables

    tables = [_resize_tables(t, r, (24, 48)) for t, r in zip(terms, resizes)]
    raw = _ext.load().fuse_sum([t.permute(0, 2, 3, 1) for t in terms], *(list(c) for c in zip(*tables)), 24, 48,
                               relu == "relu")
    assert same(raw.permute(0, 3, 1, 2))
    # NCHW terms (no single-pass layout) take PyTorch's ops, with PyTorch's result
    assert torch.equal(fuse_sum([t.contiguous() for t in terms], resizes, relu), expected)
    with pytest.raises(ValueError, match="modes"):
        fuse_sum(terms, [{"scale_factor": 2.0, "mode": "bicubic"}] + list(resizes[1:]), relu)
    with pytest.raises(ValueError, match="activation"):
        fuse_sum(terms, resizes, "gelu")


def test_sparse_conv_built_under_inference_mode():
    # parameters created under inference_mode are inference tensors, which have no version counter
    with torch.inference_mode():
        conv = nn.Conv2d(4, 6, 3, padding=1)
        masked = MaskedConv2d.from_conv(conv, execution="sparse")
        x = torch.randn(1, 4, 9, 11)
        mask = torch.rand(1, 1, 9, 11, generator=torch.Generator().manual_seed(0)) < 0.5
        sparse = masked(x, mask)
        masked.execution = "dense"
        dense = masked(x, mask)
    assert (sparse - dense).abs().max() <= tolerance(dense)


def test_buffer_pool_reuses_dead_outputs_only(monkeypatch):
    from anytimeify.masking import engine

    assert _ext.available(), "the masked-conv C++ extension did not build (see the log for the compiler error)"
    ext = _ext.load()
    previous = engine.set_buffer_pool_limit(64 << 20)
    try:
        engine.release_buffers()
        plan = MaskPlan(torch.rand(1, 1, 256, 256, generator=torch.Generator().manual_seed(3)) < 0.5)
        fill = torch.arange(32, dtype=torch.float32)
        rows = ext.masked_output(plan.positions, 32, plan.kept_index, fill, torch.empty(0), False, True)  # 8 MiB
        pointer = rows.data_ptr()
        rows.fill_(7.0)
        assert engine.buffer_pool_stats()["unused_buffers"] == 0
        del rows  # its memory goes back to the pool ...
        stats = engine.buffer_pool_stats()
        assert stats["unused_buffers"] == 1 and stats["unused_bytes"] >= 8 << 20
        again = ext.masked_output(plan.positions, 32, plan.kept_index, fill, torch.empty(0), False, True)
        assert again.data_ptr() == pointer  # ... and serves the next output of its size
        assert engine.buffer_pool_stats()["hits"] == stats["hits"] + 1
        # a reused buffer is written as a fresh one would be: fill on every skipped row
        assert torch.equal(again[plan.skipped_index], fill.expand(int(plan.skipped_index.numel()), 32))
        # a live output is never handed out twice
        other = ext.masked_output(plan.positions, 32, plan.kept_index, fill, torch.empty(0), False, True)
        assert other.data_ptr() != again.data_ptr()
        other.fill_(1.0)
        assert torch.equal(again[plan.skipped_index], fill.expand(int(plan.skipped_index.numel()), 32))
        del again, other
        assert engine.buffer_pool_stats()["unused_buffers"] == 2
        engine.release_buffers()
        assert engine.buffer_pool_stats()["unused_bytes"] == 0
        # limit 0: nothing is kept
        engine.set_buffer_pool_limit(0)
        out = ext.masked_output(plan.positions, 32, plan.kept_index, fill, torch.empty(0), False, True)
        del out
        assert engine.buffer_pool_stats()["unused_bytes"] == 0
    finally:
        engine.set_buffer_pool_limit(previous)
    with pytest.raises(ValueError, match="limit_bytes must be an int >= 0, got -1"):
        engine.set_buffer_pool_limit(-1)
    monkeypatch.setenv("ANYTIMEIFY_POOL_MB", "lots")
    with pytest.raises(ValueError, match="ANYTIMEIFY_POOL_MB must be a whole number of MiB >= 0, got 'lots'"):
        _ext._pool_limit_from_env()
    monkeypatch.setenv("ANYTIMEIFY_POOL_MB", "16")
    assert _ext._pool_limit_from_env() == 16 << 20


def test_fuse_sums_rewrites_upsample_chains():
    """The graph pass fuses HRNet-style sums and leaves every other pattern alone."""
    from anytimeify._fx.fold import fuse_sums
    from anytimeify.masking.engine import fuse_sum

    class Fuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.up2, self.up4 = nn.Upsample(scale_factor=2.0), nn.Upsample(scale_factor=4.0)
            self.bilinear = nn.Upsample(scale_factor=2.0, mode="bilinear")
            self.shared = nn.Upsample(scale_factor=2.0)
            self.act = nn.ReLU()

        def forward(self, a, b, c):
            fused = self.act(a + self.up2(b) + self.up4(c))     # fused, ReLU included
            smooth = a + self.bilinear(b)                        # bilinear (the segmentation HRNet's)
            s = self.shared(b)                                   # read twice: added as a tensor
            twice = a + s + s * 2
            bicubic = a + nn.functional.interpolate(b, scale_factor=2.0, mode="bicubic")  # a function: left alone
            return fused, smooth, twice, bicubic

    gm = torch.fx.symbolic_trace(Fuse())
    a, b, c = torch.randn(1, 3, 8, 12), torch.randn(1, 3, 4, 6), torch.randn(1, 3, 2, 3)
    with torch.no_grad():
        expected = gm(a, b, c)
    assert fuse_sums(gm, gm.graph) == 3
    gm.recompile()
    calls = [n for n in gm.graph.nodes if n.target is fuse_sum]
    assert len(calls) == 3
    assert calls[0].args[2] == "relu" and [r is None for r in calls[0].args[1]] == [True, False, False]
    assert calls[1].args[2] is None and calls[1].args[1][1] == {
        "size": None, "scale_factor": 2.0, "mode": "bilinear", "align_corners": False}
    assert calls[2].args[2] is None and all(r is None for r in calls[2].args[1])  # a + s + s*2
    assert sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == "bilinear") == 0
    with torch.no_grad():
        got = gm(a, b, c)
    for g, e in zip(got, expected):
        assert (g - e).abs().max() <= 1e-6 * e.abs().max()


@pytest.mark.skipif(not _ext.available(), reason="compares the compiled plan builder with the PyTorch reference")
@pytest.mark.parametrize("radius", [0, 1, 3])
@pytest.mark.parametrize("shape,keep", [((2, 1, 13, 17), 0.4), ((1, 1, 1, 9), 0.5), ((1, 1, 8, 1), 0.5),
                                        ((3, 1, 6, 7), 0.0), ((1, 1, 6, 7), 1.0), ((1, 1, 32, 48), 0.9)])
def test_compiled_plan_lists_equal_the_pytorch_reference(radius, shape, keep):
    """The interpolation halo, its taps and the boundary slots from the compiled one-pass builder
    equal the PyTorch reference exactly, borders, empty and full masks, batches and one-row maps included."""
    from anytimeify.masking.engine import MaskPlan

    g = torch.Generator().manual_seed(radius * 100 + shape[2])
    mask = torch.rand(shape, generator=g) < keep
    mask = mask.expand(shape)  # an expanded mask (as imposed masks come) is not contiguous in memory
    compiled, reference = MaskPlan(mask), MaskPlan(mask)
    reference.use_extension = False
    for a, b in zip(compiled.halo_index(radius), reference.halo_index(radius)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    slots_a, count_a = compiled.boundary_slots(radius)
    slots_b, count_b = reference.boundary_slots(radius)
    assert count_a == count_b and slots_a.dtype == slots_b.dtype and torch.equal(slots_a, slots_b)
