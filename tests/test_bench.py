"""The speed benchmarks' harness (anytimeify.bench): structure and counts, never timings."""
import pytest

import torch

from anytimeify.bench import PAPER_SKIPS, ca_speedup, fold_for_inference, layer_profile, profile_ops

SIZE = (64, 128)


def test_ca_speedup_reports_the_paper_counts():
    result = ca_speedup("hrnet_w18_small_v2", SIZE, reps=1, peers=["onnxruntime"])
    assert result["skips"] == pytest.approx(list(PAPER_SKIPS), abs=2e-3)
    # W18-Small-v2 RH at 64x128 is 1/256 of the 1024x2048 figures (the JSON rounds to 0.01 GFLOPs);
    # exit 1 is never masked
    assert 256 * result["anytime_paper_gflops"][0] == pytest.approx(23.69, abs=256 * 0.005)
    assert 256 * result["base_paper_gflops"] == pytest.approx(71.58, abs=256 * 0.005)
    assert result["anytime_paper_gflops"] == sorted(result["anytime_paper_gflops"])
    assert result["flops_speedup"] == pytest.approx(result["base_paper_gflops"] / result["anytime_paper_gflops"][-1],
                                                    rel=0.05)
    assert result["speedup"] == pytest.approx(result["dense_s"] / result["anytime_s"], rel=1e-2)
    assert result["speedup_vs_pytorch_dense"] == pytest.approx(result["dense_pytorch_s"] / result["anytime_s"],
                                                               rel=1e-2)
    assert result["realisation"] == pytest.approx(result["speedup"] / result["flops_speedup"], rel=1e-2)
    # the dense runtime users deploy ran beside it, and the best dense execution is the fastest one timed
    assert result["peers"]["onnxruntime"]["max_rel_diff"] < 1e-3 and "error" not in result["peers"]["onnxruntime"]
    timed = {"anytimeify_dense": result["dense_s"], "pytorch_dense": result["dense_pytorch_s"],
             "onnxruntime": result["onnxruntime_s"]}
    assert result["best_dense_runtime"] == min(timed, key=timed.get)
    assert result["best_dense_s"] == min(timed.values())
    assert result["speedup_vs_best_dense"] == pytest.approx(result["best_dense_s"] / result["anytime_s"], rel=1e-2)
    assert result["realisation_vs_best_dense"] == pytest.approx(
        result["speedup_vs_best_dense"] / result["flops_speedup"], rel=1e-2)
    exits = result["exits"]
    assert [e["exit"] for e in exits] == [1, 2, 3, 4]
    # (the GFLOPs in the JSON are rounded to 0.01, a few percent of these small counts)
    assert [e["flop_share"] for e in exits] == pytest.approx(
        [g / result["base_paper_gflops"] for g in result["anytime_paper_gflops"]], rel=0.05)
    assert exits[-1]["flop_share"] == pytest.approx(1 / result["flops_speedup"], abs=1e-3)
    assert [e["flop_share"] for e in exits] == sorted(e["flop_share"] for e in exits)
    assert all(e["fraction_of_best_dense"] == pytest.approx(e["elapsed_s"] / result["best_dense_s"], rel=2e-2, abs=1e-3)
               for e in exits)
    assert [e["elapsed_s"] for e in exits] == sorted(e["elapsed_s"] for e in exits)


def test_ca_speedup_reports_a_runtime_that_fails(monkeypatch):
    from anytimeify import peers

    def broken(*args):
        raise RuntimeError("no exporter for this op")

    monkeypatch.setattr(peers, "_export_onnx", broken)
    result = ca_speedup("hrnet_w18_small_v2", SIZE, reps=1, peers=["onnxruntime", "openvino"])
    for name in ("onnxruntime", "openvino"):
        assert result[f"{name}_s"] is None
        assert result["peers"][name]["error"] == "ONNX export failed: RuntimeError: no exporter for this op"
    assert result["best_dense_runtime"] in ("anytimeify_dense", "pytorch_dense")


def test_layer_profile_covers_every_stage():
    result = layer_profile("hrnet_w18_small_v2", SIZE, reps=1)
    stages = {row["stage"]: row for row in result["convs"]}
    for name in ("stem", "layer1", "stage2", "stage3", "stage4", "last_layer", "exit1", "exit2", "exit3"):
        assert name in stages
    assert stages["layer1"]["keep"] == 1.0 and stages["layer1"]["strategies"] == ["plain"]
    # masks nest: each stage keeps what the exit before it left
    assert stages["stage2"]["keep"] == pytest.approx(1 - PAPER_SKIPS[0], abs=0.02)
    assert stages["stage4"]["keep"] == pytest.approx(1 - PAPER_SKIPS[2], abs=0.02)
    allowed = {"plain", "zeros", "dense", "implicit", "implicit_rows", "gather"}
    assert all(set(row["strategies"]) <= allowed for row in result["convs"])
    assert stages["exit1"]["dense_s"] == 0.0 and stages["exit1"]["anytime_s"] > 0


