"""Losses of anytime models: one loss per exit, summed with weights (REFERENCE.md §2).

* :class:`SegmentationLoss`: cross-entropy on logits upsampled bilinearly to the label size,
  optional class weights, an ignore label (HRNet-Semantic-Segmentation's ``CrossEntropy``; no OHEM).
* :class:`HeatmapMSELoss`: HRNet pose's ``JointsMSELoss`` (MSE per joint, weighted by the joint's
  target weight, halved and averaged over joints).
* :class:`MultiExitLoss`: ``sum_i w_i * loss(exit_i, target)`` with any per-exit loss callable;
  all ``w_i = 1`` in the paper.
"""
from __future__ import annotations

import logging
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

_logger = logging.getLogger(__name__)

__all__ = ["SegmentationLoss", "HeatmapMSELoss", "MultiExitLoss"]


class SegmentationLoss(nn.Module):
    """Class-weighted cross-entropy with an ignore label on logits upsampled to the label size.

    Args:
        class_weights: one weight per class (None: unweighted).
        ignore_index: label that contributes nothing (255 on Cityscapes).
        align_corners: of the bilinear upsampling (False, as the reference's ADP-C model).

    ``forward(logits (B, C, h, w), labels (B, H, W) int64)`` returns the mean over labelled pixels
    (weighted by their classes' weights, as ``F.cross_entropy`` does).
    """

    def __init__(self, class_weights: Optional[Sequence[float]] = None, ignore_index: int = 255,
                 align_corners: bool = False):
        super().__init__()
        weight = torch.as_tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        if weight is not None and (weight.dim() != 1 or (weight < 0).any()):
            raise ValueError(f"class_weights must be one non-negative number per class, got {class_weights!r}")
        self.register_buffer("class_weights", weight, persistent=False)
        self.ignore_index = int(ignore_index)
        self.align_corners = align_corners

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 4 or target.dim() != 3:
            raise ValueError(f"expected logits (B, C, h, w) and labels (B, H, W), got {tuple(logits.shape)} "
                             f"and {tuple(target.shape)}")
        if self.class_weights is not None and self.class_weights.numel() != logits.shape[1]:
            raise ValueError(f"class_weights has {self.class_weights.numel()} values for {logits.shape[1]} classes")
        if logits.shape[-2:] != target.shape[-2:]:
            logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        weight = self.class_weights.to(logits.dtype) if self.class_weights is not None else None
        # the loss in float32 whatever the autocast dtype: log-softmax over classes needs the range
        return F.cross_entropy(logits.float(), target, weight=None if weight is None else weight.float(),
                               ignore_index=self.ignore_index)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, class_weights={self.class_weights is not None}"


class HeatmapMSELoss(nn.Module):
    """HRNet pose's ``JointsMSELoss``: ``mean_j 0.5 * MSE(pred_j * w_j, target_j * w_j)``.

    Args:
        use_target_weight: multiply each joint's heatmaps by its target weight (0 for joints that
            are not visible), as the MPII recipe does.

    ``forward(heatmaps (B, J, h, w), {"heatmaps": (B, J, h, w), "weights": (B, J)})``.
    """

    def __init__(self, use_target_weight: bool = True):
        super().__init__()
        self.use_target_weight = use_target_weight

    def forward(self, pred: torch.Tensor, target: Mapping[str, torch.Tensor]) -> torch.Tensor:
        heatmaps = target["heatmaps"]
        if pred.shape != heatmaps.shape:
            raise ValueError(f"predicted heatmaps {tuple(pred.shape)} and targets {tuple(heatmaps.shape)} differ; "
                             "build the targets at the model's output size (a quarter of the input for HRNet)")
        pred = pred.float()
        if self.use_target_weight:
            weights = target["weights"].to(pred.dtype).reshape(*pred.shape[:2], 1, 1)
            pred, heatmaps = pred * weights, heatmaps * weights
        per_joint = ((pred - heatmaps) ** 2).mean(dim=(0, 2, 3))
        return 0.5 * per_joint.mean()


class MultiExitLoss(nn.Module):
    """``sum_i w_i * loss(outputs[i], target)`` over the exits of an anytime model.

    Args:
        loss: the per-exit loss, any callable ``(prediction, target) -> scalar tensor``.
        exit_weights: one weight per exit; None: 1 for every exit (the paper).

    ``forward(outputs, target)`` returns ``(total, per_exit)``: the weighted sum (for backward)
    and the unweighted per-exit losses, detached (for logging).
    """

    def __init__(self, loss: Callable[..., torch.Tensor], exit_weights: Optional[Sequence[float]] = None):
        super().__init__()
        if not callable(loss):
            raise TypeError(f"loss must be callable, got {type(loss).__name__}")
        self.loss = loss
        self.exit_weights = None if exit_weights is None else [float(w) for w in exit_weights]

    def forward(self, outputs: Sequence[torch.Tensor], target) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        if isinstance(outputs, torch.Tensor):
            outputs = [outputs]
        weights = self.exit_weights if self.exit_weights is not None else [1.0] * len(outputs)
        if len(weights) != len(outputs):
            raise ValueError(f"exit_weights has {len(weights)} values but the model has {len(outputs)} exits")
        losses = [self.loss(out, target) for out in outputs]
        total = sum(w * l for w, l in zip(weights, losses))
        return total, [l.detach() for l in losses]

    def extra_repr(self) -> str:
        return f"exit_weights={self.exit_weights or 'all 1'}"
