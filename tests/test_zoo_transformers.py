"""Transformers, NHWC backbones and the rest of timm's zoo: what convert() does for them."""
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn as nn

import anytimeify
from anytimeify import Confidence, MaskedConv2d
from anytimeify._fx.adapters import MAX_EARLY_EXITS, select_stage_levels
from anytimeify._fx.boundary import Boundary
from anytimeify.bench import FixedMasks
from anytimeify.convert import _depth_cap
from anytimeify.masking.masks import copy_aggregate
from anytimeify.models import TimmSegmenter

timm = pytest.importorskip("timm")

CLASSES = 3


def _segmenter(name: str) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TimmSegmenter(name, CLASSES, width=8).eval()


def _sparse_equals_dense(net: nn.Module, x: torch.Tensor) -> None:
    masks = FixedMasks([0.2, 0.4, 0.6], seed=0, sigma=1.0)
    model = anytimeify.convert(net, input_size=tuple(x.shape[-2:]),
                               confidence=Confidence(criterion=masks, execution="dense")).eval()
    assert sum(isinstance(m, MaskedConv2d) for m in model.modules()) > 0
    with torch.no_grad():
        dense = list(model.anytime(x))
        model.set_execution("sparse")
        sparse = list(model.anytime(x))
    for s, d in zip(sparse, dense):
        err = (s.logits - d.logits).abs().max().item() / max(1.0, d.logits.abs().max().item())
        assert err <= 1e-4, err


def _blocks_called(segment) -> set:
    """Indices of the transformer blocks a segment of a converted TimmSegmenter calls."""
    return {int(str(n.target).split(".")[3]) for n in segment.module.graph.nodes
            if n.op == "call_module" and str(n.target).startswith("backbone.model.blocks.")}


def test_vision_transformer_segmenter_exits_at_quarters_of_its_depth():
    net = _segmenter("test_vit")  # 6 blocks, patch 16, native 160x160
    depth = len(net.backbone.model.blocks)
    # the head reads the blocks at 1/4, 1/2, 3/4 and the end of the depth (DPT's taps)
    assert net.backbone.feature_info.out_indices == tuple(depth * k // 4 - 1 for k in (1, 2, 3, 4))
    model = anytimeify.convert(net).eval()  # at the backbone's native size
    assert model.num_exits == 4
    # 160 / 16 = 10 tokens a side halve once: every redesigned head takes one down step
    assert [e["depth"] for e in model.exit_info[:-1]] == [1, 1, 1]
    assert [e["stride"] for e in model.exit_info[:-1]] == [16, 16, 16]
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outs = model(x)
        assert torch.equal(outs[-1], net(x))
        streamed = list(model.anytime(x))
    assert len(streamed) == 4
    # each exit runs before the blocks after its tap: segment k calls only blocks up to its tap
    taps = net.backbone.feature_info.out_indices
    for k, segment in enumerate(model.program.segments[:3]):
        called = _blocks_called(segment)
        assert called and max(called) == taps[k], (k, sorted(called))
    _sparse_equals_dense(net, x[:1])


def test_inspect_lists_a_transformers_maps_and_convert_takes_them_by_name():
    net = _segmenter("test_vit")
    found = anytimeify.inspect(net)
    picked = [c for c in found if c.picked]
    assert [c.kind for c in picked] == ["node"] * 3 and all(c.stride == 16 for c in picked)
    # no attention tensor (B, heads, N, d) is offered as a feature map, among the nodes either
    everything = anytimeify.inspect(net, nodes=True)
    assert len(everything) > len(found) and {c.name for c in found} <= {c.name for c in everything}
    for c in everything:
        assert 0.5 * 160 * 160 <= c.shapes[0][-1] * c.shapes[0][-2] * c.stride ** 2 <= 2 * 160 * 160, c
    model = anytimeify.convert(net, exits=[picked[0].name, picked[2].name]).eval()
    taps = net.backbone.feature_info.out_indices
    for k, segment in enumerate(model.program.segments[:2]):  # named by hand, they move up too
        called = _blocks_called(segment)
        assert max(called) == taps[2 * k]
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        assert torch.equal(model(x)[-1], net(x))


def test_nhwc_backbone_segmenter_reads_channels_first_maps():
    net = _segmenter("test_mambaout")  # stages return (B, H, W, C)
    assert net.nhwc_features
    model = anytimeify.convert(net).eval()
    assert model.num_exits == 4
    assert [e["channels"][0] for e in model.exit_info[:-1]] == net.backbone.feature_info.channels()[:3]
    x = torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(x)[-1], net(x))
    _sparse_equals_dense(net, x)