def test_profile_names_the_compiled_kernels():
    from anytimeify.masking import _ext

    result = profile_ops("hrnet_w18_small_v2", SIZE, top=200)
    ops = {entry["op"] for entry in result["anytime"]["top_ops"]}
    if _ext.available():
        assert "anytimeify::implicit_conv" in ops and "anytimeify::halo_stencil" in ops
    dense_ops = {entry["op"] for entry in result["dense"]["top_ops"]}
    assert "aten::mkldnn_convolution" in dense_ops or "anytimeify::onednn_relu" in dense_ops
    for label in ("dense", "anytime"):  # the time outside the operators: wall-clock less their self time
        entry = result[label]
        assert entry["wall_s"] > 0  # (each figure rounded on its own)
        assert abs(entry["outside_ops_s"] - max(0.0, entry["wall_s"] - entry["total_s"])) <= 1.5e-3
        assert 0.0 <= entry["outside_ops_share"] < 1.0


def test_dense_baseline_gets_the_frozen_models_rewrites():
    """The dense reference runs BN-folded, with HRNet's fuse layers in one pass each, unchanged results."""
    from anytimeify.masking.engine import fuse_sum
    from anytimeify.models import create_model

    torch.manual_seed(0)
    base = create_model("hrnet_w18_small_v2").eval()
    dense = fold_for_inference(base)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in dense.modules())
    assert sum(node.target is fuse_sum for node in dense.graph.nodes) >= 4
    # every conv runs the engine's dense kernels, as the frozen anytime model's unmasked convs do
    from anytimeify.masking.conv import EngineConv2d

    convs = [m for m in dense.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(isinstance(m, EngineConv2d) for m in convs)
    # ReLUs that only read a conv are its activation now: none is left in the graph
    assert any(m.activation == "relu" for m in convs)
    # residual additions (and the ReLU after them) run inside the convs that feed them
    assert sum("residual" in n.kwargs for n in dense.graph.nodes if n.op == "call_module") >= 40
    assert not any(n.op == "call_module" and isinstance(dense.get_submodule(n.target), torch.nn.ReLU)
                   for n in dense.graph.nodes)
    plain = fold_for_inference(base, engine_convs=False)
    assert not any(isinstance(m, EngineConv2d) for m in plain.modules())
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        ref, got = base(x), dense(x.contiguous(memory_format=torch.channels_last))
    assert (got - ref).abs().max() <= 1e-4 * max(1.0, float(ref.abs().max()))


def test_stage_profile_sets_every_stage_beside_the_dense_runtimes():
    from anytimeify.bench import stage_profile

    result = stage_profile("hrnet_w18_small_v2", SIZE, reps=1, peers=("onnxruntime", "openvino"))
    rows = {row["stage"]: row for row in result["stages"]}
    for name in ("stem", "layer1", "transition1", "stage2", "stage3", "stage4", "last_layer",
                 "exit1", "exit2", "exit3", "masks"):
        assert name in rows, name
    # the stages' times add up to the whole run: every second is somewhere
    assert sum(row["anytime_s"] for row in rows.values()) == pytest.approx(result["anytime_total_s"], abs=2e-3)
    for peer in ("onnxruntime", "openvino"):
        assert "error" not in result["peers"][peer]
        assert sum(row[f"{peer}_s"] for row in rows.values()) == pytest.approx(result["peers"][peer]["profiled_s"],
                                                                            abs=2e-3)
        # the runtimes' nodes were found in the model's own stages, not left in "other"
        for name in ("stem", "layer1", "stage3", "stage4", "last_layer"):
            assert rows[name][f"{peer}_s"] > 0, (peer, name)
        assert rows["exit1"][f"{peer}_s"] == 0.0  # the dense model has no exits
    assert rows["layer1"]["keep"] == 1.0
    assert rows["stage4"]["keep"] == pytest.approx(1 - PAPER_SKIPS[2], abs=0.05)
    best = min(rows["stage3"]["onnxruntime_s"], rows["stage3"]["openvino_s"])
    assert rows["stage3"]["anytime_over_best"] == pytest.approx(rows["stage3"]["anytime_s"] / best, rel=0.02, abs=1e-3)
    assert rows["exit1"]["anytime_over_best"] is None


def test_onnx_nodes_map_to_the_modules_they_came_from(tmp_path):
    from anytimeify.peers import _export_onnx, _group, onnx_node_modules

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1))).eval()
    path = str(tmp_path / "m.onnx")
    _export_onnx(net, torch.randn(1, 3, 8, 8), path)
    modules = onnx_node_modules(path)
    head = lambda module: module.split(".")[0]  # noqa: E731
    groups = {_group(node, modules, head) for node in modules}
    assert {"2", "3"} <= groups and groups & {"0", "1"}  # the conv carries the BN it absorbed: "0" or "1"
    conv = next(node for node, module in modules.items() if module == "3.0")
    assert _group(conv + "/WithoutBiases", modules, head) == "3"  # a runtime's split node
    assert _group("reorder_in_" + conv, modules, head) == "3"  # a runtime's reorder named after its node
    assert _group("not_in_the_model", modules, head) == "other"
