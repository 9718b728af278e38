"""Any dense network: timm backbones and smp segmenters convert with ``exits="stages"``."""
import copy
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn as nn

import anytimeify
from anytimeify import Confidence, MaskedConv2d
from anytimeify._fx.stages import spatial_divisor
from anytimeify.bench import FixedMasks
from anytimeify.models import TimmSegmenter

smp = pytest.importorskip("segmentation_models_pytorch")

SIZE = 64
CLASSES = 3

# timm family -> (model name, extra timm kwargs); the smallest variant of each family
TIMM_BACKBONES = {
    "resnet": ("resnet18", {}),
    "resnext": ("resnext26ts", {}),
    "efficientnet": ("efficientnet_b0", {}),
    "mobilenetv3": ("mobilenetv3_small_050", {}),
    "convnext": ("convnext_atto", {}),
    "regnet": ("regnetx_002", {}),
    "densenet": ("densenet121", {"growth_rate": 8, "block_config": (2, 2, 2, 2)}),
    "dla": ("dla46_c", {}),
    "hrnet": ("hrnet_w18_small", {"feature_location": ""}),
}

# smp architecture -> two encoders (smp's own and timm's universal encoder where both work)
SMP_MODELS = [
    ("Unet", "resnet18"), ("Unet", "tu-mobilenetv3_small_050"),
    ("UnetPlusPlus", "resnet18"), ("UnetPlusPlus", "mobilenet_v2"),
    ("FPN", "resnet18"), ("FPN", "efficientnet-b0"),
    ("DeepLabV3Plus", "resnet18"), ("DeepLabV3Plus", "tu-mobilenetv3_small_050"),
    ("PSPNet", "resnet18"), ("PSPNet", "mobilenet_v2"),
    ("Linknet", "resnet18"), ("Linknet", "tu-mobilenetv3_small_050"),
    ("UPerNet", "resnet18"), ("UPerNet", "tu-convnext_atto"),
    ("Segformer", "resnet18"), ("Segformer", "tu-mobilenetv3_small_050"),
]
#: smp architectures whose decoder torch.fx cannot trace (Linknet's branches on its skips' channel
#: counts and Segformer's iterates a shape: both trace now, and their convs are masked)
UNTRACEABLE_DECODERS: set = set()


def _timm_net(family: str) -> nn.Module:
    name, kwargs = TIMM_BACKBONES[family]
    torch.manual_seed(0)
    return TimmSegmenter(name, CLASSES, width=16, **kwargs).eval()


