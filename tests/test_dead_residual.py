"""Residuals nothing reads afterwards: the inference rewrites find them on the graph, and the engine
conv then writes ``act(conv(x) + residual)`` into the residual's memory (oneDNN's convolution with a
sum post-op, or the implicit GEMMs), chosen by measured timings; the results equal the plain model."""
from __future__ import annotations

import json

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import anytimeify
from anytimeify._fx.fold import fuse_residuals, mark_dead_residuals, use_engine_convs
from anytimeify.bench import PAPER_SKIPS, FixedMasks, fold_for_inference
from anytimeify.masking import _ext, tune
from anytimeify.masking.conv import EngineConv2d, conv_geometry
from anytimeify.masking.dispatch import INTO_KERNELS, onednn_post_ops_available, residual_candidates, residual_kernel
from anytimeify.masking.engine import DEFAULT_COST_MODEL, dense_conv2d
from anytimeify.models import create_model


def tolerance(expected: torch.Tensor) -> float:
    return 1e-5 * max(1.0, float(expected.abs().max()))


@pytest.mark.parametrize("kernel", INTO_KERNELS)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("cin,cout,k,stride,groups", [(18, 18, 3, 1, 1), (16, 48, 1, 1, 1), (12, 24, 3, 2, 1),
                                                      (8, 8, 3, 1, 4)])
def test_into_kernels_write_the_result_into_the_residual(kernel, relu, cin, cout, k, stride, groups):
    """Every kernel that writes into the residual computes act(conv(x) + residual); where it can
    run in place (oneDNN's op for any conv, the implicit GEMMs for groups 1) the result is the
    residual's own memory, elsewhere another kernel computes the same values."""
    g = torch.Generator().manual_seed(cin + cout)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups).eval()
    x = torch.randn(2, cin, 19, 26, generator=g).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = conv(x)
        residual = torch.randn(y.shape, generator=g).contiguous(memory_format=torch.channels_last)
        expected = y + residual
        expected = expected.relu() if relu else expected
        work = residual.clone()
        got = dense_conv2d(x, conv.weight, conv.bias, conv_geometry(conv), kernel=kernel,
                           activation="relu" if relu else None, residual=work, into_residual=True)
    assert (got - expected).abs().max() <= tolerance(expected)
    if kernel == "onednn_into":
        in_place = onednn_post_ops_available()
    else:  # the implicit GEMMs (the row kernel where its layout fits, else the channel-blocked one)
        in_place = _ext.available() and groups == 1
    if in_place:
        assert got.data_ptr() == work.data_ptr()
        assert torch.equal(work, got)


def test_into_kernels_need_a_residual_they_may_overwrite():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 8, 8)
    residual = torch.randn(1, 4, 8, 8)
    for kernel in INTO_KERNELS:
        with pytest.raises(ValueError, match="writes into the residual"):
            dense_conv2d(x, conv.weight, conv.bias, conv_geometry(conv), kernel=kernel, residual=residual)
        with pytest.raises(ValueError, match="writes into the residual"):
            dense_conv2d(x, conv.weight, conv.bias, conv_geometry(conv), kernel=kernel, into_residual=True)


