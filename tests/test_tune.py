"""The tuner: kernel choices from timings measured on the machine, cached per CPU, never slower than
PyTorch's own conv on a layer.

Timings are injected where a test checks a choice (the machine's real timings are noise here);
the measuring code runs on small layers where a test checks that it measures and caches.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import anytimeify
from anytimeify.masking import _ext, tune
from anytimeify.masking.conv import EngineConv2d, MaskedConv2d, conv_geometry
from anytimeify.masking.engine import DEFAULT_COST_MODEL, choose_strategy, dense_kernel, rows_layout
from anytimeify.models import hrnet_seg

pytestmark = pytest.mark.skipif(not _ext.available(), reason="the tuner tunes the compiled kernels")

THIN = conv_geometry(nn.Conv2d(18, 18, 3, padding=1))   # every candidate can run it
WIDE = conv_geometry(nn.Conv2d(64, 64, 3, padding=1))   # no row kernel (a multiple of 16 above 16)


@pytest.fixture
def table(tmp_path, monkeypatch):
    """An empty tuning table in a temporary cache, active, measuring nothing by itself."""
    monkeypatch.setenv("ANYTIMEIFY_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("ANYTIMEIFY_TUNE", "cache")
    monkeypatch.setattr(tune, "_tables", {})
    active = tune.active_table()
    assert active is not None and not active.layers
    return active


timings = st.floats(min_value=0.01, max_value=100.0, allow_nan=False)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(dense=st.fixed_dictionaries({k: timings for k in tune.DENSE_CANDIDATES}),
       masked=st.fixed_dictionaries({k: st.lists(timings, min_size=4, max_size=4) for k in tune.MASKED_CANDIDATES}),
       keep=st.floats(min_value=0.01, max_value=0.99), thin=st.booleans())
def test_choice_is_never_slower_than_pytorch(dense, masked, keep, thin, tmp_path_factory, monkeypatch_module):
    """Whatever the timings, the engine runs a candidate measured no slower than PyTorch's conv
    (unmasked layers) or PyTorch's conv and blend (masked layers): the fastest one it can run."""
    monkeypatch_module.setenv("ANYTIMEIFY_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    monkeypatch_module.setattr(tune, "_tables", {})
    geometry = THIN if thin else WIDE
    active = tune.active_table()
    active.put(tune.shape_key(geometry, 64, 96), tune.LayerTiming(dense=dense, masked=masked))
    runnable = ["onednn", "implicit"] + (["implicit_rows"] if rows_layout(geometry) is not None else [])
    chosen = dense_kernel(geometry, 1, 64, 96)
    assert chosen in runnable
    assert dense[chosen] == min(dense[k] for k in runnable) <= dense["onednn"]
    positions = 64 * 96
    strategy = choose_strategy(geometry, positions, int(keep * positions), DEFAULT_COST_MODEL, implicit=True,
                               in_hw=(64, 96))
    at_keep = tune.LayerTiming(masked=masked).masked_at(int(keep * positions) / positions)
    allowed = ["pytorch", "dense", "gather", "implicit"] + (["implicit_rows"] if rows_layout(geometry) else [])
    assert strategy in allowed
    assert at_keep[strategy] == min(at_keep[k] for k in allowed) <= at_keep["pytorch"]


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ANYTIMEIFY_TUNE", "cache")
        yield patch


def test_interpolation_between_measured_keeps():
    timing = tune.LayerTiming(masked={"implicit": [2.0, 4.0, 6.0, 8.0], "dense": [8.5, 8.5, 8.5, 8.5]},
                              keeps=[0.2, 0.45, 0.7, 0.9])
    assert timing.masked_at(0.2)["implicit"] == pytest.approx(2.0)
    assert timing.masked_at(0.325)["implicit"] == pytest.approx(3.0)
    assert timing.masked_at(0.8)["implicit"] == pytest.approx(7.0)
    assert timing.masked_at(1.0)["implicit"] == pytest.approx(9.0)   # the last segment, extended
    assert timing.masked_at(0.0)["implicit"] == pytest.approx(0.4)   # the first one, extended
    assert timing.best_masked(0.5) == "implicit" and timing.best_masked(0.98) == "dense"
    assert timing.best_masked(0.5, allowed=["dense"]) == "dense"


def test_a_cache_of_another_machine_or_torch_is_ignored(table):
    table.put(tune.shape_key(THIN, 64, 96), tune.LayerTiming(dense={"onednn": 1.0, "implicit": 0.5}))
    table.save()
    assert table.path.is_file()
    data = json.loads(table.path.read_text())
    assert tune.TuningTable.read(table.path, table.key).layers.keys() == table.layers.keys()
    # the same file claiming another CPU / thread count / torch version (another key): ignored
    data["key"] = "another-cpu-or-torch"
    table.path.write_text(json.dumps(data))
    assert tune.TuningTable.read(table.path, table.key) is None
    tune._tables.clear()
    fresh = tune.active_table()
    assert fresh.key == table.key and not fresh.layers
    # and a file of another format or a damaged one, too
    table.path.write_text("{not json")
    assert tune.TuningTable.read(table.path, table.key) is None


def test_the_key_changes_with_threads_and_names_the_machine(table):
    key_now = table.key
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads != 1 else 2)
        other = tune.active_table()
    finally:
        torch.set_num_threads(threads)
    assert other.key != key_now
    assert table.machine["cpu"] and table.machine["kernel_isa"] in ("avx512", "avx2", "avx", "neon", "sse2", "generic")
    assert str(table.path).endswith(f"tuning/{key_now}.json")


