"""HRNet for dense prediction: timm's HRNet trunk with the HRNetV2 segmentation head or the pose head.

The trunk modules are taken from ``timm.create_model("hrnet_*", pretrained=False)`` and keep the
module names of HRNet-Semantic-Segmentation (``conv1``, ``bn1``, ``conv2``, ``bn2``, ``layer1``,
``transition1..3``, ``stage2..4``, and ``last_layer`` for the segmentation head), so backbone
checkpoints of timm, HRNet-Image-Classification and HRNet-Semantic-Segmentation load by name.

The two networks compute what their reference implementations compute
(``tests/test_reference_outputs.py`` compares outputs on stored vectors):

* :class:`HRNetSeg` is the segmentation HRNet of the ADP-C reference implementation (and of
  HRNet-Semantic-Segmentation): a fuse layer upsamples a lower-resolution branch bilinearly
  (``align_corners=False``), where timm's classification trunk upsamples by nearest neighbour, and
  the head's branch fusion resizes with ``align_corners=False`` too.
* :class:`HRNetPose` is the pose HRNet of ``deep-high-resolution-net.pytorch``: nearest-neighbour
  fuse layers (timm's), and stage 4's last module fuses into branch 0 only.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Sequence

import timm
import torch
import torch.nn as nn

from ..exits import fuse_branches

# one graph node for the head's fusion, so traced models (conversion, BN folding) run its kernel
torch.fx.wrap("fuse_branches")

_logger = logging.getLogger(__name__)

__all__ = ["HRNetSeg", "HRNetPose", "hrnet_seg", "hrnet_pose", "HRNET_VARIANTS", "FUSE_UPSAMPLING"]

# variant name -> (timm model name, default exit width of the redesigned heads)
HRNET_VARIANTS: Dict[str, tuple] = {
    "w18_small": ("hrnet_w18_small", 64),  # HRNet-W18-Small v1: one module per stage, widths 16-128
    "w18_small_v2": ("hrnet_w18_small_v2", 64),
    "w18": ("hrnet_w18", 64),
    "w32": ("hrnet_w32", 64),
    "w48": ("hrnet_w48", 128),
}
"""Variant name -> (timm trunk name, default exit width of the redesigned heads): ``w18_small``,
``w18_small_v2``, ``w18``, ``w32`` (64) and ``w48`` (128)."""

#: Every spatial size in HRNet (branches down to H/32) must divide exactly.
HRNET_INPUT_DIVISOR = 32


def _variant(variant: str) -> tuple:
    key = variant.replace("hrnet_", "")
    if key not in HRNET_VARIANTS:
        raise ValueError(
            f"unknown HRNet variant {variant!r}; choose one of {sorted(HRNET_VARIANTS)}"
        )
    return key, *HRNET_VARIANTS[key]


class _Trunk(nn.Module):
    """The stem and the four stages of HRNet, with timm's modules under HRNet's names."""

    input_divisor = HRNET_INPUT_DIVISOR

    def _take_trunk(self, timm_name: str, multi_scale_output: bool) -> List[int]:
        net = timm.create_model(timm_name, pretrained=False, head="")
        for name in ("conv1", "bn1", "act1", "conv2", "bn2", "act2", "layer1",
                     "transition1", "stage2", "transition2", "stage3", "transition3", "stage4"):
            setattr(self, name, getattr(net, name))
        cfg = net.stage4_cfg
        widths = [c * 1 for c in cfg["num_channels"]]  # BASIC blocks: expansion 1
        if not multi_scale_output:
            # the pose network's last module fuses into branch 0 only
            self.stage4, _ = net._make_stage(cfg, list(widths), multi_scale_output=False)
            HRNetPose._init_like_timm(self.stage4)
        return widths

    def stages(self, x: torch.Tensor) -> List[torch.Tensor]:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.layer1(x)
        xl = [t(x) for t in self.transition1]
        yl = self.stage2(xl)
        xl = [yl[i] if isinstance(t, nn.Identity) else t(yl[-1]) for i, t in enumerate(self.transition2)]
        yl = self.stage3(xl)
        xl = [yl[i] if isinstance(t, nn.Identity) else t(yl[-1]) for i, t in enumerate(self.transition3)]
        return self.stage4(xl)


#: how a fuse layer may upsample a lower-resolution branch
FUSE_UPSAMPLING = ("bilinear", "nearest")


def _set_fuse_upsampling(stages: Sequence[nn.Module], mode: str, align_corners: bool) -> int:
    """Make every fuse layer of ``stages`` upsample with ``mode``; returns how many were set.

    timm's fuse layers end in ``nn.Upsample(scale_factor=2**(j-i), mode="nearest")``; with the
    input a multiple of 32 (:data:`HRNET_INPUT_DIVISOR`) every branch is exactly that factor
    smaller, so a scale factor and the reference's explicit target size give the same resize.
    """
    count = 0
    for stage in stages:
        for module in stage.modules():
            if isinstance(module, nn.Upsample):
                module.mode = mode
                module.align_corners = align_corners if mode == "bilinear" else None
                count += 1
    return count


class HRNetSeg(_Trunk):
    """HRNetV2 semantic segmentation network, as the ADP-C reference implementation builds it.

    Returns logits at a quarter of the input resolution, as HRNet-Semantic-Segmentation does;
    upsample them to the label size for the loss and for evaluation.

    Args:
        variant: ``"w18_small"``, ``"w18_small_v2"``, ``"w18"``, ``"w32"`` or ``"w48"``.
        num_classes: number of output classes.
        align_corners: ``align_corners`` of every bilinear resize: the fuse layers, the head's
            branch fusion and, through :func:`anytimeify.convert`, the exits' (the reference
            implementation's False; HRNet-Semantic-Segmentation's later configs use True).
        fuse_upsampling: how a fuse layer upsamples a lower branch: ``"bilinear"`` (the
            reference's) or ``"nearest"`` (timm's classification trunk).
    """

    def __init__(self, variant: str = "w48", num_classes: int = 19, align_corners: bool = False,
                 fuse_upsampling: str = "bilinear"):
        super().__init__()
        self._anytimeify_source = {"factory": "anytimeify.models.hrnet:HRNetSeg", "args": [variant, num_classes],
                                   "kwargs": {"align_corners": align_corners, "fuse_upsampling": fuse_upsampling}}
        if fuse_upsampling not in FUSE_UPSAMPLING:
            raise ValueError(f"fuse_upsampling must be one of {FUSE_UPSAMPLING}, got {fuse_upsampling!r}")
        self.variant, timm_name, self.default_exit_width = _variant(variant)
        self.num_classes = num_classes
        self.align_corners = align_corners
        self.fuse_upsampling = fuse_upsampling
        widths = self._take_trunk(timm_name, multi_scale_output=True)
        _set_fuse_upsampling([self.stage2, self.stage3, self.stage4], fuse_upsampling, align_corners)
        channels = sum(widths)
        self.last_layer = nn.Sequential(
            nn.Conv2d(channels, channels, 1, bias=True),
            nn.BatchNorm2d(channels, momentum=0.1),
            nn.ReLU(inplace=False),
            nn.Conv2d(channels, num_classes, 1, bias=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        yl = self.stages(x)
        return self.last_layer(fuse_branches(yl, self.align_corners))


class HRNetPose(_Trunk):
    """HRNet pose estimation network (``deep-high-resolution-net.pytorch``'s ``pose_hrnet``): a 1x1
    heatmap conv on branch 0, after a last module that fuses into branch 0 only.

    Returns ``num_joints`` heatmaps at a quarter of the input resolution. ``align_corners`` is only
    used by the exits :func:`anytimeify.convert` attaches (False, as ADP-C's).
    """

    def __init__(self, variant: str = "w32", num_joints: int = 16):
        super().__init__()
        self._anytimeify_source = {"factory": "anytimeify.models.hrnet:HRNetPose", "args": [variant, num_joints],
                                   "kwargs": {}}
        self.variant, timm_name, self.default_exit_width = _variant(variant)
        self.num_classes = num_joints
        self.align_corners = False
        widths = self._take_trunk(timm_name, multi_scale_output=False)
        self.final_layer = nn.Conv2d(widths[0], num_joints, 1, bias=True)

    @staticmethod
    def _init_like_timm(module: nn.Module) -> None:
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        yl = self.stages(x)
        return self.final_layer(yl[0])


def hrnet_seg(variant: str = "w48", num_classes: int = 19, **kwargs) -> HRNetSeg:
    """Build an HRNetV2 segmentation network with random weights (see :class:`HRNetSeg`).

    Args:
        variant: a key of :data:`HRNET_VARIANTS` (``"w18_small_v2"``, ``"w48"``, ...; an
            ``"hrnet_"`` prefix is accepted).
        num_classes: number of output classes.
        **kwargs (Any): more arguments of :class:`HRNetSeg` (``align_corners``, ``fuse_upsampling``).

    Returns:
        The network; its logits are at a quarter of the input resolution.
    """
    return HRNetSeg(variant, num_classes, **kwargs)


def hrnet_pose(variant: str = "w32", num_joints: int = 16) -> HRNetPose:
    """Build an HRNet pose network with random weights (see :class:`HRNetPose`).

    Args:
        variant: a key of :data:`HRNET_VARIANTS` (the paper's pose network is ``"w32"``).
        num_joints: number of heatmaps (16 for MPII).

    Returns:
        The network; its heatmaps are at a quarter of the input resolution.
    """
    return HRNetPose(variant, num_joints)
