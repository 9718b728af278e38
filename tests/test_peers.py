"""The dense runtimes the benchmarks compare with (anytimeify.peers): built, checked, failures reported."""
import pytest
import torch
import torch.nn as nn

from anytimeify import peers
from anytimeify.cli import PEER_NAMES, parse_peers


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 4, 3, stride=2, padding=1)).eval()


def test_cli_names_the_same_runtimes():
    assert PEER_NAMES == peers.PEERS
    assert parse_peers("openvino,onnxruntime,openvino") == ["openvino", "onnxruntime"]
    assert parse_peers("none") == []
    with pytest.raises(Exception, match="tensorrt"):
        parse_peers("onnxruntime,tensorrt")


def test_onnxruntime_and_openvino_run_the_model_as_eager_does():
    net, x = _net(), torch.randn(1, 3, 32, 48)
    ort, ov = peers.prepare_peers(net, x, threads=1, names=["onnxruntime", "openvino"])
    with torch.no_grad():
        ref = net(x)
    for peer in (ort, ov):
        assert peer.ok, peer.error
        assert peer.max_rel_diff is not None and peer.max_rel_diff < 1e-4
        got = torch.as_tensor(peers._first_tensor(peer.run(x + 1.0)))
        with torch.no_grad():
            assert torch.allclose(got, net(x + 1.0), rtol=1e-4, atol=1e-4)  # a new input, not a cached answer
        assert "error" not in peer.summary() and peer.summary()["version"]


def test_a_runtime_that_is_not_installed_is_reported(monkeypatch):
    monkeypatch.setattr(peers, "peer_versions", lambda: {"onnxruntime": None, "openvino": None, "torch_compile": "x"})
    ort, = peers.prepare_peers(_net(), torch.randn(1, 3, 16, 16), threads=1, names=["onnxruntime"])
    assert not ort.ok and "not installed" in ort.error and "anytimeify[bench]" in ort.error


def test_a_failed_export_is_reported_for_every_runtime_that_needs_it(monkeypatch):
    def broken(*args):
        raise RuntimeError("unsupported operator aten::weird")

    monkeypatch.setattr(peers, "_export_onnx", broken)
    ort, ov = peers.prepare_peers(_net(), torch.randn(1, 3, 16, 16), threads=1, names=["onnxruntime", "openvino"])
    for peer in (ort, ov):
        assert not peer.ok and peer.error.startswith("ONNX export failed") and "aten::weird" in peer.error
        assert peer.summary()["error"] == peer.error


def test_a_runtime_with_a_different_answer_is_not_timed(monkeypatch):
    monkeypatch.setattr(peers, "_onnxruntime", lambda path, threads: (lambda x: [torch.zeros(1, 4, 8, 8).numpy()]))
    ort, = peers.prepare_peers(_net(), torch.randn(1, 3, 16, 16) + 3, threads=1, names=["onnxruntime"])
    assert not ort.ok and "differs from eager" in ort.error and ort.max_rel_diff > 1e-3


def test_a_runtime_that_fails_to_run_is_reported(monkeypatch):
    def fails(path, threads):
        raise MemoryError("arena exhausted")

    monkeypatch.setattr(peers, "_openvino", fails)
    ov, = peers.prepare_peers(_net(), torch.randn(1, 3, 16, 16), threads=1, names=["openvino"])
    assert not ov.ok and ov.error == "failed: MemoryError: arena exhausted"


def test_unknown_runtime_is_refused():
    with pytest.raises(ValueError, match="tensorrt"):
        peers.prepare_peers(_net(), torch.randn(1, 3, 16, 16), threads=1, names=["tensorrt"])


@pytest.mark.slow
def test_torch_compile_runs_the_model_as_eager_does():
    net, x = _net(), torch.randn(1, 3, 32, 48)
    tc, = peers.prepare_peers(net, x, threads=1, names=["torch_compile"])
    assert tc.ok, tc.error
    with torch.no_grad():
        assert torch.allclose(torch.as_tensor(tc.run(x - 1.0)), net(x - 1.0), rtol=1e-4, atol=1e-4)


def test_bench_prints_the_runtimes_their_failures_and_every_exit(monkeypatch, capsys):
    import anytimeify.bench
    from anytimeify import cli

    seen = {}

    def fake(name, size, skips, reps, threads, seed, base, peers):
        seen["peers"] = peers
        return {"skips": [0.2, 0.4, 0.6], "machine": {"cpu": "Test CPU 9000"}, "eager_s": 2.0, "dense_s": 1.2,
                "dense_pytorch_s": 1.5, "onnxruntime_s": 1.0, "openvino_s": None, "anytime_s": 0.8,
                "peers": {"onnxruntime": {"version": "1"}, "openvino": {"error": "not installed (pip install x)"}},
                "best_dense_s": 1.0, "best_dense_runtime": "onnxruntime", "flops_speedup": 1.5,
                "speedup_vs_best_dense": 1.25, "realisation_vs_best_dense": 0.8333,
                "exits": [{"exit": 1, "fraction_of_best_dense": 0.31, "flop_share": 0.3},
                          {"exit": 2, "fraction_of_best_dense": 0.8, "flop_share": 0.67}]}

    monkeypatch.setattr(anytimeify.bench, "ca_speedup", fake)
    monkeypatch.setattr(cli, "base_from_args", lambda args: None)
    monkeypatch.setenv("COLUMNS", "120")
    assert cli.main(["bench", "hrnet_w18_small_v2", "--input", "64x128", "--reps", "1",
                     "--peers", "onnxruntime,openvino"]) == 0
    out = capsys.readouterr().out
    assert seen["peers"] == ["onnxruntime", "openvino"]
    assert "onnxruntime (best dense)" in out and "1.25x" in out  # 1.0 s / 0.8 s
    assert "not installed (pip install x)" in out
    assert "Test CPU 9000" in out and "realisation 0.83" in out
    assert "0.31" in out and "0.67" in out


def test_bench_layers_prints_each_stage_beside_the_runtimes(monkeypatch, capsys):
    import anytimeify.bench
    from anytimeify import cli

    seen = {}

    def fake(name, size, skips, threads, seed, reps, peers, base):
        seen["peers"] = peers
        return {"machine": {"cpu": "Test CPU 9000"}, "anytime_total_s": 0.5,
                "peers": {"onnxruntime": {"profiled_s": 0.7}, "openvino": {"error": "profiling failed: X"}},
                "stages": [{"stage": "stage4", "keep": 0.37, "anytime_s": 0.123, "onnxruntime_s": 0.2,
                            "anytime_over_best": 0.6},
                           {"stage": "exit1", "keep": 1.0, "anytime_s": 0.01, "onnxruntime_s": 0.0,
                            "anytime_over_best": None}]}

    monkeypatch.setattr(anytimeify.bench, "stage_profile", fake)
    monkeypatch.setattr(cli, "base_from_args", lambda args: None)
    assert cli.main(["bench", "hrnet_w18_small_v2", "--input", "64x128", "--layers"]) == 0
    out = capsys.readouterr().out
    assert seen["peers"] == ["onnxruntime", "openvino"]  # torch.compile has no per-node profile
    assert "stage4" in out and "0.1230" in out and "0.60" in out
    assert "openvino: profiling failed: X" in " ".join(out.split())