def test_auto_mode_measures_a_new_shape_once_and_caches_it(table, monkeypatch):
    monkeypatch.setenv("ANYTIMEIFY_TUNE", "auto")
    calls = []
    real = tune.measure_layer

    def counted(*args, **kwargs):
        calls.append(kwargs["masked"])
        return real(*args, **kwargs)

    monkeypatch.setattr(tune, "measure_layer", counted)
    monkeypatch.setattr(tune, "_fresh_ns", lambda: 0.5)
    geometry = conv_geometry(nn.Conv2d(8, 12, 3, padding=1))
    kernel = dense_kernel(geometry, 1, 16, 24)
    assert calls == [False]
    timing = table.get(tune.shape_key(geometry, 16, 24))
    assert set(timing.dense) == {"onednn", "implicit", "implicit_rows"} and not timing.masked
    assert kernel == timing.best_dense()
    # the faster of the implicit GEMM's two kernels is what "implicit" runs for this shape
    assert timing.implicit_variant in (1, 2)
    assert tune.implicit_variant(geometry, 16, 24) == timing.implicit_variant
    assert tune.implicit_variant(geometry, 16, 25) == 0  # not measured: the kernel chooses by shape
    # a masked conv of that shape needs its masked candidates too: measured once more, then cached
    strategy = choose_strategy(geometry, 16 * 24, 100, DEFAULT_COST_MODEL, implicit=True, in_hw=(16, 24))
    assert calls == [False, True]
    timing = table.get(tune.shape_key(geometry, 16, 24))
    assert set(timing.masked) == set(tune.MASKED_CANDIDATES)
    assert all(len(v) == len(tune.TUNE_KEEPS) and min(v) > 0 for v in timing.masked.values())
    assert strategy == timing.best_masked(100 / (16 * 24))
    choose_strategy(geometry, 16 * 24, 300, DEFAULT_COST_MODEL, implicit=True, in_hw=(16, 24))
    dense_kernel(geometry, 1, 16, 24)
    assert calls == [False, True]
    on_disk = tune.TuningTable.read(table.path, table.key)
    assert on_disk.get(tune.shape_key(geometry, 16, 24)).masked == timing.masked and on_disk.fresh_ns == 0.5


def test_tuning_off_and_bad_settings(monkeypatch):
    monkeypatch.setenv("ANYTIMEIFY_TUNE", "off")
    assert tune.active_table() is None
    assert tune.lookup(THIN, 64, 96, masked=True) is None
    monkeypatch.setenv("ANYTIMEIFY_TUNE", "sometimes")
    with pytest.raises(ValueError, match="ANYTIMEIFY_TUNE must be one of"):
        tune.tune_mode()


def test_tune_a_model_ahead(table, monkeypatch):
    """``tune`` measures every engine layer shape of a frozen model once; a second call measures
    nothing; the model then runs the measured choices and computes the same outputs."""
    monkeypatch.setattr(tune, "CROP_MACS", 2e6)
    monkeypatch.setattr(tune, "TUNE_KEEPS", (0.3, 0.8))
    torch.manual_seed(0)
    net = hrnet_seg("w18_small_v2", num_classes=3).eval()
    model = anytimeify.convert(net, confidence=anytimeify.Confidence(threshold=0.5)).eval()
    frozen = model.freeze()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = [o.logits for o in frozen.anytime(x)]
    report = tune.tune(frozen, (64, 64), progress=False)
    engine_layers = {tune.shape_key(m.geometry, 0, 0)[:-2] for m in frozen.modules()
                     if isinstance(m, (MaskedConv2d, EngineConv2d))}
    assert report.measured == len(report.layers) == len(table.layers) > 0
    assert {tuple(int(v) for v in k[:-2]) for k in table.layers} <= engine_layers
    for row in report.layers:
        assert row["dense"] in tune.DENSE_CANDIDATES
        assert row["masked"] is None or set(row["masked"].values()) <= set(tune.MASKED_CANDIDATES)
    assert tune.tune(frozen, (64, 64), progress=False).measured == 0
    with torch.no_grad():
        after = [o.logits for o in frozen.anytime(x)]
    for a, b in zip(after, before):
        assert (a - b).abs().max() <= 1e-4 * max(1.0, b.abs().max().item())