def test_vision_transformer_classifier_streams_and_predicts():
    torch.manual_seed(0)
    net = timm.create_model("test_vit", pretrained=False, num_classes=CLASSES).eval()
    model = anytimeify.convert(net, task="classification").eval()
    assert [e["name"] for e in model.exit_info[:-1]] == ["blocks.0", "blocks.2", "blocks.3"]
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert torch.equal(model(x)[-1], net(x))
        assert len(list(model.anytime(x))) == 4  # forward's attn_mask=None is bound, not an input
        prediction = model.predict(x, thresholds=[0.5, 0.5, 0.5])
    assert prediction.logits.shape == (2, CLASSES)


def test_hook_based_features_become_graph_nodes():
    net = _segmenter("pit_ti_224")  # timm collects PiT's features by forward hooks
    assert type(net.backbone).__name__ == "FeatureGraphNet"
    model = anytimeify.convert(net).eval()
    assert model.num_exits >= 2
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x)[-1], net(x))


class _Gate(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


class _Flip(nn.Module):
    def forward(self, x):
        return x if x.mean() < 1 else x * 2


class _TwoUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gates = nn.Sequential(_Gate(), _Gate())
        self.flip = _Flip()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.flip(self.gates(self.conv(x))))


def test_trace_error_names_every_failing_class_and_its_advice_works():
    with pytest.raises(anytimeify.TraceError) as caught:
        anytimeify.convert(_TwoUntraceable(), exits=["conv"], input_size=(16, 16))
    message = str(caught.value)
    assert message.startswith("torch.fx could not trace module 'gates.0' (_Gate)")
    assert "'flip' (_Flip)" in message and "With all of them opaque the model traces" in message
    # _Gate has two instances: the advice names the classes, which covers both
    advice = f"leaf_modules=[{_Gate.__module__}._Gate, {_Flip.__module__}._Flip]"
    assert advice in message
    model = anytimeify.convert(_TwoUntraceable(), exits=["conv"], input_size=(16, 16),
                               leaf_modules=[_Gate, _Flip]).eval()
    assert model.num_exits == 2


class _MadeConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        scale = torch.tensor([0.5, 1.0, 1.5, 2.0]).view(1, 4, 1, 1)  # a constant made in forward
        return self.head(self.stem(x) * scale)


def test_constants_made_in_forward_are_kept():
    net = _MadeConstant().eval()
    model = anytimeify.convert(net, exits=["stem"], input_size=(16, 16)).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x)[-1], net(x))
    assert not [k for k in model.state_dict() if "_tensor_constant" in k]


def test_many_levels_get_three_exits_spread_over_them():
    graph = torch.fx.Graph()
    node = graph.placeholder("x")
    levels = []
    for i in range(32):  # one node per level, like ConvMixer's 32 equal blocks
        node = graph.call_function(torch.relu, (node,))
        levels.append(Boundary(f"blocks.{i}", [node], [(1, 8, 14, 14)], 16.0))
    picked = select_stage_levels(levels)
    assert len(picked) == MAX_EARLY_EXITS == 3
    assert picked == ["blocks.7", "blocks.15", "blocks.23"]
    assert select_stage_levels(levels[:4]) == ["blocks.0", "blocks.1", "blocks.2"]


