"""One-off costs never enter a printed time, and a mask that keeps everything costs nothing extra.

* The engine measures its kernels for a layer shape the first time it meets it on a machine
  (``ANYTIMEIFY_TUNE=auto``), inside the model's call. Here that measuring is made to take 100 s
  of a fake clock (and the model's own work none), so a timing that includes it shows it: the
  times of :func:`anytimeify.train.evaluate` (``anytimeify eval``), the demo and the benchmarks
  must not.
* A masked conv whose mask keeps every position computes ``y*1 + I(y)*0 = y``: the dense execution
  returns the plain conv's output without running the interpolation (same output, same
  gradients, lambda's a zero), except while exporting, where the blend stays in the graph.
"""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn as nn

import anytimeify
from anytimeify import bench, demo
from anytimeify.masking import _ext, tune
from anytimeify.masking import conv as conv_module
from anytimeify.masking.conv import MaskedConv2d
from anytimeify.masking.interp import interpolate
from anytimeify.metrics import SegmentationMetrics
from anytimeify.models import hrnet_seg
from anytimeify.train import evaluate

needs_tuner = pytest.mark.skipif(not _ext.available(), reason="the tuner measures the compiled kernels")

MEASURING_SECONDS = 100.0


@pytest.fixture
def slow_tuner(tmp_path, monkeypatch):
    """Tuning on, an empty cache, and a clock on which the model's work takes no time and measuring
    one layer shape 100 s. Returns the list of the input sizes measured."""
    monkeypatch.setenv("ANYTIMEIFY_TUNE", "auto")
    monkeypatch.setenv("ANYTIMEIFY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tune, "_tables", {})
    monkeypatch.setattr(tune, "_warned", {"slower": False, "tuning": False})
    now = {"t": 1000.0}
    monkeypatch.setattr(time, "perf_counter", lambda: now["t"])
    measured = []

    def slow_measure(geometry, weight, bias, in_height, in_width, *, masked, **kwargs):
        now["t"] += MEASURING_SECONDS
        measured.append((in_height, in_width))
        # PyTorch's own conv measured fastest everywhere: a choice every layer can run
        return tune.LayerTiming(dense={"onednn": 1.0},
                                masked={"pytorch": [1.0] * len(tune.TUNE_KEEPS)} if masked else {})

    monkeypatch.setattr(tune, "measure_layer", slow_measure)
    monkeypatch.setattr(tune, "_fresh_ns", lambda: 0.0)
    return measured


@pytest.fixture(scope="module")
def masked_model():
    """A small anytime HRNet whose masks skip part of every map (so the masked convs ask the tuner)."""
    torch.manual_seed(0)
    confidence = anytimeify.Confidence(criterion=bench.FixedMasks([0.3, 0.5, 0.7]), execution="auto")
    return anytimeify.convert(hrnet_seg("w18_small", num_classes=3), confidence=confidence).eval()


def _scenes(*sizes):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(3, h, w, generator=g), torch.randint(0, 3, (h, w), generator=g)) for h, w in sizes]


@needs_tuner
def test_evaluate_times_leave_out_first_use_measuring(masked_model, slow_tuner):
    # the second size is first met in the timed pass, after the warm-up on the first image
    report = evaluate(masked_model, _scenes((64, 64), (96, 64), (64, 64)), lambda: SegmentationMetrics(3),
                      confidence=True)
    # it measured the layers of the square image (in the warm-up) and of the other one (in the timed pass)
    assert any(h == w for h, w in slow_tuner) and any(h != w for h, w in slow_tuner)
    assert [e.seconds for e in report.exits] == pytest.approx([0.0] * 4, abs=1e-6)
    assert report.exits[1].skipped > 0  # masks skipped positions: the masked convs ran the engine


@needs_tuner
def test_demo_times_leave_out_first_use_measuring(masked_model, slow_tuner):
    seconds = demo._interleaved_seconds(masked_model, _scenes((64, 64), (96, 64)), 2)
    assert slow_tuner  # shapes were met for the first time in the timed runs
    assert seconds[True] == pytest.approx([0.0] * 4, abs=1e-6)
    assert seconds[False] == pytest.approx([0.0] * 4, abs=1e-6)


