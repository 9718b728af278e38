"""The conversion pass, the anytime generator and the converted model's contract."""
import copy

import pytest
import torch
import torch.nn as nn

import anytimeify
from anytimeify.exits import Exit
from anytimeify.models import hrnet_pose, hrnet_seg


@pytest.mark.parametrize("fixture", ["w18_rh", "w18_ee"])
def test_split_execution_equals_unsplit(fixture, image, request):
    model = request.getfixturevalue(fixture)
    with torch.no_grad():
        whole = model(image)
        streamed = [out.logits for out in model.anytime(image)]
    assert len(whole) == len(streamed) == 4
    for a, b in zip(whole, streamed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fixture", ["w18_rh", "w18_ee"])
def test_last_exit_equals_base_model(fixture, w18, image, request):
    model = request.getfixturevalue(fixture)
    with torch.no_grad():
        assert torch.equal(model(image)[-1], w18(image))


def test_exits_at_hrnet_stage_boundaries(w18_rh):
    assert [e["name"] for e in w18_rh.exit_info] == ["layer1", "stage2", "stage3", "output"]
    # W18-Small-v2 exit input channels (REFERENCE.md §2): 256 / 54 / 126
    assert [sum(e["channels"]) for e in w18_rh.exit_info[:3]] == [256, 54, 126]
    assert [e["depth"] for e in w18_rh.exit_info[:3]] == [3, 2, 1]
    for exit_module, depth in zip(w18_rh.exits, (3, 2, 1)):
        pools = [m for m in exit_module if isinstance(m, nn.AvgPool2d)]
        assert len(pools) == depth
        assert exit_module[1].out_channels == 64  # default width for W18


def test_exit_outputs_at_quarter_resolution(w18_rh, image):
    with torch.no_grad():
        for out in w18_rh.anytime(image):
            assert out.logits.shape == (2, 5, 16, 24)


def test_every_parameter_gets_a_gradient(w18):
    model = anytimeify.convert(w18, head="redesigned").train()
    x = torch.randn(2, 3, 64, 64)
    loss = sum(o.square().mean() for o in model(x))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


def test_train_mode_matches_base_in_train_mode(w18):
    base = copy.deepcopy(w18).train()
    model = anytimeify.convert(base, head="original").train()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)[-1]
    ref = base(x)
    assert torch.equal(out, ref)
    # BN statistics moved identically in both
    assert torch.equal(model.state_dict()["bn1.running_mean"], base.state_dict()["bn1.running_mean"])
    with torch.no_grad():
        model.eval()
        base.eval()
        assert torch.equal(model(x)[-1], base(x))


def test_stopping_the_generator_skips_later_segments(w18):
    model = anytimeify.convert(w18).eval()
    calls = {"stage3": 0, "stage4": 0, "last_layer": 0, "exit3": 0}
    model.stage3[0].branches[0][0].conv1.register_forward_hook(lambda *a: calls.__setitem__("stage3", calls["stage3"] + 1))
    model.stage4[0].branches[0][0].conv1.register_forward_hook(lambda *a: calls.__setitem__("stage4", calls["stage4"] + 1))
    model.last_layer[0].register_forward_hook(lambda *a: calls.__setitem__("last_layer", calls["last_layer"] + 1))
    model.exits[2].register_forward_hook(lambda *a: calls.__setitem__("exit3", calls["exit3"] + 1))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        gen = model.anytime(x)
        first = next(gen)
        second = next(gen)
        gen.close()
    assert (first.index, second.index) == (1, 2)
    assert calls == {"stage3": 0, "stage4": 0, "last_layer": 0, "exit3": 0}
    with torch.no_grad():
        list(model.anytime(x))
    assert calls == {"stage3": 1, "stage4": 1, "last_layer": 1, "exit3": 1}


def test_nothing_runs_before_the_first_request(w18_rh):
    calls = []
    handle = w18_rh.conv1.register_forward_hook(lambda *a: calls.append(1))
    try:
        gen = w18_rh.anytime(torch.randn(1, 3, 64, 64))
        assert calls == []
        next(gen)
        assert calls == [1]
    finally:
        handle.remove()