@pytest.mark.parametrize("stride, shape, sizes, cap", [
    (16.0, (1, 8, 14, 14), [(224, 224)], 1),  # ViT at 224: 14 tokens a side halve once
    (16.0, (1, 8, 16, 16), [(224, 224)], 1),  # converted at 256, native 224: both must work
    (4.0, (1, 8, 64, 128), [], 6),  # HRNet's stride-4 branch at 256x512: no limit in practice
    (8.5, (1, 8, 35, 35), [], 0),  # a valid-padding network: an original head
])
def test_redesigned_heads_halve_only_where_maps_do(stride, shape, sizes, cap):
    assert _depth_cap(Boundary("b", [object()], [shape], stride), sizes) == cap


def test_copy_aggregation_resizes_an_exit_a_row_off():
    previous = torch.zeros(1, 3, 32, 32)
    new = torch.ones(1, 3, 33, 33)
    computed = torch.zeros(1, 1, 33, 33, dtype=torch.bool)
    computed[..., :10] = True

    class Masks:
        def at(self, h, w, dtype):
            assert (h, w) == (33, 33)
            return computed

    out = copy_aggregate(previous, new, Masks())
    assert out.shape == new.shape
    assert torch.equal(out[..., :10], new[..., :10]) and torch.equal(out[..., 10:], torch.zeros(1, 3, 33, 23))


def test_nhwc_classifier_pools_its_stages_over_positions():
    torch.manual_seed(0)  # a small Swin: its stages output (B, H, W, C) maps, its head pools them itself
    net = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=CLASSES, embed_dim=24,
                            depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)).eval()
    model = anytimeify.convert(net, task="classification").eval()
    assert [e["name"] for e in model.exit_info[:-1]] == ["layers.0", "layers.1", "layers.2"]
    # each exit pools its stage over positions: its linear layer takes the stage's C features
    assert [e.linear.in_features for e in model.exits] == [24, 48, 96]
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x)[-1], net(x))
        outs = list(model.anytime(x))
    assert len(outs) == 4 and all(o.logits.shape == (2, CLASSES) for o in outs)


class _Lister(nn.Module):
    def forward(self, x):
        return [x, x * 2] if x.sum() > 0 else [x, x]


class _ReadsTheList(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.lister = _Lister()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        total = 0
        for y in self.lister(self.conv(x)):  # iterates what the submodule returns
            total = total + y
        return self.head(total)


def test_trace_error_blames_the_module_when_keeping_it_opaque_cannot_help():
    with pytest.raises(anytimeify.TraceError) as caught:
        anytimeify.convert(_ReadsTheList(), exits=["conv"], input_size=(16, 16))
    message = str(caught.value)
    assert message.startswith("torch.fx could not trace module 'lister' (_Lister)")
    assert "Keeping it opaque does not help: _ReadsTheList's own forward then fails" in message
    assert "Remedy: make _Lister traceable" in message


def test_exits_are_made_in_the_base_models_dtype():
    net = _MadeConstant().double().eval()
    model = anytimeify.convert(net, exits=["stem"], input_size=(16, 16)).eval()
    assert all(p.dtype == torch.float64 for p in model.exits.parameters())
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        outs = model(x)
    assert all(o.dtype == torch.float64 for o in outs) and torch.equal(outs[-1], net(x))


class _OptionalMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x, mask=None, scale: float = 2.0):
        y = self.stem(x)
        if mask is not None:  # Hiera's masked pre-training path: not taken when called as model(x)
            y = y.view(mask.shape[0], -1) * 0
        return self.head(y * scale)


def test_forward_parameters_with_constant_defaults_are_traced_at_those_values():
    net = _OptionalMask().eval()
    model = anytimeify.convert(net, exits=["stem"], input_size=(16, 16)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x)[-1], net(x))
        assert len(list(model.anytime(x))) == 2


