"""Early-exit heads: input fusion of a stage's branches, then an "original" or "redesigned" head.

The layer order of both heads follows the reference implementation of ADP-C exactly (an
``nn.Sequential`` whose indices are the checkpoint's), so its checkpoints map onto these modules by
renaming ``exit{k}.`` to ``exits.{k-1}.``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .masking.conv import MaskedConv2d
from .masking.engine import inference_kernels
from .masking.masks import geometry_of, mask_for_conv, plan_for_mask

__all__ = ["Exit", "ClassifierExit", "fuse_branches", "original_head", "redesigned_head", "HEAD_KINDS"]

HEAD_KINDS = ("original", "redesigned")


def fuse_branches(features: List[torch.Tensor], align_corners: bool = False) -> torch.Tensor:
    """Upsample every feature map bilinearly to the first one's size and concatenate (HRNetV2 fusion).

    ``align_corners=False`` is the ADP-C reference implementation's (``get_exit_input``).

    For float32 CPU inference the compiled kernel does both in one pass and returns a channels-last
    tensor; otherwise (training, other devices and dtypes, no compiler) PyTorch's ops do, with the
    same result up to float rounding.
    """
    kernel = inference_kernels(features)
    if kernel is not None:
        nhwc = [f.permute(0, 2, 3, 1).contiguous() for f in features]
        with torch.profiler.record_function("anytimeify::fuse_branches"):
            return kernel.fuse_branches(nhwc, align_corners).permute(0, 3, 1, 2)
    size = features[0].shape[-2:]
    ups = [features[0]] + [
        F.interpolate(f, size=size, mode="bilinear", align_corners=align_corners) for f in features[1:]
    ]
    return torch.cat(ups, dim=1)


class Upsample2x(nn.Module):
    """Bilinear x2 upsampling of a redesigned head's up step."""

    def __init__(self, align_corners: bool = False):
        super().__init__()
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = inference_kernels([x])
        if kernel is not None:  # float32 CPU inference: one channels-last pass into a pooled output
            with torch.profiler.record_function("anytimeify::resize_bilinear"):
                return kernel.resize_bilinear(x.permute(0, 2, 3, 1).contiguous(), 2 * x.shape[2], 2 * x.shape[3],
                                              self.align_corners).permute(0, 3, 1, 2)
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=self.align_corners)

    def extra_repr(self) -> str:
        return f"align_corners={self.align_corners}"