def test_exit_output_fields(w18_rh, image):
    with torch.no_grad():
        outs = list(w18_rh.anytime(image))
    assert [o.index for o in outs] == [1, 2, 3, 4]
    assert all(b.macs > a.macs for a, b in zip(outs, outs[1:]))
    assert all(b.elapsed >= a.elapsed for a, b in zip(outs, outs[1:]))
    assert all(o.mask is None and o.skipped == 0.0 for o in outs)
    # the MACs the generator reports are the fvcore counts
    report = anytimeify.flops(w18_rh, image)
    assert [o.macs for o in outs] == [e.macs for e in report.exits]


def test_interleaved_generators_and_changing_sizes(w18_rh):
    a = torch.randn(1, 3, 64, 64)
    b = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        ref_a = [o.logits for o in w18_rh.anytime(a)]
        ref_b = [o.logits for o in w18_rh.anytime(b)]
        ga, gb = w18_rh.anytime(a), w18_rh.anytime(b)
        got_a, got_b = [], []
        for oa, ob in zip(ga, gb):
            got_a.append(oa.logits)
            got_b.append(ob.logits)
        again_b = [o.logits for o in w18_rh.anytime(b)]
    for r, g in zip(ref_a, got_a):
        assert torch.equal(r, g)
    for r, g, g2 in zip(ref_b, got_b, again_b):
        assert torch.equal(r, g) and torch.equal(r, g2)


def test_base_checkpoint_loads_unchanged(w18, w18_rh):
    own = w18_rh.state_dict()
    base = w18.state_dict()
    assert set(base) <= set(own)
    assert all(k.startswith("exits.") for k in set(own) - set(base))
    fresh = anytimeify.convert(hrnet_seg("w18_small_v2", num_classes=5))
    result = fresh.load_state_dict(base, strict=False)
    assert result.unexpected_keys == []
    assert all(k.startswith("exits.") for k in result.missing_keys)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x)[-1], w18(x))


def test_convert_leaves_the_input_model_alone(w18):
    before = {k: v.clone() for k, v in w18.state_dict().items()}
    model = anytimeify.convert(w18)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in w18.state_dict().items())
    assert not hasattr(w18, "exits")


@pytest.mark.parametrize("bad, match", [
    (torch.randn(1, 3, 64, 70), "multiples of 32"),
    (torch.randn(1, 3, 48, 64), "multiples of 32"),
    (torch.randn(1, 4, 64, 64), r"\(B, 3, H, W\)"),
    (torch.randn(3, 64, 64), r"\(B, 3, H, W\)"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.long), "floating-point"),
])
def test_bad_input_gets_a_clear_error(w18_rh, bad, match):
    with pytest.raises(ValueError, match=match):
        w18_rh(bad)
    with pytest.raises(ValueError, match=match):
        next(w18_rh.anytime(bad))


def test_error_suggests_a_valid_size(w18_rh):
    with pytest.raises(ValueError, match="e.g. to 64x96"):
        w18_rh(torch.randn(1, 3, 50, 70))


def test_explicit_exit_names(w18):
    model = anytimeify.convert(w18, exits=["stage2", "stage3"], head="redesigned")
    assert model.num_exits == 3
    assert [e["depth"] for e in model.exit_info[:2]] == [2, 1]
    node = next(c.name for c in anytimeify.inspect(w18, nodes=True) if c.kind == "node" and c.name.startswith("layer1"))
    single = anytimeify.convert(w18, exits=[node])
    assert single.num_exits == 2
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(single(x)[-1], w18(x))


def test_unknown_exit_name_lists_valid_ones(w18):
    with pytest.raises(ValueError, match=r"'stage9' is not a stage boundary.*layer1.*stage2.*anytimeify.inspect"):
        anytimeify.convert(w18, exits=["stage9"])
    with pytest.raises(ValueError, match="exits must be 'stages'"):
        anytimeify.convert(w18, exits="blocks")
    with pytest.raises(ValueError, match="head must be one of"):
        anytimeify.convert(w18, head="fancy")