def _smp_net(arch: str, encoder: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(smp, arch)(encoder_name=encoder, encoder_weights=None, classes=CLASSES).eval()


def _check_converted(net: nn.Module, **convert_kwargs) -> anytimeify.AnytimeModel:
    """The contract every converted zoo model keeps; returns the converted model."""
    model = anytimeify.convert(net, exits="stages", input_size=(SIZE, SIZE), **convert_kwargs).eval()
    assert model.num_exits >= 2
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model(x)
        streamed = [out.logits for out in model.anytime(x)]
        reference = net(x)
    assert len(whole) == len(streamed) == model.num_exits
    for a, b in zip(whole, streamed):
        assert torch.equal(a, b)
    assert torch.equal(whole[-1], reference)
    # every exit at the resolution of the model's own output, so masks and copy aggregation line up
    assert all(o.shape == reference.shape for o in whole)
    cumulative = [e.macs for e in anytimeify.flops(model, x[:1]).exits]
    assert all(b > a for a, b in zip(cumulative, cumulative[1:])), cumulative
    _check_confidence(net, x, **convert_kwargs)
    return model


def _check_confidence(net: nn.Module, x: torch.Tensor, **convert_kwargs) -> None:
    """With confidence adaptivity (decoders included), sparse execution equals dense execution."""
    masks = FixedMasks([0.2, 0.4, 0.6], seed=0, sigma=1.0)
    model = anytimeify.convert(net, exits="stages", input_size=(SIZE, SIZE),
                               confidence=Confidence(criterion=masks, execution="dense"), **convert_kwargs).eval()
    assert sum(isinstance(m, MaskedConv2d) for m in model.modules()) > 0
    with torch.no_grad():
        dense = [o for o in model.anytime(x)]
        model.set_execution("sparse")
        sparse = [o for o in model.anytime(x)]
    assert [round(o.skipped, 1) for o in sparse[:-1]] == [0.2, 0.4, 0.6][: len(sparse) - 1]
    for s, d in zip(sparse, dense):
        err = (s.logits - d.logits).abs().max().item() / max(1.0, d.logits.abs().max().item())
        assert err <= 1e-4, err
    assert sparse[-1].macs < dense[-1].macs


@pytest.mark.parametrize("family", sorted(TIMM_BACKBONES))
def test_timm_backbone_converts(family):
    net = _timm_net(family)
    model = _check_converted(net)
    names = [e["name"] for e in model.exit_info[:-1]]
    assert len(names) == 3 and all(n.startswith("backbone.") for n in names)
    strides = [e["stride"] for e in model.exit_info[:-1]]
    if family == "hrnet":  # every HRNet stage keeps its stride-4 branch
        assert names == ["backbone.layer1", "backbone.stage2", "backbone.stage3"]
        assert strides == [4, 4, 4]
    else:  # one exit per reduction level, the deepest feeds the model's own head
        assert strides == [4, 8, 16]
    # the redesigned head pools D = N - i times relative to its exit's input
    assert [e["depth"] for e in model.exit_info[:-1]] == [3, 2, 1]


@pytest.mark.parametrize("arch, encoder", SMP_MODELS, ids=[f"{a}-{e}" for a, e in SMP_MODELS])
def test_smp_model_converts(arch, encoder):
    net = _smp_net(arch, encoder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = _check_converted(net)
    decoder_leaf = [w for w in caught if f"the decoder of {arch} cannot be traced" in str(w.message)]
    assert bool(decoder_leaf) == (arch in UNTRACEABLE_DECODERS)
    names = [e["name"] for e in model.exit_info[:-1]]
    assert all(n.startswith("encoder.") for n in names), names
    # the base model's input-shape check is back in place after tracing
    assert "requires_divisible_input_shape" not in vars(net)


class _ValueGate(nn.Module):
    """A decoder block that branches on its input's values: torch.fx cannot trace it."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x, skip=None):
        y = self.block(x, skip)
        return y if bool(y.mean() > -1e9) else -y


def test_untraceable_decoder_is_named_with_its_source_line():
    net = _smp_net("Linknet", "resnet18")
    net.decoder.blocks[0] = _ValueGate(net.decoder.blocks[0])
    with pytest.warns(UserWarning, match=r"(?s)decoder of Linknet cannot be traced.*'decoder\.blocks\.0' "
                                         r"\(_ValueGate\) at .*test_zoo\.py:\d+"):
        anytimeify.convert(net, exits="stages", input_size=(SIZE, SIZE))
    with pytest.warns(UserWarning, match=r"'decoder' \(\d+ Conv2d\).*will not mask them"):
        model = anytimeify.convert(net, exits="stages", input_size=(SIZE, SIZE))
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(model.eval()(x)[-1], net(x))


def test_decoders_branching_on_channels_or_iterating_shapes_trace_and_are_masked():
    # Linknet's blocks add a skip when its channel count is not 0; Segformer's decoder iterates a shape
    for arch in ("Linknet", "Segformer"):
        net = _smp_net(arch, "resnet18")
        model = anytimeify.convert(net, input_size=(SIZE, SIZE), confidence=Confidence(execution="dense")).eval()
        assert any(isinstance(m, MaskedConv2d) for name, m in model.named_modules() if name.startswith("decoder."))
        for size in ((SIZE, SIZE), (2 * SIZE, SIZE)):  # other sizes too: nothing was fixed to the probe's
            x = torch.randn(2, 3, *size)
            with torch.no_grad():
                plain = anytimeify.convert(net, input_size=(SIZE, SIZE)).eval()
                assert torch.equal(plain(x)[-1], net(x))


def test_leaf_hiding_convolutions_warns():
    net = _timm_net("resnet")
    with pytest.warns(UserWarning, match=r"hide convolutions: 'fuse' \(1 Conv2d\)"):
        model = anytimeify.convert(net, exits="stages", input_size=(SIZE, SIZE), leaf_modules=["fuse"])
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(model.eval()(x)[-1], net(x))
    with warnings.catch_warnings(record=True) as caught:  # a convolution-free leaf is silent
        warnings.simplefilter("always")
        anytimeify.convert(net, exits="stages", input_size=(SIZE, SIZE), leaf_modules=[nn.BatchNorm2d])
    assert not [w for w in caught if "hide convolutions" in str(w.message)]


class _DataDependent(nn.Module):
    """Branches on tensor values: torch.fx cannot trace it."""

    def forward(self, x):
        return x if bool(x.sum() > 0) else -x


def test_registered_leaf_makes_an_untraceable_encoder_convert():
    from anytimeify._fx.trace import _LEAF_MODULES

    net = _smp_net("Unet", "resnet18")
    net.encoder.relu = nn.Sequential(nn.ReLU(), _DataDependent())
    with pytest.raises(anytimeify.TraceError, match=r"(?s)'encoder\.relu\.1' \(_DataDependent\) at "
                                                   r".*test_zoo\.py:\d+.*leaf_modules="):
        anytimeify.convert(net, input_size=(SIZE, SIZE))
    anytimeify.register_leaf_module(_DataDependent)
    try:
        model = anytimeify.convert(net, input_size=(SIZE, SIZE)).eval()
    finally:
        _LEAF_MODULES.discard(_DataDependent)
    assert [e["name"] for e in model.exit_info] == ["encoder.layer1", "encoder.layer2", "encoder.layer3", "output"]
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(model(x)[-1], net.eval()(x))


def test_a_module_branching_on_the_rank_of_its_input_traces():
    # Mix Transformer's LayerNorm branches on x.ndim: it traces at the probe's rank; registered as a
    # leaf (as anytimeify does: it holds no convolution) its module is the boundary, traced through
    # the map made of its output, with the same shapes
    from segmentation_models_pytorch.encoders.mix_transformer import LayerNorm

    from anytimeify._fx.trace import _LEAF_MODULES

    assert LayerNorm in _LEAF_MODULES
    _LEAF_MODULES.discard(LayerNorm)
    try:
        traced = anytimeify.convert(_smp_net("Unet", "mit_b0"), input_size=(SIZE, SIZE))
    finally:
        anytimeify.register_leaf_module(LayerNorm)
    model = anytimeify.convert(_smp_net("Unet", "mit_b0"), input_size=(SIZE, SIZE))
    assert [e["name"] for e in model.exit_info] == ["encoder.norm1", "encoder.norm2", "encoder.norm3", "output"]
    assert [e["channels"] for e in model.exit_info] == [e["channels"] for e in traced.exit_info]
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(traced.eval()(x)[-1], model.eval()(x)[-1])


@pytest.mark.parametrize("net_factory, expected", [
    (lambda: _smp_net("Unet", "tu-mobilenetv3_small_050"),
     ["encoder.model.blocks.0", "encoder.model.blocks.1", "encoder.model.blocks.3"]),
    (lambda: _timm_net("efficientnet"), ["backbone.blocks.1", "backbone.blocks.2", "backbone.blocks.4"]),
])
def test_inspect_lists_the_picked_stages_by_names_convert_accepts(net_factory, expected):
    net = net_factory()
    found = anytimeify.inspect(net, input_size=(SIZE, SIZE))
    assert [c.name for c in found if c.picked] == expected
    model = anytimeify.convert(net, exits=expected[1:], input_size=(SIZE, SIZE))
    assert [e["name"] for e in model.exit_info] == expected[1:] + ["output"]


@pytest.mark.parametrize("make, divisor", [
    (lambda: _smp_net("PSPNet", "resnet18"), 8),  # pyramid pooling to 1, 2, 3, 6 does not count
    (lambda: _smp_net("DeepLabV3Plus", "resnet18"), 32),  # nor does ASPP's image pooling
    (lambda: _timm_net("efficientnet"), 32),  # nor squeeze-excitation's global mean
])
def test_input_divisor_ignores_fixed_size_tensors(make, divisor):
    net = make()
    model = anytimeify.convert(net, exits="stages", input_size=(SIZE, SIZE))
    assert model.input_divisor == divisor
    gm = model.graph_module
    gm.meta["input_shape"] = (1, 3, SIZE, SIZE)
    assert spatial_divisor(gm) <= divisor


def test_smp_input_shape_check_becomes_the_converted_models():
    net = _smp_net("FPN", "resnet18")
    model = anytimeify.convert(net, exits="stages", input_size=(SIZE, SIZE))
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 48, 64))


def test_conversion_leaves_batch_norm_statistics_alone():
    # timm's BatchNormAct2d is traced through with training=True baked into the train graph
    net = _timm_net("regnet")
    before = copy.deepcopy(net.state_dict())
    model = anytimeify.convert(net, exits="stages", input_size=(SIZE, SIZE))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_train_mode_matches_base_in_train_mode():
    net = _smp_net("Unet", "tu-mobilenetv3_small_050").train()
    base = copy.deepcopy(net)
    model = anytimeify.convert(net, exits="stages", input_size=(SIZE, SIZE)).train()
    x = torch.randn(2, 3, SIZE, SIZE)
    assert torch.equal(model(x)[-1], base(x))
    loss = sum(o.square().mean() for o in model(x))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_unknown_model_asks_for_explicit_names():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.head(self.down(x))

    with pytest.raises(ValueError, match=r"no stage adapter recognises Plain.*anytimeify.inspect"):
        anytimeify.convert(Plain(), exits="stages", input_size=(SIZE, SIZE))
    assert anytimeify.convert(Plain(), exits=["down"], input_size=(SIZE, SIZE)).num_exits == 2