class _Blocks(nn.Module):
    """Residual blocks whose residuals are dead (``a``), read later (``b``), an input (``c``), read
    later through an identity (``d``) or the conv's own input (``e``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a1, self.a2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 1)
        self.d0, self.d = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1)
        self.alias = nn.Identity()
        self.e0, self.e = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.relu = nn.ReLU()

    def forward(self, x, skip):
        h = self.stem(x)
        a = self.relu(self.a2(self.a1(h)) + h)             # h: dead after the addition
        b = self.b(a) + a                                  # a: read again below
        b = b * a
        c = self.c(b) + skip                               # skip: the caller's tensor
        d0 = self.d0(c)
        kept = self.alias(d0)
        d = self.d(c) + d0                                 # d0 read later through its alias
        d = d + kept
        e0 = self.e0(d)
        return self.e(e0) + e0                             # the conv reads its residual


def test_mark_dead_residuals_finds_only_residuals_nothing_reads_later():
    model = _Blocks().eval()
    gm = fx.symbolic_trace(model)
    use_engine_convs(gm, graph=gm.graph)
    assert fuse_residuals(gm, gm.graph) == 5
    assert mark_dead_residuals(gm, gm.graph) == 1
    dead = {name for name, m in gm.named_modules() if isinstance(m, EngineConv2d) and m.residual_dead}
    assert dead == {"a2"}
    gm.recompile()
    x, skip = torch.randn(1, 3, 12, 16), torch.randn(1, 8, 12, 16)
    skip_before = skip.clone()
    with torch.no_grad():
        expected = model(x, skip)
        got = gm(x.contiguous(memory_format=torch.channels_last), skip)
    assert (got - expected).abs().max() <= tolerance(expected)
    assert torch.equal(skip, skip_before)  # the caller's tensor is never written


def test_hrnet_layer1_writes_into_its_residuals_and_matches():
    """W18-Small-v2: the two bottlenecks of ``layer1`` (their residuals die at the addition) write
    into them in the frozen anytime model, every residual conv of the stages in the dense
    baseline; both equal the models they were made from."""
    torch.manual_seed(0)
    base = create_model("hrnet_w18_small_v2").eval()
    model = anytimeify.convert(base, confidence=anytimeify.Confidence(criterion=FixedMasks(PAPER_SKIPS, seed=0),
                                                                      execution="sparse")).eval()
    frozen = model.freeze()
    dead = {n for n, m in frozen.named_modules() if isinstance(m, EngineConv2d) and m.residual_dead}
    assert dead == {"layer1.0.conv3", "layer1.1.conv3"}
    dense = fold_for_inference(base)
    dense_dead = {n for n, m in dense.named_modules() if isinstance(m, EngineConv2d) and m.residual_dead}
    assert {"layer1.0.conv3", "layer1.1.conv3", "stage4.1.branches.3.1.conv2"} <= dense_dead
    x = torch.randn(1, 3, 128, 256).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for want, got in zip(model.anytime(x), frozen.anytime(x)):
            assert (got.logits - want.logits).abs().max() <= 1e-4 * max(1.0, float(want.logits.abs().max()))
        expected = base(x)
        assert (dense(x) - expected).abs().max() <= 1e-4 * max(1.0, float(expected.abs().max()))


@pytest.fixture
def table(tmp_path, monkeypatch):
    monkeypatch.setenv("ANYTIMEIFY_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("ANYTIMEIFY_TUNE", "cache")
    monkeypatch.setattr(tune, "_tables", {})
    return tune.active_table()


@pytest.mark.skipif(not _ext.available(), reason="the tuner tunes the compiled kernels")
def test_residual_candidates_are_measured_and_the_fastest_runs(table, monkeypatch):
    geometry = conv_geometry(nn.Conv2d(18, 18, 3, padding=1))
    monkeypatch.setattr(tune, "CROP_MACS", 2e6)
    timing = tune.measure_layer(geometry, torch.randn(18, 18, 3, 3), torch.randn(18), 24, 40, masked=False,
                                residual=True)
    assert set(timing.residual) == set(residual_candidates(geometry))
    assert all(v > 0 for v in timing.residual.values())
    assert tune.LayerTiming.from_json(json.loads(json.dumps(timing.to_json()))).residual == timing.residual
    # injected timings decide, whichever they are
    key = tune.shape_key(geometry, 24, 40)
    for fastest in residual_candidates(geometry):
        injected = {name: (1.0 if name == fastest else 5.0) for name in residual_candidates(geometry)}
        table.put(key, tune.LayerTiming(dense=dict(timing.dense), residual=injected))
        assert residual_kernel(geometry, 1, 24, 40, DEFAULT_COST_MODEL) == fastest
    # a cached timing without every candidate is measured again (auto mode), not trusted
    table.put(key, tune.LayerTiming(dense=dict(timing.dense), residual={"implicit": 1.0}))
    monkeypatch.setenv("ANYTIMEIFY_TUNE", "auto")
    measured = []
    real = tune.measure_layer
    monkeypatch.setattr(tune, "measure_layer", lambda *a, **k: measured.append(k) or real(*a, **k))
    tune.lookup(geometry, 24, 40, masked=False, residual=True)
    assert measured and measured[0]["residual"]
    assert set(table.get(key).residual) == set(residual_candidates(geometry))