def test_inspect_marks_the_stages(w18):
    found = anytimeify.inspect(w18)
    picked = [c.name for c in found if c.picked]
    assert picked == ["layer1", "stage2", "stage3"]
    stage3 = next(c for c in found if c.name == "stage3")
    assert stage3.channels == [18, 36, 72]
    assert stage3.stride == 4
    names = {c.name for c in found}
    # every listed module name is accepted by convert
    assert {"layer1", "stage2", "stage3", "stage4"} <= names


def test_untraceable_model_gets_an_error_naming_the_module():
    class Gate(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return x
            return -x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.gate = Gate()
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.head(self.gate(self.conv(x)))

    with pytest.raises(anytimeify.TraceError, match=r"(?s)'gate' \(Gate\).*x.sum\(\) > 0.*leaf_modules=\['gate'\]"):
        anytimeify.convert(Net(), exits=["conv"])
    model = anytimeify.convert(Net(), exits=["conv"], leaf_modules=["gate"])
    assert model.num_exits == 2


def test_pose_network_converts():
    net = hrnet_pose("w32", num_joints=16).eval()
    model = anytimeify.convert(net, input_size=(64, 64)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outs = model(x)
        assert torch.equal(outs[-1], net(x))
    assert [o.shape for o in outs] == [(1, 16, 16, 16)] * 4
    assert isinstance(model.exits[0], Exit)


def test_shapes_are_propagated_on_the_meta_device_and_equal_a_real_probe(w18):
    """convert records every node's shape without computing the probe (meta tensors) where the
    model allows, and the shapes equal those of a real forward."""
    from torch.fx.passes.shape_prop import ShapeProp

    from anytimeify.convert import _mode_graphs, _propagate_on_meta

    gm = _mode_graphs(w18, [], [])[False]
    assert _propagate_on_meta(gm, (1, 3, 64, 96), torch.float32)
    meta = {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes if "tensor_meta" in n.meta}
    assert next(gm.parameters()).device.type == "cpu"  # the module keeps its real weights
    with torch.no_grad():
        ShapeProp(gm).propagate(torch.randn(1, 3, 64, 96))
    real = {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes if "tensor_meta" in n.meta}
    assert meta == real and len(real) > 100


class _DataDependent(torch.nn.Module):
    """A network with an operation whose output shape depends on values (``nonzero``): meta
    tensors have no values, so its shapes come from a real probe."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.layer1 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.layer2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.layer2(self.layer1(self.stem(x)))
        return self.head(y) + torch.nonzero(y > 1e9).sum()  # adds zero


def test_a_model_whose_shapes_depend_on_values_falls_back_to_a_real_probe():
    from anytimeify.convert import _propagate_on_meta

    model = _DataDependent().eval()
    traced = torch.fx.symbolic_trace(model)
    assert not _propagate_on_meta(traced, (1, 3, 32, 32), torch.float32)
    assert all("tensor_meta" not in n.meta for n in traced.graph.nodes)
    converted = anytimeify.convert(model, exits=["layer1"], head="original", input_size=(32, 32)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(converted(x)[-1], model(x))


def test_shape_propagation_draws_the_probe_from_the_global_generator(w18):
    """The exits' initial weights after torch.manual_seed stay what they were when the probe always
    ran for real: the probe is still drawn, whichever way the shapes are found."""
    from anytimeify.convert import _mode_graphs, _propagate_shapes

    gm = _mode_graphs(w18, [], [])[False]
    torch.manual_seed(5)
    _propagate_shapes(w18, gm, (1, 3, 64, 96))
    after = torch.rand(4)
    torch.manual_seed(5)
    torch.randn(1, 3, 64, 96)
    assert torch.equal(after, torch.rand(4))
