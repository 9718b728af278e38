"""FLOP counts against the figures of the ADP-C reference implementation (REFERENCE.md §4)."""
import json

import pytest
import torch

import anytimeify
from anytimeify.cli import main
from anytimeify.models import hrnet_pose, hrnet_seg

# paper GFLOPs (MACs / 2^30) at 1x3x1024x2048, per exit, and parameters in millions
REFERENCE = {
    ("w48", "original"): ([48.44, 113.46, 388.88, 722.20], 66.07),
    ("w48", "redesigned"): ([41.92, 105.56, 368.03, 701.35], 66.06),
    ("w18_small_v2", "original"): ([31.44, 42.56, 59.53, 82.88], 4.03),
    ("w18_small_v2", "redesigned"): ([23.69, 34.74, 49.87, 73.23], 4.00),
}
BASE = {"w48": 696.2, "w18_small_v2": 71.6}


def _close(value, expected, rel=0.005):
    return abs(value - expected) <= rel * expected


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    return {v: hrnet_seg(v, num_classes=19).eval() for v in ("w48", "w18_small_v2")}


def test_counts_scale_exactly_with_area(nets):
    """Counting at 1/64 of the area and multiplying by 64 is exact: every map size divides evenly."""
    model = anytimeify.convert(nets["w18_small_v2"], head="redesigned")
    small = anytimeify.flops(model, (128, 256))
    large = anytimeify.flops(model, (1024, 2048))
    assert [64 * e.macs for e in small.exits] == [e.macs for e in large.exits]


@pytest.mark.parametrize("variant, head", sorted(REFERENCE))
def test_reproduces_reference_flops_and_params(nets, variant, head):
    expected, params_m = REFERENCE[(variant, head)]
    model = anytimeify.convert(nets[variant], head=head)
    report = anytimeify.flops(model, (128, 256))  # 1/64 of 1024x2048, exact (see above)
    got = [64 * e.paper_gflops for e in report.exits]
    assert all(_close(g, e) for g, e in zip(got, expected)), (got, expected)
    assert _close(report.params / 1e6, params_m, rel=0.01), report.params
    # gmacs and paper units describe the same count
    assert all(e.gmacs * 1e9 == pytest.approx(e.paper_gflops * 2 ** 30) for e in report.exits)


@pytest.mark.parametrize("variant", sorted(BASE))
def test_base_model_flops(nets, variant):
    report = anytimeify.flops(nets[variant], (128, 256))
    assert _close(64 * report.exits[-1].paper_gflops, BASE[variant])


def test_pose_w32_flops_and_params():
    net = hrnet_pose("w32", num_joints=16)
    report = anytimeify.flops(net, (256, 256))
    assert _close(report.exits[-1].paper_gflops, 9.49)
    assert _close(report.params / 1e6, 28.5, rel=0.01)


def test_flops_cli_json(capsys, tmp_path):
    out_file = tmp_path / "f.json"
    assert main(["flops", "hrnet_w18_small_v2", "--head", "redesigned", "--input", "256x512", "--json",
                 "--output", str(out_file)]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload == json.loads(out_file.read_text())
    assert payload["model"] == "hrnet_w18_small_v2"
    assert payload["input"] == [1, 3, 256, 512]
    assert [e["exit"] for e in payload["exits"]] == [1, 2, 3, 4]
    got = [16 * e["paper_gflops"] for e in payload["exits"]]
    assert all(_close(g, e) for g, e in zip(got, REFERENCE[("w18_small_v2", "redesigned")][0]))
    assert _close(16 * payload["base_paper_gflops"], 71.6)
    assert _close(payload["params"] / 1e6, 4.00, rel=0.01)


def test_flops_cli_rejects_bad_input(capsys):
    assert main(["flops", "hrnet_w18_small_v2", "--input", "250x500"]) == 2
    assert "multiples of 32" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["flops", "hrnet_w18_small_v2", "--input", "big"])
