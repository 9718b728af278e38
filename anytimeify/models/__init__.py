"""Built-in dense-prediction networks, by name.

``create_model("hrnet_w48", num_classes=19)`` builds HRNetV2-W48 for segmentation;
``create_model("hrnet_w32_pose")`` builds the HRNet-W32 pose network (16 joints); both are base
networks for :func:`anytimeify.convert`. ``create_model("ranet_cifar10")`` (``ranet_cifar100``,
``ranet_imagenet``) builds RANet, which has its exits already, as an :class:`anytimeify.AnytimeModel`
(:func:`anytimeify.from_exits`).
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch.nn as nn

from .hrnet import HRNET_VARIANTS, HRNetPose, HRNetSeg, hrnet_pose, hrnet_seg
from .ranet import RANET_VARIANTS, RANet, RANetConfig, ranet, ranet_ops
from .timm_seg import TimmSegmenter, timm_segmenter  # noqa: F401  (public API)

__all__ = ["HRNetSeg", "HRNetPose", "hrnet_seg", "hrnet_pose", "TimmSegmenter", "timm_segmenter",
           "create_model", "list_models", "HRNET_VARIANTS", "RANet", "RANetConfig", "ranet", "ranet_ops",
           "RANET_VARIANTS"]


def _anytime_ranet(variant: str, num_classes=None):
    from ..convert import from_exits

    return from_exits(ranet(variant, num_classes))


def _registry() -> Dict[str, Callable[..., nn.Module]]:
    reg: Dict[str, Callable[..., nn.Module]] = {}
    for variant in HRNET_VARIANTS:
        reg[f"hrnet_{variant}"] = lambda num_classes=19, _v=variant: hrnet_seg(_v, num_classes)
        reg[f"hrnet_{variant}_pose"] = lambda num_classes=16, _v=variant: hrnet_pose(_v, num_classes)
    for variant in RANET_VARIANTS:
        reg[f"ranet_{variant}"] = lambda num_classes=None, _v=variant: _anytime_ranet(_v, num_classes)
    return reg


def list_models() -> List[str]:
    """Names :func:`create_model` accepts."""
    return sorted(_registry())


def create_model(name: str, num_classes: int | None = None) -> nn.Module:
    """Build a built-in network by name with random weights.

    Args:
        name: one of :func:`list_models` (e.g. ``hrnet_w48``, ``hrnet_w18_small_v2``, ``hrnet_w32_pose``,
            ``ranet_cifar10``).
        num_classes: classes (segmentation, default 19; RANet: its data set's) or joints (pose, default 16).

    Returns:
        ``hrnet_<variant>``: an :class:`HRNetSeg`; ``hrnet_<variant>_pose``: an :class:`HRNetPose`
            (base networks for :func:`anytimeify.convert`); ``ranet_cifar10``, ``ranet_cifar100``,
            ``ranet_imagenet``: RANet as an anytime model (:func:`anytimeify.from_exits`).

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    reg = _registry()
    if name not in reg:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    return reg[name]() if num_classes is None else reg[name](num_classes)