class AvgPool2x2(nn.AvgPool2d):
    """2x2 average pooling with stride 2 of a redesigned head's down step (``nn.AvgPool2d(2, 2)``);
    for float32 CPU inference one channels-last pass into a pooled output."""

    def __init__(self) -> None:
        super().__init__(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = inference_kernels([x])
        if kernel is None or x.shape[2] < 2 or x.shape[3] < 2:  # (PyTorch reports a map too small)
            return super().forward(x)
        with torch.profiler.record_function("anytimeify::avg_pool2x2"):
            return kernel.avg_pool2x2(x.permute(0, 2, 3, 1).contiguous()).permute(0, 3, 1, 2)


def original_head(in_channels: int, num_classes: int) -> List[nn.Module]:
    """The "original" exit (EE): 1x1 conv C->C + BN + ReLU + 1x1 classifier, all at full exit resolution."""
    return [
        nn.Conv2d(in_channels, in_channels, 1, bias=True),
        nn.BatchNorm2d(in_channels),
        nn.ReLU(inplace=False),
        nn.Conv2d(in_channels, num_classes, 1, bias=True),
    ]


def redesigned_head(in_channels: int, num_classes: int, width: int, depth: int,
                    align_corners: bool = False) -> List[nn.Module]:
    """The "redesigned" exit (RH): ``depth`` pool-conv down steps, then ``depth`` upsample-conv up steps.

    Down step: 2x2 average pooling (stride 2), 1x1 conv, BN, ReLU (the first conv maps
    ``in_channels`` to ``width``). Up step: bilinear x2, 1x1 conv, and BN + ReLU for every up step
    but the last, whose conv is the classifier.
    """
    if depth < 1:
        raise ValueError(f"a redesigned head needs at least one down step, got depth={depth}")
    layers: List[nn.Module] = []
    channels = in_channels
    for _ in range(depth):
        layers += [AvgPool2x2(), nn.Conv2d(channels, width, 1, bias=True),
                   nn.BatchNorm2d(width), nn.ReLU(inplace=False)]
        channels = width
    for step in range(depth):
        last = step == depth - 1
        layers += [Upsample2x(align_corners), nn.Conv2d(width, num_classes if last else width, 1, bias=True)]
        if not last:
            layers += [nn.BatchNorm2d(width), nn.ReLU(inplace=False)]
    return layers


class Exit(nn.Sequential):
    """An early exit: fuse the stage's feature maps, run the head, return logits.

    Fusion upsamples every input bilinearly to the first (highest-resolution) input's size and
    concatenates along channels, as the HRNetV2 head does. When ``output_size_from_input`` is set,
    the logits are resized to the model's output resolution (a fixed ratio of the input size).

    Args:
        layers: the head's layers (see :func:`original_head`, :func:`redesigned_head`).
        kind: ``"original"`` or ``"redesigned"``.
        depth: the number of down steps D (0 for an original head).
        align_corners: ``align_corners`` of the bilinear fusion.
        output_scale: output size as a fraction of the fused input size, if not 1.
    """

    def __init__(self, layers: Sequence[nn.Module], kind: str, depth: int, align_corners: bool = False,
                 output_scale: Optional[Tuple[float, float]] = None):
        super().__init__(*layers)
        self.kind = kind
        self.depth = depth
        self.align_corners = align_corners
        self.output_scale = output_scale

    def fuse(self, features: List[torch.Tensor]) -> torch.Tensor:
        return features[0] if len(features) == 1 else fuse_branches(features, self.align_corners)

    def forward(self, features: List[torch.Tensor], masks=None) -> torch.Tensor:  # type: ignore[override]
        """Logits from the stage's features; ``masks`` (a MaskSet) governs masked convs in the head."""
        x = self.fuse(list(features))
        for layer in self:
            if masks is not None and isinstance(layer, MaskedConv2d):
                mask = mask_for_conv(masks, x, geometry_of(layer))
                x = layer(x, mask, plan_for_mask(masks, mask))
            else:
                x = layer(x)
        if self.output_scale is not None:
            x = F.interpolate(x, scale_factor=self.output_scale, mode="bilinear",
                              align_corners=self.align_corners)
        return x

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, depth={self.depth}"


class ClassifierExit(nn.Module):
    """A classification exit: global average pooling of each of the stage's tensors, concatenated,
    then one linear layer (``convert(..., task="classification")``).

    Feature maps ``(B, C, H, W)`` are averaged over positions; token sequences ``(B, N, C)`` of
    vision transformers over tokens, after a LayerNorm of their channels (the transformer's own
    final norm is not applied to intermediate blocks), and channels-last maps ``(B, H, W, C)``
    (Swin's stages) likewise over positions.

    Args:
        channels: channels of each input tensor.
        num_classes: classes of the linear layer.
        tokens: per input, whether its channels are last: a token sequence ``(B, N, C)`` or a
            channels-last map ``(B, H, W, C)``.
    """

    def __init__(self, channels: Sequence[int], num_classes: int, tokens: Optional[Sequence[bool]] = None):
        super().__init__()
        tokens = list(tokens) if tokens is not None else [False] * len(channels)
        self.tokens = tokens
        self.norms = nn.ModuleList(nn.LayerNorm(c) if t else nn.Identity() for c, t in zip(channels, tokens))
        self.linear = nn.Linear(sum(channels), num_classes)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        pooled = []
        for x, norm, token in zip(features, self.norms, self.tokens):
            pooled.append(norm(x).flatten(1, -2).mean(dim=1) if token else x.mean(dim=(2, 3)))
        return self.linear(pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1))