class _PixelTokens(nn.Module):
    """A stage that also returns a tensor with one row per patch, not per image (TNT's pixel tokens)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        b, c, h, w = x.shape
        pixels = x.permute(0, 2, 3, 1).reshape(b * h * w, 1, c)
        return x + 1, self.proj(pixels)


class _TwoKinds(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.stage = _PixelTokens()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y, pixels = self.stage(self.stem(x))
        return self.head(y.mean(dim=(2, 3)) + pixels.reshape(x.shape[0], -1, 4).mean(dim=1))


def test_a_boundary_keeps_only_tensors_with_one_entry_per_image():
    net = _TwoKinds().eval()
    model = anytimeify.convert(net, exits=["stage"], task="classification", input_size=(8, 8)).eval()
    assert model.exit_info[0]["channels"] == [4]  # the (B, C, H, W) map, not the (B*H*W, 1, C) rows
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x)[-1], net(x))
        assert [o.logits.shape for o in model.anytime(x)] == [(3, 2), (3, 2)]


def test_timms_norm_act_layers_are_traced_through_and_fold():
    # timm lists BatchNormAct2d as untraceable for its own feature extraction; it traces, and as a
    # leaf its batch norm would not fold into the conv at freeze()
    net = _segmenter("regnetx_002")
    assert any(type(m).__name__ == "BatchNormAct2d" for m in net.modules())
    model = anytimeify.convert(net, input_size=(64, 64)).eval()
    frozen = model.freeze()
    left = [n.target for seg in frozen.program.segments for n in seg.module.graph.nodes
            if n.op == "call_module" and isinstance(frozen.get_submodule(n.target), nn.BatchNorm2d)]
    assert left == []
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        err = (frozen(x)[-1] - net(x)).abs().max().item() / max(1.0, net(x).abs().max().item())
    assert err < 1e-4


def test_a_model_whose_levels_share_one_module_is_told_it_has_no_early_exit():
    # CoaT's feature_info names its parallel blocks for every level: one boundary, the output;
    # convert says so, with the way out, instead of handing back a model without early exits
    net = TimmSegmenter("coat_tiny", 3, width=16).eval()
    with pytest.warns(UserWarning, match=r"no early exit.*exits=\[\.\.\.\].*inspect\(model, nodes=True\)"):
        model = anytimeify.convert(net, exits="stages", input_size=(224, 224))
    assert model.num_exits == 1


class _Stage(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
        self.mix = nn.Conv2d(cout, cout, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return torch.relu(self.mix(y)).flatten(2).transpose(1, 2), y.shape[-2:]  # tokens and their grid, as MViTv2


class _MisnamedLevels(nn.Module):
    """timm-like: feature_info names modules the model does not have (MViTv2's and Twins' ``block.0``),
    stages return tokens, forward_intermediates the maps."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.stages = nn.ModuleList(_Stage(8 * 2 ** i, 8 * 2 ** (i + 1)) for i in range(4))
        self.feature_info = [dict(module=f"block.{i}", reduction=2 ** (i + 2), num_chs=8 * 2 ** (i + 1))
                             for i in range(4)]
        self.head = nn.Linear(128, 5)

    def _run(self, x):
        x = self.stem(x)
        maps = []
        for stage in self.stages:
            tokens, (h, w) = stage(x)
            x = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
            maps.append(x)
        return tokens, maps

    def forward_intermediates(self, x, indices=None, intermediates_only=False):
        tokens, maps = self._run(x)
        return maps if intermediates_only else (tokens, maps)

    def forward(self, x):
        return self.head(self._run(x)[0].mean(dim=1))