def test_tune_command(tmp_path, monkeypatch, capsys):
    """``anytimeify tune MODEL`` measures the built-in model's layer shapes into the cache and
    prints the choices with the machine they were measured on."""
    from anytimeify.cli import main

    monkeypatch.setenv("ANYTIMEIFY_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("ANYTIMEIFY_TUNE", "auto")
    monkeypatch.setattr(tune, "_tables", {})
    monkeypatch.setattr(tune, "CROP_MACS", 2e6)
    monkeypatch.setattr(tune, "TUNE_KEEPS", (0.3, 0.8))
    assert main(["tune", "hrnet_w18_small_v2", "--input", "64x64", "--num-classes", "3", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["measured"] == len(payload["layers"]) > 10
    assert payload["machine"]["cpu"] and payload["machine"]["threads"] == torch.get_num_threads()
    assert all(row["dense"] in tune.DENSE_CANDIDATES for row in payload["layers"])
    cached = list((tmp_path / "tuning").glob("*.json"))
    assert len(cached) == 1 and payload["cache"] == str(cached[0])
    assert main(["tune", "hrnet_w18_small_v2", "--input", "64x64", "--num-classes", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["measured"] == 0
    assert main(["tune", "hrnet_w18_small_v2", "--input", "60x64"]) == 2  # not a multiple of 32
    assert "60x64" in capsys.readouterr().err


def test_the_user_is_told_once_when_pytorch_wins_most_masked_layers(table, monkeypatch, caplog):
    """Unmasked shapes where oneDNN is the fastest dense kernel are not news; masked shapes where
    PyTorch's conv and blend beat every compiled candidate at every keep are, once."""
    monkeypatch.setitem(tune._warned, "slower", False)
    compiled_slower = {"onednn": 1.0, "implicit": 2.0}
    for width in range(1, 2 * tune.CHECK_AFTER):  # unmasked layers: oneDNN wins, no warning
        table.put((width, width, 3, 3, 1, 1, 1, 1, 1, 1, 1, 64, 64), tune.LayerTiming(dense=dict(compiled_slower)))
    with caplog.at_level("WARNING", logger="anytimeify.masking.tune"):
        tune._check_compiled_pays(table)
        assert not caplog.records
        masked = {"pytorch": [1.0] * 4, "implicit": [3.0] * 4, "gather": [4.0] * 4}
        for width in range(1, tune.CHECK_AFTER + 1):
            table.put((width, width, 3, 3, 1, 1, 1, 1, 1, 1, 1, 32, 32),
                      tune.LayerTiming(dense=dict(compiled_slower), masked=masked))
            tune._check_compiled_pays(table)
        tune._check_compiled_pays(table)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert f"slower than PyTorch's on {tune.CHECK_AFTER} of {tune.CHECK_AFTER} masked layer shapes" in warnings[0]


def test_convs_sharing_a_mask_look_their_choice_up_once_per_geometry(table, monkeypatch):
    """The choice of a segment's convs is looked up once per geometry and plan, not once per conv
    (the lookup costs more than a small conv's kernel), and the outputs are those of fresh lookups."""
    from anytimeify.masking.plans import MaskPlan

    torch.manual_seed(0)
    convs = [MaskedConv2d.from_conv(nn.Conv2d(18, 18, 3, padding=1), execution="sparse").eval() for _ in range(5)]
    convs.append(MaskedConv2d.from_conv(nn.Conv2d(18, 36, 1), execution="sparse").eval())
    x = torch.randn(1, 18, 24, 32).contiguous(memory_format=torch.channels_last)
    mask = torch.rand(1, 1, 24, 32) < 0.4
    calls = []
    real = tune.lookup
    monkeypatch.setattr(tune, "lookup", lambda *a, **k: calls.append(a[0]) or real(*a, **k))

    def run(shared: bool):
        plan = MaskPlan(mask)
        y, outs = x, []
        with torch.no_grad():
            for conv in convs[:-1]:
                y = conv(y, mask, MaskPlan(mask) if not shared else plan)
                outs.append(y)
            outs.append(convs[-1](y, mask, plan))
        return outs

    fresh = run(shared=False)
    assert len(calls) >= len(convs)  # strategy and variant per conv
    calls.clear()
    shared = run(shared=True)
    assert len(set(calls)) == 2 and len(calls) <= 4  # two geometries: a strategy and a variant each at most
    for a, b in zip(fresh, shared):
        torch.testing.assert_close(a, b)


def test_the_hot_path_reads_the_environment_as_os_environ_does(monkeypatch):
    """The engine's fast environment reads see every change at once, as ``os.environ.get`` does."""
    import os

    from anytimeify._env import getenv

    monkeypatch.delenv("ANYTIMEIFY_TEST_VAR", raising=False)
    assert getenv("ANYTIMEIFY_TEST_VAR") is None and getenv("ANYTIMEIFY_TEST_VAR", "d") == "d"
    for value in ("1", "", "café ünïcode", "0"):
        monkeypatch.setenv("ANYTIMEIFY_TEST_VAR", value)
        assert getenv("ANYTIMEIFY_TEST_VAR") == os.environ.get("ANYTIMEIFY_TEST_VAR") == value
    monkeypatch.setenv("ANYTIMEIFY_TUNE", "off")
    assert tune.tune_mode() == "off" and tune.active_table() is None
    monkeypatch.setenv("ANYTIMEIFY_TUNE", "cache")
    assert tune.tune_mode() == "cache" and tune.active_table() is not None
    monkeypatch.setenv("ANYTIMEIFY_NO_EXT", "1")
    assert tune.active_table() is None
