"""A segmenter from any timm backbone: ``features_only`` trunk plus a small all-MLP head.

The head follows SegFormer's decoder: every backbone level at stride 4 or more is projected to
``width`` channels by a 1x1 conv, upsampled to the finest of those levels, concatenated, fused
by a 1x1 conv + BN + ReLU and classified by a 1x1 conv. The logits come out at the finest
level's resolution (1/4 of the input for every common backbone), as HRNetV2's do.

The backbone keeps timm's ``features_only`` module names under ``backbone.``, so
``anytimeify.convert(TimmSegmenter("convnext_tiny", 19), exits="stages")`` finds the stages from
timm's ``feature_info``.
"""
from __future__ import annotations

import logging
from typing import Any, List, Optional

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

_logger = logging.getLogger(__name__)

__all__ = ["TimmSegmenter", "timm_segmenter"]

#: Backbone levels finer than this (the stride-2 stem) do not feed the head.
MIN_HEAD_STRIDE = 4


class TimmSegmenter(nn.Module):
    """A timm ``features_only`` backbone with a SegFormer-style all-MLP segmentation head.

    Args:
        backbone: a timm model name (``resnet18``, ``convnext_tiny``, ``efficientnet_b0``, ...).
        num_classes: number of output classes.
        width: channels of the head's projections.
        pretrained: load timm's pretrained backbone weights (needs them in the local cache).
        align_corners: of the head's bilinear upsampling.
        **timm_kwargs: more arguments for ``timm.create_model`` (e.g. ``feature_location=""``
            for HRNet's own branch outputs instead of its classification increments;
            ``out_indices``: the backbone levels the head reads, default every level at stride
            4 or more, or a plain transformer's blocks at quarters of its depth; exits can only go
            at levels the head reads, so a backbone whose default reads its last blocks only
            (CrossViT) gets early exits from ``out_indices`` that name earlier ones).

    Attributes:
        input_divisor: the backbone's largest reduction; input sizes must be multiples of it.
        strides: reduction of each level the head reads, finest first.
    """

    def __init__(self, backbone: str, num_classes: int, width: int = 64, *, pretrained: bool = False,
                 align_corners: bool = False, **timm_kwargs: Any):
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self._anytimeify_source = {"factory": "anytimeify.models.timm_seg:TimmSegmenter",
                                   "args": [backbone, num_classes, width],
                                   "kwargs": {"align_corners": align_corners, **timm_kwargs}}
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        out_indices = timm_kwargs.pop("out_indices", None)
        if out_indices is None:
            probe = timm.create_model(backbone, pretrained=False, features_only=True, **timm_kwargs)
            out_indices = _head_levels(backbone, probe)
            del probe
        else:
            out_indices = tuple(int(i) for i in out_indices)
            self._anytimeify_source["kwargs"]["out_indices"] = list(out_indices)
        self.backbone = timm.create_model(backbone, pretrained=pretrained, features_only=True,
                                          out_indices=out_indices, **timm_kwargs)
        if type(self.backbone).__name__ == "FeatureHookNet" and "feature_cls" not in timm_kwargs:
            # features collected by forward hooks do not exist in a traced graph (hooks do not run
            # on proxies): timm's graph-based extraction gives the same maps as graph nodes
            self.backbone = timm.create_model(backbone, pretrained=pretrained, features_only=True,
                                              out_indices=out_indices, feature_cls="fx", **timm_kwargs)
        channels: List[int] = self.backbone.feature_info.channels()
        self.strides: List[int] = list(self.backbone.feature_info.reduction())
        self.input_divisor = int(max(self.strides))
        native = getattr(self.backbone, "pretrained_cfg", None) or {}
        native = native.get("input_size") if isinstance(native, dict) else None
        if native and (native[-1] % self.input_divisor or native[-2] % self.input_divisor):
            # valid-padding networks (Inception at 299x299) take sizes that no stride divides
            self.input_divisor = 1
        self.align_corners = align_corners
        fmt = getattr(self.backbone, "output_fmt", "NCHW")
        #: the backbone returns NHWC maps (Swin, MambaOut): the head permutes them
        self.nhwc_features = str(getattr(fmt, "value", fmt)) == "NHWC"
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(width * len(channels), width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        if self.nhwc_features:
            features = [f.permute(0, 3, 1, 2) for f in features]
        size = features[0].shape[-2:]
        projected = [self.lateral[0](features[0])]
        for feature, lateral in zip(features[1:], self.lateral[1:]):
            projected.append(F.interpolate(lateral(feature), size=size, mode="bilinear",
                                           align_corners=self.align_corners))
        return self.classifier(self.fuse(torch.cat(projected, dim=1)))


#: depth fractions of a plain transformer's taps (DPT's and ViTDet's: blocks 3, 6, 9 and 12 of 12)
TOKEN_TAPS = (1, 2, 3, 4)


def _head_levels(backbone: str, probe: nn.Module) -> tuple:
    """The ``out_indices`` the head reads: every level at stride 4 or more; for a backbone whose
    levels all have one stride (a plain vision transformer's blocks), the blocks at a quarter, a
    half, three quarters and the end of its depth, so that early exits spread over it."""
    reductions = probe.feature_info.reduction()
    indices = [i for i, r in enumerate(reductions) if r >= MIN_HEAD_STRIDE]
    if not indices:
        raise ValueError(f"timm model {backbone!r} has no feature level at stride >= {MIN_HEAD_STRIDE} "
                         f"(reductions {reductions}); choose a backbone with a stride-4+ pyramid")
    every = getattr(getattr(probe, "model", None), "feature_info", None)  # FeatureGetterNet: every block
    if hasattr(every, "reduction"):
        every = every.reduction()
    elif isinstance(every, (list, tuple)) and all(isinstance(d, dict) and "reduction" in d for d in every):
        every = [d["reduction"] for d in every]
    else:
        every = None
    if len(set(reductions)) == 1 and every and len(every) >= len(TOKEN_TAPS) and len(set(every)) == 1:
        depth = len(every)
        return tuple(sorted({depth * k // len(TOKEN_TAPS) - 1 for k in TOKEN_TAPS}))
    return tuple(probe.feature_info.out_indices[i] for i in indices)


def timm_segmenter(backbone: str, num_classes: int = 19, width: Optional[int] = None,
                   **kwargs: Any) -> TimmSegmenter:
    """Build a :class:`TimmSegmenter`; ``width`` defaults to 64 (the head's channels)."""
    return TimmSegmenter(backbone, num_classes, 64 if width is None else width, **kwargs)