def test_levels_feature_info_misnames_are_found_by_value():
    net = _MisnamedLevels().eval()
    model = anytimeify.convert(net, task="classification", input_size=(64, 64)).eval()
    # the maps forward_intermediates returns are made in forward too: one exit after each stage but the last
    assert model.num_exits == 4
    assert [e["channels"] for e in model.exit_info[:-1]] == [[16], [32], [64]]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x)[-1], net(x))
        assert len(list(model.anytime(x))) == 4


class _RankChecks(nn.Module):
    """Branches on ranks: of the input (an input check, as Gemma 4's encoder) and of an
    intermediate tensor (a layout switch)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.b = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.c = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        if x.ndim != 4:
            raise ValueError("images only")
        y = self.a(x)
        if y.dim() == 3:  # never: y is a map
            y = y.unsqueeze(0)
        return self.c(torch.relu(self.b(torch.relu(y))))


def test_code_branching_on_a_tensors_rank_traces():
    net = _RankChecks().eval()
    model = anytimeify.convert(net, exits=["a"], input_size=(32, 32)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x)[-1], net(x))
    # the ranks were decided while tracing: no node asks for them
    code = "\n".join(seg.module.code for seg in model.program.segments)
    assert "ndim" not in code and ".dim()" not in code


class _HeadsInBatch(nn.Module):
    """A conv on a map whose batch holds two entries per image (heads folded in, as MViTv2's
    attention pooling), after the first stage."""

    def __init__(self):
        super().__init__()
        self.stage1 = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.pool = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        y = self.stage1(x)
        b, c, h, w = y.shape
        z = self.pool(y.reshape(b * 2, c // 2, h, w)).reshape(b, c, h, w)
        return self.head(z)


def test_convs_on_other_than_one_entry_per_image_are_not_masked():
    net = _HeadsInBatch().eval()
    with pytest.warns(UserWarning, match=r"cannot mask the convolutions \['pool'\].*one entry per image"):
        model = anytimeify.convert(net, exits=["stage1"], input_size=(32, 32), confidence=Confidence(
            criterion=FixedMasks([0.5], seed=0, sigma=1.0), execution="dense")).eval()
    assert type(model.get_submodule("pool")) is nn.Conv2d and isinstance(model.get_submodule("head"), MaskedConv2d)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        dense = list(model.anytime(x))
        model.set_execution("sparse")
        sparse = list(model.anytime(x))
    for s, d in zip(sparse, dense):
        assert torch.allclose(s.logits, d.logits, rtol=1e-4, atol=1e-5)


class _SizeDriven(nn.Module):
    """Builds a validity mask and a grid from its input's size and branches on them (as Gemma 4's
    encoder does for images, all of whose patches are valid)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.c = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        b, _, h, w = x.shape
        padding = ~torch.ones(b, h * w, dtype=torch.bool, device=x.device)
        y = self.a(x)
        if padding.any():  # never for an image
            y = y.masked_fill(padding[:, :1, None, None], 0.0)
        rows = int(torch.arange(h, device=x.device).max().item()) + 1  # the input's height
        return self.c(y) * (rows / 32)


def test_conditions_and_numbers_decided_by_the_input_size_trace_with_a_check():
    net = _SizeDriven().eval()
    model = anytimeify.convert(net, exits=["a"], input_size=(32, 32)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x)[-1], net(x))
        # the height is part of the graph as the probe's number: another one is refused, not misread
        with pytest.raises(AssertionError, match=r"decided by the input's size.*convert the model at this size"):
            model(torch.randn(1, 3, 64, 64))
    code = "\n".join(seg.module.code for seg in model.program.segments)
    assert "_comes_out" in code and "_assert" in code


class _ValueDriven(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=4, padding=1)

    def forward(self, x):
        y = self.a(x)
        return y if y.mean() > 0 else -y


def test_a_condition_on_the_inputs_values_still_refuses_to_trace():
    with pytest.raises(anytimeify.TraceError, match="control flow"):
        anytimeify.convert(_ValueDriven().eval(), exits=["a"], input_size=(32, 32))
