"""Per-exit evaluation of an anytime model: metrics, GFLOPs, skipped fraction and time per exit.

Each batch runs through :meth:`AnytimeModel.anytime` under ``torch.no_grad()``: with the default
``execution="auto"`` the masked convolutions run the sparse engine, so the GFLOPs and times are
what this input really costs with confidence adaptivity (they depend on the data: the masks do).
Metrics accumulate one confusion matrix per exit over the whole set; under DDP each process
evaluates its share and the matrices are summed before anything is divided.

The times leave out one-off costs: the first batch runs once untimed before the timed pass (the
compiled kernels' loading, weight packing, allocator pools, and the engine's kernel measuring for
the layer shapes it meets), and any kernel measuring still met later (a layer shape or mask only a
later image gives) is subtracted (:func:`anytimeify.masking.tune.measuring_seconds`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..masking.tune import measuring_seconds
from ..metrics import ExitMetrics, flip_test_average
from .distributed import DistInfo

_logger = logging.getLogger(__name__)

__all__ = ["ExitResult", "EvalReport", "evaluate"]


@dataclass
class ExitResult:
    """One exit's figures over the evaluation set (per image, averaged over images).

    Attributes:
        exit: exit number, 1-based.
        metrics: the metric's results (segmentation: ``miou``, ``acc``, ``iou`` in percent).
        paper_gflops: cumulative conv MACs / 2**30 up to this exit, the paper's count (masked convs
            by the paper's formula).
        gmacs: cumulative MACs actually executed / 1e9.
        skipped: fraction of positions this exit marks confident (0 for the last exit).
        seconds: cumulative compute time up to this exit's prediction (one-off costs left out).
    """

    exit: int
    metrics: Dict[str, object]
    paper_gflops: float
    gmacs: float
    skipped: float
    seconds: float


@dataclass
class EvalReport:
    """Per-exit results of one evaluation pass."""

    exits: List[ExitResult]
    images: int
    confidence: bool
    execution: str = "auto"
    extra: Dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _to(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    return value


def _warm_up(model: nn.Module, images: torch.Tensor) -> None:
    """One untimed pass over every exit: one-off costs (kernel loading and measuring, weight packing,
    first allocations) fall here, not in the timed pass."""
    for _ in model.anytime(images):
        pass
    if images.device.type == "cuda":
        torch.cuda.synchronize(images.device)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, metric: Callable[[], object], *, confidence: bool = True,
             batch_size: int = 1, workers: int = 0, device: Optional[torch.device] = None,
             max_images: Optional[int] = None, channels_last: bool = True, dist: Optional[DistInfo] = None,
             progress: Optional[Callable[[int], None]] = None,
             flip_pairs: Optional[Sequence[Sequence[int]]] = None) -> EvalReport:
    """Evaluate every exit of an anytime model on ``dataset``.

    Args:
        model: an :class:`~anytimeify.AnytimeModel` (a DDP wrapper is unwrapped).
        dataset: map-style, items ``(image, target)`` as the metric takes them.
        metric: factory of one exit's metric (e.g. ``lambda: SegmentationMetrics(19)``).
        confidence: with confidence adaptivity (if the model has it) or with every position computed.
        batch_size: images per forward pass (1 gives per-image times).
        workers: DataLoader workers.
        device: where to run (default: the model's).
        max_images: evaluate only the first this many images.
        channels_last: feed channels-last inputs.
        dist: process group info; each process evaluates ``dataset[rank::world_size]``.
        progress: called with the number of images done after each batch.
        flip_pairs: pose flip test: also run the mirrored image and average each exit's heatmaps
            with the mirrored ones flipped back, these joint pairs swapped and shifted one pixel
            (:func:`anytimeify.metrics.flip_test_average`). GFLOPs and times are those of one pass.

    Returns:
        An :class:`EvalReport`; under DDP every process gets the same, reduced over processes.
    """
    from ..model import AnytimeModel

    model = model.module if isinstance(getattr(model, "module", None), AnytimeModel) else model
    if not isinstance(model, AnytimeModel):
        raise TypeError(f"evaluate() takes an anytimeify.AnytimeModel, got {type(model).__name__}")
    device = device or next(model.parameters()).device
    dist = dist or DistInfo(device=device)
    n = len(dataset) if max_images is None else min(len(dataset), int(max_images))  # type: ignore[arg-type]
    share = Subset(dataset, list(range(dist.rank, n, dist.world_size)))
    loader = DataLoader(share, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda")
    metrics = ExitMetrics(metric, model.num_exits).to(device)
    had_confidence = model.confidence is not None and model.confidence.enabled
    was_training = model.training
    model.eval()
    if model.confidence is not None:
        model.set_confidence(confidence)
    sums = torch.zeros(4, model.num_exits, dtype=torch.float64)  # paper MACs, MACs, skipped, seconds
    images = 0
    try:
        warmed = False
        for batch_images, target in loader:
            batch_images = batch_images.to(device, non_blocking=True)
            if channels_last:
                batch_images = batch_images.contiguous(memory_format=torch.channels_last)
            target = _to(target, device)
            if not warmed:
                _warm_up(model, batch_images)
                warmed = True
            logits = []
            measured = measuring_seconds()
            for out in model.anytime(batch_images):
                logits.append(out.logits)
                # the engine's first-use kernel measuring inside this call is not the model's time
                seconds = out.elapsed - (measuring_seconds() - measured)
                sums[:, out.index - 1] += torch.tensor([out.paper_macs, out.macs,
                                                        out.skipped * len(batch_images), seconds],
                                                       dtype=torch.float64)
            if flip_pairs is not None:
                mirrored = [out.logits for out in model.anytime(batch_images.flip(-1))]
                logits = [flip_test_average(a, b, flip_pairs) for a, b in zip(logits, mirrored)]
            metrics.update(logits, target)
            images += len(batch_images)
            if progress is not None:
                progress(images)
        results = metrics.compute()
    finally:
        if model.confidence is not None:
            model.set_confidence(had_confidence)
        model.train(was_training)
    totals = torch.cat([sums.flatten(), torch.tensor([images], dtype=torch.float64)])
    if dist.distributed:
        import torch.distributed as torch_dist

        totals = totals.to(device)
        torch_dist.all_reduce(totals)
        totals = totals.cpu()
    count = max(1.0, float(totals[-1]))
    sums = totals[:-1].view(4, model.num_exits) / count
    exits = [ExitResult(i + 1, results[i], float(sums[0, i]) / 2 ** 30, float(sums[1, i]) / 1e9,
                        float(sums[2, i]) if i < model.num_exits - 1 else 0.0, float(sums[3, i]))
             for i in range(model.num_exits)]
    execution = model.confidence.execution if model.confidence is not None else "dense"
    return EvalReport(exits, int(totals[-1]), bool(confidence and model.confidence is not None), execution)
