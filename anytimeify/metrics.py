"""Per-exit evaluation metrics for anytime models, on torchmetrics (with its distributed sync).

* :class:`SegmentationMetrics`: a confusion matrix (torchmetrics' ``MulticlassConfusionMatrix``)
  from which mIoU, per-class IoU and pixel accuracy are read. Under DDP the *matrices* are summed
  across processes before anything is divided, so the result is the mIoU of the whole evaluation
  set, not a mean of per-process mIoUs (REFERENCE.md §6: one confusion matrix per exit).
* :class:`HeatmapPCK`: the percentage of correct keypoints of heatmap predictions, as HRNet pose
  measures it during training.
* :class:`ExitMetrics`: one metric per exit.

Figures are percentages, as the paper reports them.
"""
from __future__ import annotations

import copy
import logging
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.classification import MulticlassConfusionMatrix

_logger = logging.getLogger(__name__)

__all__ = ["SegmentationMetrics", "HeatmapPCK", "ExitMetrics", "miou_from_confusion"]


def miou_from_confusion(confusion: torch.Tensor) -> Dict[str, object]:
    """mIoU, per-class IoU and pixel accuracy (percent) from a ``(C, C)`` confusion matrix
    (rows: ground truth, columns: prediction).

    A class that appears neither in the labels nor in the predictions has no IoU (``nan`` in
    ``iou``) and is left out of the mean, as mmsegmentation and HRNet-Semantic-Segmentation do.
    """
    confusion = confusion.to(torch.float64)
    hits = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - hits
    iou = torch.where(union > 0, hits / union.clamp(min=1), torch.full_like(hits, float("nan")))
    total = confusion.sum()
    return {
        "miou": float(100 * iou.nanmean()) if bool((union > 0).any()) else float("nan"),
        "acc": float(100 * hits.sum() / total) if total > 0 else float("nan"),
        "iou": [float(100 * v) for v in iou],
    }


class SegmentationMetrics(Metric):
    """mIoU of a segmentation exit, from a confusion matrix accumulated over the evaluation set.

    Args:
        num_classes: number of classes.
        ignore_index: label of pixels that are not evaluated (255 on Cityscapes).
        align_corners: of the bilinear upsampling of logits to the label size.

    ``update(logits, target)`` takes logits ``(B, C, h, w)`` (upsampled bilinearly to the label
    size when smaller, as in the paper's evaluation) or class indices ``(B, H, W)``, and labels
    ``(B, H, W)``. ``compute()`` returns ``{"miou", "acc", "iou"}`` in percent.
    """

    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: Optional[int] = 255, align_corners: bool = False, **kwargs):
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.align_corners = align_corners
        self.confusion = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index, validate_args=False)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:  # type: ignore[override]
        if preds.dim() == 4:
            if preds.shape[1] != self.num_classes:
                raise ValueError(f"logits have {preds.shape[1]} classes, the metric {self.num_classes}")
            if preds.shape[-2:] != target.shape[-2:]:
                preds = F.interpolate(preds.float(), size=target.shape[-2:], mode="bilinear",
                                      align_corners=self.align_corners)
            preds = preds.argmax(dim=1)
        if preds.shape != target.shape:
            raise ValueError(f"predictions {tuple(preds.shape)} and labels {tuple(target.shape)} differ in shape")
        self.confusion.update(preds, target)

    def compute(self) -> Dict[str, object]:  # type: ignore[override]
        return miou_from_confusion(self.confusion.compute())

    def reset(self) -> None:
        super().reset()
        self.confusion.reset()


class HeatmapPCK(Metric):
    """Percentage of correct keypoints from heatmaps (HRNet pose's training accuracy).

    A joint is correct when the argmax of its predicted heatmap lies within ``threshold`` of the
    target heatmap's argmax, distances measured in units of a tenth of the heatmap size per axis
    (HRNet pose's ``accuracy()``); joints with target weight 0 are not counted. The MPII PCKh
    (head-size normalisation, flip test) is the evaluation of a real pose data set, not this.

    ``update(heatmaps, target)`` takes predictions ``(B, J, h, w)`` and the target dict
    ``{"heatmaps": (B, J, h, w), "weights": (B, J)}``; ``compute()`` returns ``{"pck": percent}``.
    """

    full_state_update = False

    def __init__(self, threshold: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.threshold = float(threshold)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.float64), dist_reduce_fx="sum")

    @staticmethod
    def _peaks(heatmaps: torch.Tensor) -> torch.Tensor:
        b, j, h, w = heatmaps.shape
        flat = heatmaps.reshape(b, j, h * w).argmax(dim=-1)
        return torch.stack([flat % w, torch.div(flat, w, rounding_mode="floor")], dim=-1).to(torch.float64)

    def update(self, preds: torch.Tensor, target: Mapping[str, torch.Tensor]) -> None:  # type: ignore[override]
        heatmaps = target["heatmaps"]
        if preds.shape != heatmaps.shape:
            raise ValueError(f"predicted heatmaps {tuple(preds.shape)} and targets {tuple(heatmaps.shape)} differ")
        h, w = preds.shape[-2:]
        norm = torch.tensor([w / 10.0, h / 10.0], dtype=torch.float64, device=preds.device)
        dist = ((self._peaks(preds.detach()) - self._peaks(heatmaps)) / norm).norm(dim=-1)
        counted = target["weights"].reshape(dist.shape) > 0
        self.correct += ((dist <= self.threshold) & counted).sum()
        self.total += counted.sum()

    def compute(self) -> Dict[str, object]:  # type: ignore[override]
        return {"pck": float(100 * self.correct / self.total) if self.total > 0 else float("nan")}


class ExitMetrics:
    """One metric object per exit, updated with every exit's predictions at once.

    Args:
        metric: a metric to copy for each exit, or a factory ``fn() -> Metric``.
        num_exits: number of exits.

    ``compute()`` returns one dict per exit (synchronised across processes by torchmetrics).
    """

    def __init__(self, metric: Union[Metric, Callable[[], Metric]], num_exits: int):
        make = metric if callable(metric) and not isinstance(metric, Metric) else (lambda: copy.deepcopy(metric))
        self.metrics: List[Metric] = [make() for _ in range(num_exits)]

    def to(self, device: Union[str, torch.device]) -> "ExitMetrics":
        self.metrics = [m.to(device) for m in self.metrics]
        return self

    def update(self, outputs: Sequence[torch.Tensor], target) -> None:
        if len(outputs) != len(self.metrics):
            raise ValueError(f"got {len(outputs)} exit outputs for {len(self.metrics)} metrics")
        for metric, out in zip(self.metrics, outputs):
            metric.update(out, target)

    def compute(self) -> List[Dict[str, object]]:
        return [m.compute() for m in self.metrics]

    def reset(self) -> None:
        for m in self.metrics:
            m.reset()

    def __len__(self) -> int:
        return len(self.metrics)
