"""RANet: Resolution Adaptive Networks (Yang et al., CVPR 2020) for anytime image classification.

RANet runs a sequence of dense sub-networks on increasingly fine input maps (e.g. 8, 16, 32 and
32 pixels for CIFAR). The first sub-network works on the coarsest map; each later one fuses the
features of its predecessor block by block (bilinear resizing, ``align_corners=True``) and
downsamples until it reaches the coarsest resolution, where its own classifiers sit. Every
sub-network's last blocks carry a classifier, so the network has one exit per such block.

The structure, the parameter count, the weight initialisation, the execution order and the
module names follow RANet's reference code (``models/RANet.py``), so the reference's checkpoints
load by name, and :func:`ranet_ops` counts operations as its ``op_counter.py`` does.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["RANetConfig", "RANet", "ranet", "ranet_ops", "RANET_VARIANTS"]

#: variants accepted by :func:`ranet`
RANET_VARIANTS = ("cifar10", "cifar100", "imagenet")
"""The variants :func:`ranet` builds (the reference code's CIFAR and ImageNet configurations)."""


def _resize(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bilinearly resize ``x`` (``align_corners=True``) to the spatial size of ``like``."""
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=True)


# one graph node per resize, whose inputs are tensors only, so the traced graph splits cleanly
torch.fx.wrap("_resize")


@dataclass
class RANetConfig:
    """Every architecture setting of RANet, named after the reference's command-line flags.

    Attributes:
        data: ``"cifar"`` (3x3 stem convolution, classifiers with ``classifier_channels``
            channels) or ``"imagenet"`` (7x7 stride-2 stem with max pooling, classifiers as wide
            as the features they read).
        num_classes: outputs of every classifier.
        n_blocks: blocks of the first sub-network (``--nBlocks``); each is followed by a
            classifier.
        block_step: blocks each later sub-network has beyond its predecessor
            (``--block-step``); its last ``block_step`` blocks carry classifiers, the earlier
            ones fuse the predecessor's blocks.
        step: dense layers per block (``--step``).
        step_mode: ``"even"`` (every block has ``step`` layers) or ``"lg"`` (the n-th block of
            a sub-network has ``n * step`` layers) (``--stepmode``).
        growth_rate: growth rate of a dense layer before ``gr_factor`` (``--growthRate``).
        n_channels: base channel count before ``gr_factor`` (``--nChannels``).
        compress_factor: share of a fusion layer's new channels computed from the predecessor's
            features (``--compress-factor``).
        reduction: channel reduction of the transition layers (``--reduction``).
        scale_list: resolution level of each sub-network, 1 being the coarsest
            (``--scale-list``); equal levels share a resolution.
        gr_factor: per sub-network multiplier of ``n_channels`` and ``growth_rate``
            (``--grFactor``).
        bn_factor: per sub-network bottleneck width factor of the dense layers (``--bnFactor``).
        bn_after: convolution before batch norm and ReLU in the dense layers, as the reference
            builds them (its ``--bnAfter`` flag never reaches the layers); False builds its
            other variant, batch norm and ReLU before each convolution.
        classifier_channels: width of the two convolutions of a CIFAR classifier.
        input_size: input side length the network is built for (32 for CIFAR, 224 for
            ImageNet when None); it sets :attr:`RANet.exit_resolutions` and the probe of
            :func:`ranet_ops`.
    """

    data: str = "cifar"
    num_classes: int = 10
    n_blocks: int = 2
    block_step: int = 2
    step: int = 4
    step_mode: str = "even"
    growth_rate: int = 6
    n_channels: int = 16
    compress_factor: float = 0.25
    reduction: float = 0.5
    scale_list: Tuple[int, ...] = (1, 2, 3, 3)
    gr_factor: Tuple[int, ...] = (4, 2, 1, 1)
    bn_factor: Tuple[int, ...] = (4, 2, 1, 1)
    bn_after: bool = True
    classifier_channels: int = 128
    input_size: Optional[int] = None

    def __post_init__(self):
        self.scale_list = tuple(self.scale_list)
        self.gr_factor = tuple(self.gr_factor)
        self.bn_factor = tuple(self.bn_factor)
        if self.data not in ("cifar", "imagenet"):
            raise ValueError(f"data must be 'cifar' or 'imagenet', got {self.data!r}")
        if self.step_mode not in ("even", "lg"):
            raise ValueError(f"step_mode must be 'even' or 'lg', got {self.step_mode!r}")
        if not len(self.scale_list) == len(self.gr_factor) == len(self.bn_factor):
            raise ValueError("scale_list, gr_factor and bn_factor need one entry per sub-network")
        if self.input_size is None:
            self.input_size = 32 if self.data == "cifar" else 224

    @classmethod
    def cifar(cls, num_classes: int = 10) -> "RANetConfig":
        """The CIFAR network of the reference's ``train_cifar.sh``: sub-networks on 8/16/32/32 maps."""
        return cls(data="cifar", num_classes=num_classes)

    @classmethod
    def digits(cls, num_classes: int = 10) -> "RANetConfig":
        """A small CIFAR-style network for 32x32 inputs that trains in a minute or two on a CPU
        (``benchmarks/digits_anytime.py``): the CIFAR layout with 8 base channels, growth rate 4,
        2 layers per block and 32-channel classifiers."""
        return cls(data="cifar", num_classes=num_classes, n_channels=8, growth_rate=4, step=2,
                   classifier_channels=32)

    @classmethod
    def imagenet(cls, num_classes: int = 1000) -> "RANetConfig":
        """The ImageNet network of the reference's ``models/RANet.py``: sub-networks on 7/14/28/56 maps.

        Growth rate 16, 64 base channels, 8 layers per block, ``--grFactor 4-2-2-1
        --bnFactor 4-2-2-1`` (``train_imagenet.sh`` passes ``4-2-1-1`` for both, a smaller
        network; set ``gr_factor`` and ``bn_factor`` for it).
        """
        return cls(data="imagenet", num_classes=num_classes, n_channels=64, growth_rate=16,
                   step=8, scale_list=(1, 2, 3, 4), gr_factor=(4, 2, 2, 1), bn_factor=(4, 2, 2, 1))

    @property
    def num_scales(self) -> int:
        """Number of sub-networks."""
        return len(self.scale_list)

    def block_counts(self) -> List[int]:
        """Blocks per sub-network: ``n_blocks``, then ``block_step`` more for each later one."""
        return [self.n_blocks + self.block_step * i for i in range(self.num_scales)]

    def layers_in_block(self, position: int) -> int:
        """Dense layers of the block at 1-based ``position`` within its sub-network."""
        return self.step if self.step_mode == "even" else self.step * position


class _ConvBasic(nn.Module):
    """Convolution, batch norm and ReLU (the reference's ``ConvBasic``)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _ConvBN(nn.Module):
    """Bottleneck 1x1 convolution then 3x3 convolution (the reference's ``ConvBN``).

    The bottleneck has ``min(c_in, bn_width * c_out)`` channels; ``down`` makes the 3x3
    convolution stride 2.
    """

    def __init__(self, c_in: int, c_out: int, down: bool, bn_after: bool, bn_width: int):
        super().__init__()
        inner = min(c_in, bn_width * c_out)
        stride = 2 if down else 1
        layers: List[nn.Module] = []
        if not bn_after:
            layers += [nn.BatchNorm2d(c_in), nn.ReLU(inplace=True)]
        layers += [nn.Conv2d(c_in, inner, 1, bias=False), nn.BatchNorm2d(inner), nn.ReLU(inplace=True),
                   nn.Conv2d(inner, c_out, 3, stride=stride, padding=1, bias=False)]
        if bn_after:
            layers += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _DenseLayer(nn.Module):
    """Dense layer: the input concatenated with ``growth`` new channels (``ConvNormal``)."""

    def __init__(self, c_in: int, growth: int, bn_after: bool, bn_width: int):
        super().__init__()
        self.conv_normal = _ConvBN(c_in, growth, False, bn_after, bn_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv_normal(x)], dim=1)


class _FusionLayer(nn.Module):
    """Dense layer fusing a coarser sub-network's features (the reference's ``ConvUpNormal``).

    Of the ``growth`` new channels, ``floor(growth * compress_factor)`` come from the coarser
    features and the rest from the layer's own input; both are resized to the size of the
    latter's new features (half the input's when ``down``), and so is the input itself.
    """

    def __init__(self, c_in: int, c_low: int, growth: int, bn_after: bool, bn_width: int,
                 bn_width_low: int, compress_factor: float, down: bool):
        super().__init__()
        from_low = math.floor(growth * compress_factor)
        # registered in the reference's order, which fixes the order of the random initialisation
        self.conv_up = _ConvBN(c_low, from_low, False, bn_after, bn_width_low)
        self.conv_normal = _ConvBN(c_in, growth - from_low, down, bn_after, bn_width)

    def forward(self, low: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        new = self.conv_normal(x)
        return torch.cat([_resize(x, new), _resize(self.conv_up(low), new), new], dim=1)


class _DenseBlock(nn.Module):
    """Dense block of a sub-network's own (``_BlockNormal``), with an optional transition.

    Returns the block's output and the features the next sub-network fuses: the block's input
    and every layer's output.
    """

    fused = False

    def __init__(self, layers: int, c_in: int, growth: int, reduction: float, trans: bool,
                 bn_after: bool, bn_width: int):
        super().__init__()
        self.layers = nn.ModuleList(
            [_DenseLayer(c_in + i * growth, growth, bn_after, bn_width) for i in range(layers)])
        c_out = c_in + layers * growth
        self.trans = _ConvBasic(c_out, math.floor(reduction * c_out), 1, 1, 0) if trans else None
        self.out_channels = math.floor(reduction * c_out) if trans else c_out
        self.feature_channels = [c_in + i * growth for i in range(layers + 1)]

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        features = [x]
        for layer in self.layers:
            x = layer(x)
            features.append(x)
        if self.trans is not None:
            x = self.trans(x)
        return x, features


class _FusionBlock(nn.Module):
    """Block fusing the coarser sub-network's block at the same position (``_BlockUpNormal``).

    Layer ``i`` fuses the coarser block's feature ``i``; its last layer downsamples when the block
    is a ``down`` block, and a 1x1 convolution of the coarser block's last layer output adds
    ``floor(c * compress_factor)`` channels to the block's ``c`` output channels before the
    optional transition.
    """

    fused = True

    def __init__(self, layers: int, c_in: int, c_low: Sequence[int], growth: int, reduction: float,
                 trans: bool, down: bool, compress_factor: float, bn_after: bool, bn_width: int,
                 bn_width_low: int):
        super().__init__()
        self.layers = nn.ModuleList([
            _FusionLayer(c_in + i * growth, c_low[i], growth, bn_after, bn_width, bn_width_low,
                         compress_factor, down and i == layers - 1)
            for i in range(layers)])
        c_out = c_in + layers * growth
        self.conv_last = _ConvBasic(c_low[layers], math.floor(c_out * compress_factor), 1, 1, 0)
        c_cat = c_out + math.floor(c_out * compress_factor)
        self.trans = _ConvBasic(c_cat, math.floor(reduction * c_cat), 1, 1, 0) if trans else None
        self.out_channels = math.floor(reduction * c_cat) if trans else c_cat
        self.feature_channels = [c_in + i * growth for i in range(layers + 1)]

    def forward(self, x: torch.Tensor, low: List[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        features = [x]
        for layer, low_i in zip(self.layers, low):
            x = layer(low_i, x)
            features.append(x)
        x = torch.cat([x, _resize(self.conv_last(low[len(self.layers)]), x)], dim=1)
        if self.trans is not None:
            x = self.trans(x)
        return x, features


class _Stem(nn.Module):
    """The input maps of every sub-network (the reference's ``RAFirstLayer``).

    A chain of convolutions from the finest map to the coarsest, stride 2 wherever the resolution
    level changes; returns the maps coarsest first, one per sub-network.
    """

    def __init__(self, config: RANetConfig):
        super().__init__()
        widths = [config.n_channels * g for g in reversed(config.gr_factor)]
        levels = list(reversed(config.scale_list))
        if config.data == "cifar":
            first: nn.Module = _ConvBasic(3, widths[0], 3, 1, 1)
        else:
            first = nn.Sequential(
                nn.Conv2d(3, widths[0], 7, 2, 3),
                nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        self.layers = nn.ModuleList([first])
        self.strides = [1]
        level = levels[0]
        for i in range(1, len(widths)):
            stride = 1 if levels[i] == level else 2
            level = levels[i]
            self.layers.append(_ConvBasic(widths[i - 1], widths[i], 3, stride, 1))
            self.strides.append(stride)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        maps = []
        for layer in self.layers:
            x = layer(x)
            maps.append(x)
        return maps[::-1]


class _Classifier(nn.Module):
    """Two stride-2 convolutions, 2x2 average pooling and a linear layer (``ClassifierModule``)."""

    def __init__(self, c_in: int, width: int, num_classes: int):
        super().__init__()
        self.m = nn.Sequential(
            _ConvBasic(c_in, width, 3, 2, 1),
            _ConvBasic(width, width, 3, 2, 1),
            nn.AvgPool2d(2),
        )
        self.linear = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(self.m(x), 1))


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class RANet(nn.Module):
    """Resolution Adaptive Network, built as RANet's reference code builds it.

    Sub-network ``s`` starts on the stem's map of resolution level ``scale_list[s]`` and has
    ``n_blocks + s * block_step`` blocks. Its first blocks fuse the blocks of sub-network
    ``s - 1`` at the same positions; of the positions where earlier sub-networks end
    (0, ``n_blocks``, ``n_blocks + block_step``, ...), the last ``scale_list[s] - 1`` mark the
    fusion blocks that halve the resolution, and transitions (1x1 convolutions reducing the
    channels by ``reduction``) follow ``scale_list[s] - 1`` evenly spaced blocks. The remaining
    blocks are plain dense blocks, each followed by a classifier. The forward pass runs the stem
    (a chain of convolutions ending in the first sub-network's map, so all of it precedes the
    first exit), then each sub-network's blocks in order with every classifier right after its
    block: the classifiers' outputs come in exit order, and nothing that only later exits need
    runs before an earlier classifier.

    Module names (``FirstLayer``, ``scale_flows``, ``classifier``) are the reference's, so its
    checkpoints load by name. Weights are initialised as the reference does (with torch's global
    random generator, in the reference's order): convolutions of the blocks and classifiers from
    ``N(0, 2 / (k * k * out_channels))``, batch norm to identity, linear biases to zero, and the
    stem and the linear weights with PyTorch's defaults.

    Args:
        config: the architecture; see :class:`RANetConfig`.

    Attributes:
        config: the architecture.
        num_exits: number of classifiers.
        exit_scales: per exit, the index of its sub-network.
        exit_resolutions: per exit, the ``(h, w)`` of the feature map its classifier reads at
            ``input_size``.
        scale_resolutions: per sub-network, the ``(h, w)`` of its input map from the stem.
        input_size: the input side length the network is built for.
    """

    def __init__(self, config: RANetConfig):
        super().__init__()
        self.config = config
        self.input_size = config.input_size
        # how anytimeify.save rebuilds this network
        self._anytimeify_source = {"factory": "anytimeify.models.ranet:ranet_from_config", "args": [],
                                   "kwargs": {k: list(v) if isinstance(v, tuple) else v
                                              for k, v in dataclasses.asdict(config).items()}}
        counts = config.block_counts()
        bounds = [0] + counts  # blocks of sub-network s: bounds[s + 1]; of its predecessor: bounds[s]
        # registered (and built) in the reference's order: parameter order and random initialisation
        self.scale_flows = nn.ModuleList()
        self.classifier = nn.ModuleList()
        self.FirstLayer = _Stem(config)
        self.exit_scales: List[int] = []
        self.exit_resolutions: List[Tuple[int, int]] = []
        self.scale_resolutions = self._stem_resolutions()
        self._exit_after: List[List[bool]] = []

        low_channels: List[List[int]] = []
        for s in range(config.num_scales):
            level = config.scale_list[s]
            growth = config.growth_rate * config.gr_factor[s]
            c_in = config.n_channels * config.gr_factor[s]
            h, w = self.scale_resolutions[s]
            n_total = counts[s]
            # the reference's rule, Python slice semantics included
            down_at = bounds[: s + 1][-(level - 1):]
            flow = nn.ModuleList()
            exit_after: List[bool] = []
            channels: List[List[int]] = []
            for n in range(1, n_total + 1):
                trans = any(n == math.floor((i + 1) * n_total / level) for i in range(level - 1))
                layers = config.layers_in_block(n)
                if n > bounds[s]:
                    block: nn.Module = _DenseBlock(layers, c_in, growth, config.reduction, trans,
                                                   config.bn_after, config.bn_factor[s])
                else:
                    down = n in down_at
                    block = _FusionBlock(layers, c_in, low_channels[n - 1], growth, config.reduction,
                                         trans, down, config.compress_factor, config.bn_after,
                                         config.bn_factor[s], config.bn_factor[s - 1])
                    if down:
                        h, w = _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1)
                c_in = block.out_channels
                flow.append(block)
                channels.append(block.feature_channels)
                is_exit = n > bounds[s]
                exit_after.append(is_exit)
                if is_exit:
                    width = config.classifier_channels if config.data == "cifar" else c_in
                    self.classifier.append(_Classifier(c_in, width, config.num_classes))
                    self.exit_scales.append(s)
                    self.exit_resolutions.append((h, w))
            low_channels = channels
            self.scale_flows.append(flow)
            self._exit_after.append(exit_after)
        self.num_exits = len(self.classifier)

        for part in (self.scale_flows, self.classifier):
            for m in part.modules():
                self._init_weights(m)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, math.sqrt(2.0 / n))
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()
        elif isinstance(m, nn.Linear):
            m.bias.data.zero_()

    def _stem_resolutions(self) -> List[Tuple[int, int]]:
        h = w = self.input_size
        sizes = []
        for i, stride in enumerate(self.FirstLayer.strides):
            if i == 0 and self.config.data == "imagenet":
                h, w = _conv_out(h, 7, 2, 3), _conv_out(w, 7, 2, 3)
                h, w = _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1)
            elif stride == 2:
                h, w = _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1)
            sizes.append((h, w))
        return sizes[::-1]

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Logits ``(B, num_classes)`` of every exit, in exit order."""
        maps = self.FirstLayer(x)
        logits: List[torch.Tensor] = []
        low: List[List[torch.Tensor]] = []
        k = 0
        for s, flow in enumerate(self.scale_flows):
            h = maps[s]
            features: List[List[torch.Tensor]] = []
            for n, block in enumerate(flow):
                if block.fused:
                    h, f = block(h, low[n])
                else:
                    h, f = block(h)
                features.append(f)
                if self._exit_after[s][n]:
                    logits.append(self.classifier[k](h))
                    k += 1
            low = features
        return logits


def ranet_from_config(**fields) -> RANet:
    """``RANet(RANetConfig(**fields))``: a network from its settings as plain values."""
    return RANet(RANetConfig(**fields))


def ranet(variant: str = "cifar10", num_classes: Optional[int] = None) -> RANet:
    """Build RANet with random weights.

    Args:
        variant: ``"cifar10"``, ``"cifar100"`` (the CIFAR network, 10 or 100 classes) or
            ``"imagenet"`` (1000 classes).
        num_classes: overrides the variant's number of classes.
    """
    if variant not in RANET_VARIANTS:
        raise ValueError(f"unknown RANet variant {variant!r}; choose one of {', '.join(RANET_VARIANTS)}")
    if variant == "imagenet":
        config = RANetConfig.imagenet(1000 if num_classes is None else num_classes)
    else:
        default = 10 if variant == "cifar10" else 100
        config = RANetConfig.cifar(default if num_classes is None else num_classes)
    return RANet(config)


def _leaf_ops(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> int:
    """Operations of one leaf module as the reference's ``op_counter.measure_layer`` counts them."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        macs = module.in_channels * module.out_channels * kh * kw * out.shape[2] * out.shape[3]
        return macs // module.groups
    if isinstance(module, nn.ReLU):
        return x.numel()
    if isinstance(module, (nn.AvgPool2d, nn.MaxPool2d)):
        k = module.kernel_size
        kh, kw = (k, k) if isinstance(k, int) else k
        return out.shape[0] * out.shape[1] * out.shape[2] * out.shape[3] * kh * kw
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return x.numel()
    if isinstance(module, nn.Linear):
        bias = module.bias.numel() if module.bias is not None else 0
        return x.shape[0] * (module.weight.numel() + bias)
    return 0


def ranet_ops(model: RANet, input_size: Union[int, Tuple[int, int], None] = None) -> List[int]:
    """Cumulative operations up to each exit, counted as RANet's reference ``op_counter.py`` does.

    Convolutions count their multiply-adds (bias excluded), linear layers multiply-adds plus
    biases, ReLUs one operation per input element, average and max pooling ``kernel area``
    operations per output element; batch norm, concatenation and the bilinear resizing count
    nothing. The count at exit ``k`` includes everything the forward pass runs before its
    classifier returns, earlier classifiers included.

    Args:
        model: the network; it runs once in eval mode on a ``(1, 3, H, W)`` probe of zeros and
            is returned to its previous mode.
        input_size: ``H`` (square) or ``(H, W)``; the model's ``input_size`` when None.
    """
    size = model.input_size if input_size is None else input_size
    h, w = (size, size) if isinstance(size, int) else size
    total = [0]
    per_exit: List[int] = []

    def count(module, inputs, output):
        total[0] += int(_leaf_ops(module, inputs[0], output))

    def mark(module, inputs, output):
        per_exit.append(total[0])

    handles = [m.register_forward_hook(count) for m in model.modules() if next(m.children(), None) is None]
    handles += [c.register_forward_hook(mark) for c in model.classifier]
    was_training = model.training
    param = next(model.parameters())
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, h, w, device=param.device, dtype=param.dtype))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return per_exit