@needs_tuner
def test_bench_times_leave_out_first_use_measuring(masked_model, slow_tuner):
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    masked_model.set_confidence(True)
    with torch.no_grad():
        times = bench._interleaved({"anytime": lambda: list(masked_model.anytime(x))}, 1)
    assert slow_tuner and times["anytime"] == pytest.approx([0.0], abs=1e-6)


# ---------------------------------------------------------------------------------- all kept
def _blend(conv: MaskedConv2d, x, mask, residual=None):
    """The dense execution's formula, written out: act(y*m + I(y*m)*(1 - m) + shift [+ residual])."""
    y = nn.functional.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    m = mask.to(y.dtype)
    out = y * m + interpolate(y * m, conv.interp_lambda) * (1 - m)
    if conv.shift is not None:
        out = out + conv.shift.reshape(1, -1, 1, 1)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if conv.activation == "relu" else out


def _conv(seed=0):
    torch.manual_seed(seed)
    return MaskedConv2d.from_conv(nn.Conv2d(4, 6, 3, padding=1), execution="dense")


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_all_kept_dense_execution_skips_the_blend_with_the_same_output_and_gradients(dtype, monkeypatch):
    conv = _conv()
    x = torch.randn(2, 4, 9, 11, requires_grad=True)
    mask = torch.ones(2, 1, 9, 11, dtype=dtype)
    expected = _blend(conv, x, mask)
    grads = torch.autograd.grad(expected.square().sum(), [x, conv.weight, conv.bias, conv.interp_lambda])

    def no_interpolation(*args, **kwargs):
        raise AssertionError("the interpolation ran for a mask that keeps everything")

    monkeypatch.setattr(conv_module, "interpolate", no_interpolation)
    out = conv(x, mask)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    got = torch.autograd.grad(out.square().sum(), [x, conv.weight, conv.bias, conv.interp_lambda])
    for g, e in zip(got, grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert got[3] is not None and float(got[3]) == 0.0  # lambda: a zero gradient, as the blend gives it
    with torch.no_grad():
        torch.testing.assert_close(conv(x, mask), expected, rtol=1e-6, atol=1e-6)
    # a mask that skips one position still blends (the patched interpolation is the one in use)
    mask[0, 0, 4, 5] = 0
    with pytest.raises(AssertionError, match="the interpolation ran"):
        conv(x, mask)


def test_all_kept_dense_execution_applies_the_epilogue():
    conv = _conv(1)
    conv.set_epilogue(shift=torch.randn(6), activation="relu")
    x, residual = torch.randn(1, 4, 8, 8), torch.randn(1, 6, 8, 8)
    mask = torch.ones(1, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(conv(x, mask, residual=residual), _blend(conv, x, mask, residual),
                                   rtol=1e-6, atol=1e-6)


def test_all_kept_counts_the_plain_conv():
    conv = _conv()
    shape, ones = (2, 4, 9, 11), torch.ones(2, 1, 9, 11)
    dense = conv.dense_macs(shape)
    assert conv.executed_macs(shape, ones, execution="dense") == dense  # the blend does not run
    assert conv.paper_macs(shape, ones) == dense  # the paper's count: p = 1, no interpolation term
    partial = ones.clone()
    partial[1, 0, 0, 0] = 0
    assert conv.executed_macs(shape, partial, execution="dense") == dense + 2 * 6 * 49 * 9 * 11


def test_export_keeps_the_blend_when_its_example_mask_keeps_everything():
    """The all-kept test is a data-dependent branch: exporting must not bake it in."""
    conv = _conv(2).eval()

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x, mask):
            return self.conv(x, mask)

    x = torch.randn(1, 4, 10, 10)
    program = torch.export.export(Wrapper(), (x, torch.ones(1, 1, 10, 10, dtype=torch.bool)))
    partial = torch.rand(1, 1, 10, 10, generator=torch.Generator().manual_seed(0)) > 0.5
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x, partial), _blend(conv, x, partial), rtol=1e-5, atol=1e-5)
        ones = torch.ones(1, 1, 10, 10, dtype=torch.bool)
        torch.testing.assert_close(program.module()(x, ones), _blend(conv, x, ones), rtol=1e-5, atol=1e-5)
