"""RANet against the architecture figures of RANet's reference code (REFERENCE.md §7)."""
import pytest
import torch
import torch.fx

from anytimeify.models.ranet import RANet, RANetConfig, ranet, ranet_ops

# cumulative operations per exit (millions, two decimals) and parameters (millions), §7
CIFAR10_OPS = [15.81, 31.28, 44.66, 50.36, 60.65, 63.65, 90.17, 94.90]
CIFAR10_PARAMS = 3.262
IMAGENET_OPS = [434.97, 888.67, 1153.36, 1352.45, 2279.91, 2588.47, 3235.52, 3333.48]
IMAGENET_PARAMS = 149.1
IMAGENET_CLASSIFIER_PARAMS = 133.5
# a CIFAR-100 classifier's linear layer: 128 x 90 more weights and 90 more biases than CIFAR-10's
CIFAR100_EXTRA = 128 * 90 + 90

# By hand from the configurations. CIFAR: the stem's levels reversed are 3-3-2-1, so its maps are
# 32, 32 (stride 1, same level), 16 and 8 pixels, handed out coarsest first: sub-networks on
# 8/16/32/32. Sub-network s has 2 + 2s blocks; fusion blocks at positions 1..2s, of which those at
# the earlier sub-networks' block counts [0, 2, 4, 6][:s + 1][-(level - 1):] halve the resolution:
# none for s = 0, block 2 for s = 1 (16 -> 8), blocks 2 and 4 for s = 2 (32 -> 16 -> 8), blocks 4
# and 6 for s = 3 (32 -> 16 -> 8). Every classifier (after the last two blocks of each
# sub-network) so reads an 8x8 map. ImageNet: stem maps 56 (7x7 stride 2, max pool), 28, 14, 7;
# downsampling blocks 2 (s = 1), 2 and 4 (s = 2), 2, 4 and 6 (s = 3): every classifier reads 7x7.
CIFAR_SCALES = [(8, 8), (16, 16), (32, 32), (32, 32)]
IMAGENET_SCALES = [(7, 7), (14, 14), (28, 28), (56, 56)]
EXIT_SCALES = [0, 0, 1, 1, 2, 2, 3, 3]


def _params(module):
    return sum(p.numel() for p in module.parameters())


def _probe(model):
    """Per-exit ops of :func:`ranet_ops`, and the map sizes the stem makes and the classifiers read."""
    seen = {"stem": None, "exits": []}
    hooks = [model.FirstLayer.register_forward_hook(
        lambda m, i, o: seen.__setitem__("stem", [tuple(t.shape[-2:]) for t in o]))]
    hooks += [c.register_forward_pre_hook(lambda m, i: seen["exits"].append(tuple(i[0].shape[-2:])))
              for c in model.classifier]
    try:
        ops = ranet_ops(model)
    finally:
        for h in hooks:
            h.remove()
    return ops, seen


@pytest.fixture(scope="module")
def cifar10():
    torch.manual_seed(0)
    return ranet("cifar10")


@pytest.fixture(scope="module")
def imagenet():
    torch.manual_seed(0)
    return ranet("imagenet").eval()


def test_cifar10_ops_and_params(cifar10):
    ops, seen = _probe(cifar10)
    assert len(ops) == cifar10.num_exits == 8
    assert [o / 1e6 for o in ops] == pytest.approx(CIFAR10_OPS, abs=0.005)  # §7's rounding
    assert _params(cifar10) / 1e6 == pytest.approx(CIFAR10_PARAMS, abs=0.0005)
    assert seen["stem"] == CIFAR_SCALES
    assert seen["exits"] == [(8, 8)] * 8


def test_cifar100_adds_linear_layers(cifar10):
    torch.manual_seed(0)
    model = ranet("cifar100")
    assert model.config.num_classes == 100
    assert ranet_ops(model) == [o + CIFAR100_EXTRA * k for k, o in enumerate(ranet_ops(cifar10), 1)]
    assert _params(model) == _params(cifar10) + CIFAR100_EXTRA * 8


def test_cifar_schedule(cifar10):
    assert cifar10.input_size == 32
    assert cifar10.scale_resolutions == CIFAR_SCALES
    assert cifar10.exit_scales == EXIT_SCALES
    assert cifar10.exit_resolutions == [(8, 8)] * 8


def test_imagenet_ops_and_params(imagenet):
    ops, seen = _probe(imagenet)
    assert len(ops) == imagenet.num_exits == 8
    assert [o / 1e6 for o in ops] == pytest.approx(IMAGENET_OPS, abs=0.005)
    assert _params(imagenet) / 1e6 == pytest.approx(IMAGENET_PARAMS, abs=0.05)
    assert _params(imagenet.classifier) / 1e6 == pytest.approx(IMAGENET_CLASSIFIER_PARAMS, abs=0.05)
    assert seen["stem"] == IMAGENET_SCALES
    assert seen["exits"] == [(7, 7)] * 8


def test_imagenet_schedule_and_shapes(imagenet):
    assert imagenet.input_size == 224
    assert imagenet.scale_resolutions == IMAGENET_SCALES
    assert imagenet.exit_scales == EXIT_SCALES
    assert imagenet.exit_resolutions == [(7, 7)] * 8
    with torch.no_grad():
        out = imagenet(torch.randn(1, 3, 224, 224))
    assert [tuple(o.shape) for o in out] == [(1, 1000)] * 8


def test_forward_shapes(cifar10):
    cifar10.eval()
    with torch.no_grad():
        out = cifar10(torch.randn(3, 3, 32, 32))
    assert [tuple(o.shape) for o in out] == [(3, 10)] * 8


def test_fx_trace_matches_eager_and_keeps_exit_order(cifar10):
    cifar10.eval()
    gm = torch.fx.symbolic_trace(cifar10)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(cifar10(x), gm(x)):
            assert torch.equal(a, b)
    # the classifiers' results come in exit order, and every node ahead of exit k's result feeds
    # one of the exits 1..k: nothing only later exits need runs before an earlier classifier
    nodes = list(gm.graph.nodes)
    exits = [n for n in nodes if n.op == "call_module" and n.target.endswith(".linear")]
    assert [n.target for n in exits] == [f"classifier.{k}.linear" for k in range(8)]
    needed = set()
    for k, node in enumerate(exits):
        stack = [node]
        while stack:
            n = stack.pop()
            if n not in needed:
                needed.add(n)
                stack.extend(n.all_input_nodes)
        ahead = nodes[: nodes.index(node) + 1]
        assert all(n in needed for n in ahead if n.op != "placeholder"), k


def test_train_backward_reaches_every_classifier():
    torch.manual_seed(0)
    model = RANet(RANetConfig.cifar(num_classes=10)).train()
    out = model(torch.randn(2, 3, 32, 32))
    sum(torch.nn.functional.cross_entropy(o, torch.tensor([1, 7])) for o in out).backward()
    assert all(p.grad is not None for p in model.parameters())
    for classifier in model.classifier:
        assert classifier.linear.weight.grad.abs().sum() > 0


def test_config_and_variants():
    assert RANetConfig.cifar().input_size == 32
    assert RANetConfig.imagenet().input_size == 224
    assert ranet("cifar10", num_classes=7).config.num_classes == 7
    with pytest.raises(ValueError):
        ranet("resnet")
    with pytest.raises(ValueError):
        RANetConfig(scale_list=(1, 2), gr_factor=(4, 2, 1), bn_factor=(4, 2, 1))
