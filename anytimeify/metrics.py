"""Per-exit evaluation metrics for anytime models, on torchmetrics (with its distributed sync).

* :class:`SegmentationMetrics`: a confusion matrix (torchmetrics' ``MulticlassConfusionMatrix``)
  from which mIoU, per-class IoU and pixel accuracy are read. Under DDP the *matrices* are summed
  across processes before anything is divided, so the result is the mIoU of the whole evaluation
  set, not a mean of per-process mIoUs (REFERENCE.md §6: one confusion matrix per exit).
* :class:`HeatmapPCK`: the percentage of correct keypoints of heatmap predictions, as HRNet pose
  measures it during training.
* :class:`MPIIPCKh`: the MPII benchmark's PCKh of heatmap predictions, evaluated as the HRNet pose
  code evaluates it (:func:`final_predictions` back to image coordinates, then :func:`mpii_pckh`);
  :func:`flip_test_average` is its flip test.
* :class:`ExitMetrics`: one metric per exit.

Figures are percentages, as the paper reports them.
"""
from __future__ import annotations

import copy
import logging
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.classification import MulticlassConfusionMatrix

_logger = logging.getLogger(__name__)

__all__ = [
    "SegmentationMetrics", "HeatmapPCK", "ExitMetrics", "miou_from_confusion", "final_predictions", "flip_back",
    "flip_test_average", "mpii_pckh", "MPIIPCKh",
]


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


# ----------------------------------------------------------------------------------------------
# MPII PCKh (the HRNet pose code's evaluation)

MPII_SC_BIAS = 0.6
"""The MPII benchmark's head size is 0.6 times the diagonal of the annotated head box."""

_PCKH_GROUPS = (("Shoulder", "lsho", "rsho"), ("Elbow", "lelb", "relb"), ("Wrist", "lwri", "rwri"),
                ("Hip", "lhip", "rhip"), ("Knee", "lkne", "rkne"), ("Ankle", "lank", "rank"))
_PCKH_KEYS = ("Head", "Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle", "Mean", "Mean@0.1")


def final_predictions(heatmaps: torch.Tensor, center, scale) -> Tuple[torch.Tensor, torch.Tensor]:
    """Joint positions in original-image pixels from heatmaps (HRNet pose's ``get_final_preds``).

    Each joint is placed at the argmax of its heatmap (the first one on ties; the crop's corner
    ``(0, 0)`` where the maximum is not positive), moved a quarter pixel towards the higher of its
    two neighbours along each axis where it is not within two pixels of the border
    (``1 < x < w - 1`` and ``1 < y < h - 1``), and mapped back through the crop's transform
    (:func:`anytimeify.data.mpii.crop_affine`, rotation 0: the crop of ``center`` and
    ``scale``).

    Args:
        heatmaps: ``(B, J, h, w)`` network output.
        center (Tensor | ndarray): ``(B, 2)`` crop centres, 0-based image pixels (the data set's ``target["center"]``).
        scale (Tensor | ndarray): ``(B, 2)`` or ``(B,)`` crop sizes in units of 200 pixels (``target["scale"]``).

    Returns:
        ``(predictions, maxvals)``: float64 ``(B, J, 2)`` 0-based ``(x, y)`` image coordinates and
            the heatmap maxima ``(B, J)``, both on the heatmaps' device.
    """
    from .data.mpii import crop_affine

    if heatmaps.dim() != 4:
        raise ValueError(f"heatmaps must be (B, J, h, w), got shape {tuple(heatmaps.shape)}")
    if not heatmaps.is_floating_point():
        raise ValueError(f"heatmaps must be floating point, got {heatmaps.dtype}")
    hm = heatmaps.detach()
    if hm.dtype not in (torch.float32, torch.float64):
        hm = hm.float()
    b, j, h, w = hm.shape
    centers = _as_float64_rows(center, b, 2, "center")
    scales = _as_float64_rows(scale, b, 2, "scale", allow_scalar=True)

    flat = hm.reshape(b, j, h * w)
    idx = flat.argmax(dim=-1)
    maxvals = flat.gather(-1, idx[..., None])[..., 0]
    x, y = idx % w, torch.div(idx, w, rounding_mode="floor")
    positive = maxvals > 0
    x, y = x * positive, y * positive
    coords = torch.stack([x, y], dim=-1).to(torch.float64)

    # quarter-pixel step towards the higher neighbour, away from the border
    inner = (x > 1) & (x < w - 1) & (y > 1) & (y < h - 1)
    xp, xm = (x + 1).clamp(max=w - 1), (x - 1).clamp(min=0)
    yp, ym = (y + 1).clamp(max=h - 1), (y - 1).clamp(min=0)

    def at(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        return flat.gather(-1, (yy * w + xx)[..., None])[..., 0]

    diff = torch.stack([at(y, xp) - at(y, xm), at(yp, x) - at(ym, x)], dim=-1)
    coords = coords + torch.sign(diff).to(torch.float64) * 0.25 * inner[..., None]

    mats = torch.from_numpy(np.stack([crop_affine(centers[i], scales[i], 0.0, (h, w), inverse=True)
                                      for i in range(b)])) if b else torch.zeros(0, 2, 3, dtype=torch.float64)
    mats = mats.to(coords.device)
    preds = torch.einsum("bkl,bjl->bjk", mats[:, :, :2], coords) + mats[:, None, :, 2]
    return preds, maxvals


def _as_float64_rows(value, batch: int, width: int, name: str, allow_scalar: bool = False) -> np.ndarray:
    arr = value.detach().cpu().to(torch.float64).numpy() if isinstance(value, torch.Tensor) else \
        np.asarray(value, dtype=np.float64)
    if allow_scalar and arr.shape == (batch,):
        arr = np.repeat(arr[:, None], width, axis=1)
    if arr.shape != (batch, width):
        raise ValueError(f"{name} must be ({batch}, {width}) for {batch} heatmaps, got shape {arr.shape}")
    return arr


def flip_back(heatmaps: torch.Tensor, flip_pairs: Sequence[Sequence[int]]) -> torch.Tensor:
    """Heatmaps of a horizontally flipped input, mirrored back and with left/right joints swapped
    (HRNet pose's ``flip_back``), so that they line up with the unflipped input's heatmaps.

    Args:
        heatmaps: ``(B, J, h, w)`` output for the flipped input.
        flip_pairs: joint index pairs that swap (:data:`anytimeify.data.mpii.MPII_FLIP_PAIRS`).

    Returns:
        A new ``(B, J, h, w)`` tensor.
    """
    if heatmaps.dim() != 4:
        raise ValueError(f"heatmaps must be (B, J, h, w), got shape {tuple(heatmaps.shape)}")
    count = heatmaps.shape[1]
    order = list(range(count))
    for a, b in flip_pairs:
        if max(a, b) >= count:
            raise ValueError(f"flip pair {(a, b)} names a joint beyond the {count} heatmaps")
        order[a], order[b] = b, a
    return heatmaps.flip(-1)[:, order]


def flip_test_average(heatmaps: torch.Tensor, flipped_heatmaps: torch.Tensor, flip_pairs: Sequence[Sequence[int]],
                      shift: bool = True) -> torch.Tensor:
    """HRNet pose's flip test: the mean of the heatmaps and the flipped input's heatmaps brought back.

    Args:
        heatmaps: ``(B, J, h, w)`` output for the input.
        flipped_heatmaps: ``(B, J, h, w)`` output for the horizontally flipped input.
        flip_pairs: joint index pairs that swap.
        shift: move the flipped-back heatmaps one pixel to the right (the first column keeps its
            value) before averaging, as HRNet pose does (``TEST.SHIFT_HEATMAP``) because a
            flipped input's features are not aligned with the input's.

    Returns:
        ``(heatmaps + flipped_back) * 0.5``.
    """
    if heatmaps.shape != flipped_heatmaps.shape:
        raise ValueError(f"heatmaps {tuple(heatmaps.shape)} and flipped heatmaps {tuple(flipped_heatmaps.shape)} "
                         "differ in shape")
    back = flip_back(flipped_heatmaps, flip_pairs)
    if shift:
        back = torch.cat([back[..., :1], back[..., :-1]], dim=-1)
    return (heatmaps + back) * 0.5


def _mpii_gt(path) -> Dict[str, object]:
    """Load and check the MPII ground truth (``annot/gt_valid.mat``)."""
    from pathlib import Path

    from scipy.io import loadmat

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MPII ground truth {str(path)!r} does not exist (it is annot/gt_valid.mat of "
                                "the HRNet pose data layout)")
    try:
        gt = loadmat(str(path))
    # scipy raises NotImplementedError for MATLAB v7.3 (HDF5) files, ValueError/OSError/TypeError for others
    except (ValueError, OSError, TypeError, NotImplementedError) as err:
        raise ValueError(f"cannot read MPII ground truth {str(path)!r} as a MATLAB file: {err}") from err
    needed = ("dataset_joints", "jnt_missing", "pos_gt_src", "headboxes_src")
    missing = [k for k in needed if k not in gt]
    if missing:
        raise ValueError(f"MPII ground truth {str(path)!r} lacks {', '.join(repr(k) for k in missing)}; it must "
                         "hold dataset_joints (16 names), jnt_missing (16, N), pos_gt_src (16, 2, N) and "
                         "headboxes_src (2, 2, N)")
    names = [_mat_string(v) for v in np.asarray(gt["dataset_joints"], dtype=object).ravel()]
    jnt_missing = np.asarray(gt["jnt_missing"], dtype=np.float64)
    pos_gt_src = np.asarray(gt["pos_gt_src"], dtype=np.float64)
    headboxes_src = np.asarray(gt["headboxes_src"], dtype=np.float64)
    count = jnt_missing.shape[-1] if jnt_missing.ndim == 2 else -1
    expected = {"jnt_missing": (jnt_missing, (16, count)), "pos_gt_src": (pos_gt_src, (16, 2, count)),
                "headboxes_src": (headboxes_src, (2, 2, count))}
    for key, (arr, shape) in expected.items():
        if arr.shape != shape or count < 0:
            raise ValueError(f"MPII ground truth {str(path)!r}: {key} has shape {arr.shape}; expected "
                             "jnt_missing (16, N), pos_gt_src (16, 2, N), headboxes_src (2, 2, N) with one N")
    index = {}
    for _, *joints in (("Head", "head"),) + _PCKH_GROUPS:
        for name in joints:
            if name not in names:
                raise ValueError(f"MPII ground truth {str(path)!r}: dataset_joints has no {name!r} (it names "
                                 f"{names})")
            index[name] = names.index(name)
    return {"path": str(path), "index": index, "jnt_missing": jnt_missing, "pos_gt_src": pos_gt_src,
            "headboxes_src": headboxes_src}


def _mat_string(value) -> str:
    """A name of ``dataset_joints``: ``loadmat`` gives a cell array of 1-element string arrays."""
    while isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(-1)[0]
    return str(value)


def _pckh_from_gt(predictions, gt: Dict[str, object], threshold: float, indices) -> Dict[str, float]:
    path = gt["path"]
    preds = predictions.detach().cpu().to(torch.float64).numpy() if isinstance(predictions, torch.Tensor) else \
        np.asarray(predictions, dtype=np.float64)
    jnt_missing, pos_gt_src, headboxes_src = gt["jnt_missing"], gt["pos_gt_src"], gt["headboxes_src"]
    total = jnt_missing.shape[1]
    if indices is not None:
        idx = indices.detach().cpu().numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise ValueError(f"indices must be a 1-D sequence of integers, got shape {idx.shape} {idx.dtype}")
        if idx.size and (idx.min() < 0 or idx.max() >= total):
            raise ValueError(f"indices must lie in [0, {total}) (the records of {path!r}), got "
                             f"{int(idx.min())}..{int(idx.max())}")
        idx = idx.astype(np.int64)
        jnt_missing, pos_gt_src, headboxes_src = jnt_missing[:, idx], pos_gt_src[..., idx], headboxes_src[..., idx]
    count = jnt_missing.shape[1]
    if preds.ndim != 3 or preds.shape[0] != count or preds.shape[1] != 16 or preds.shape[2] not in (2, 3):
        which = "records selected by indices" if indices is not None else "records"
        raise ValueError(f"predictions must be (N, 16, 2) with N = {count} (the {which} of {path!r}), got shape "
                         f"{preds.shape}")

    with np.errstate(divide="ignore", invalid="ignore"):
        pos_pred_src = np.transpose(preds[:, :, 0:2] + 1.0, [1, 2, 0])  # 0-based to MATLAB's 1-based
        jnt_visible = 1 - jnt_missing
        uv_err = np.linalg.norm(pos_pred_src - pos_gt_src, axis=1)
        headsizes = np.linalg.norm(headboxes_src[1, :, :] - headboxes_src[0, :, :], axis=0) * MPII_SC_BIAS
        scaled_uv_err = uv_err / (headsizes * np.ones((len(uv_err), 1))) * jnt_visible
        jnt_count = np.sum(jnt_visible, axis=1)

        def pck(t: float) -> np.ndarray:
            return 100.0 * np.sum((scaled_uv_err <= t) * jnt_visible, axis=1) / jnt_count

        pckh = pck(threshold)
        # "Mean@0.1" is entry 11 of HRNet pose's 0.01-step threshold range: the threshold 0.11
        pck_low = pck(np.arange(0, 0.5 + 0.01, 0.01)[11])
        pckh = np.ma.array(pckh, mask=False)
        pckh.mask[6:8] = True  # pelvis and thorax are not part of the mean
        masked_count = np.ma.array(jnt_count, mask=False)
        masked_count.mask[6:8] = True
        jnt_ratio = masked_count / np.sum(masked_count).astype(np.float64)
        index = gt["index"]
        result = {"Head": pckh[index["head"]]}
        for group, left, right in _PCKH_GROUPS:
            result[group] = 0.5 * (pckh[index[left]] + pckh[index[right]])
        result["Mean"] = np.sum(pckh * jnt_ratio)
        result["Mean@0.1"] = np.sum(pck_low * jnt_ratio)
    return {k: (float("nan") if v is np.ma.masked else float(v)) for k, v in result.items()}


def mpii_pckh(predictions, gt_valid_mat_path, threshold: float = 0.5, indices=None) -> Dict[str, float]:
    """The MPII PCKh of joint predictions, computed as HRNet pose's ``MPIIDataset.evaluate`` does.

    A joint is correct when it lies within ``threshold`` head sizes of the ground truth, a head
    size being 0.6 times the diagonal of the annotated head box; joints marked missing are not
    counted. Per joint group (left and right averaged), ``Mean`` is the percentage over all
    counted joints but pelvis and thorax, and ``Mean@0.1`` the same at HRNet pose's low threshold,
    which is entry 11 of ``np.arange(0, 0.51, 0.01)``, i.e. 0.11 (the name is HRNet pose's).

    A joint that is missing in every evaluated record has no PCKh (``nan``); as in the HRNet
    pose code, a group and the means that include such a joint are then ``nan`` too.

    Args:
        predictions (Tensor | ndarray): ``(N, 16, 2)`` 0-based ``(x, y)`` original-image pixels (NumPy or torch;
            :func:`final_predictions`), in the order of the ground truth's records (or of
            ``indices``).
        gt_valid_mat_path (str | PathLike): the ground truth file (``annot/gt_valid.mat``).
        threshold: in head sizes.
        indices (Sequence[int] | None): evaluate only these records of the ground truth (``predictions[k]`` belongs to
            record ``indices[k]``); None: all, in order.

    Returns:
        ``{"Head", "Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle", "Mean", "Mean@0.1"}``, percent.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file lacks a key or has wrong shapes, or ``predictions`` / ``indices`` do
            not fit it; the message names the path.
    """
    return _pckh_from_gt(predictions, _mpii_gt(gt_valid_mat_path), float(threshold), indices)


class MPIIPCKh(Metric):
    """The MPII PCKh of heatmap predictions over an evaluation set (:func:`mpii_pckh`).

    Args:
        gt_valid_mat (str | PathLike): the ground truth file (``annot/gt_valid.mat``), read and checked here.
        threshold: in head sizes.

    ``update(heatmaps, target)`` takes heatmaps ``(B, 16, h, w)`` (after :func:`flip_test_average`
    for the flip test) and the data set's target dict with ``center``, ``scale`` and ``index``
    (:class:`anytimeify.data.mpii.MPIIDataset`); it keeps the :func:`final_predictions` and the
    record indices, which torchmetrics gathers across processes. ``compute()`` orders them by
    record, keeps one prediction per record (a ``DistributedSampler`` may repeat records to even
    out the processes' shares) and returns :func:`mpii_pckh` on exactly the records seen, with
    ``"pckh"`` equal to ``"Mean"``; all ``nan`` before any update.
    """

    full_state_update = False

    def __init__(self, gt_valid_mat, threshold: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.gt_valid_mat = str(gt_valid_mat)
        self.threshold = float(threshold)
        self._gt = _mpii_gt(gt_valid_mat)
        self.add_state("predictions", default=[], dist_reduce_fx="cat")
        self.add_state("indices", default=[], dist_reduce_fx="cat")

    def update(self, heatmaps: torch.Tensor, target: Mapping[str, torch.Tensor]) -> None:  # type: ignore[override]
        for key in ("center", "scale", "index"):
            if key not in target:
                raise ValueError(f"MPIIPCKh needs target[{key!r}] (the MPII data set's targets have it)")
        preds, _ = final_predictions(heatmaps, target["center"], target["scale"])
        index = torch.as_tensor(target["index"]).reshape(-1).to(device=preds.device, dtype=torch.int64)
        if index.numel() != preds.shape[0]:
            raise ValueError(f"{preds.shape[0]} heatmaps but {index.numel()} record indices")
        self.predictions.append(preds)
        self.indices.append(index)

    def compute(self) -> Dict[str, float]:  # type: ignore[override]
        from torchmetrics.utilities import dim_zero_cat

        if isinstance(self.indices, list) and not self.indices:
            return {key: float("nan") for key in _PCKH_KEYS + ("pckh",)}
        preds, index = dim_zero_cat(self.predictions), dim_zero_cat(self.indices)
        order = torch.argsort(index, stable=True)
        preds, index = preds[order], index[order]
        first = torch.ones_like(index, dtype=torch.bool)
        first[1:] = index[1:] != index[:-1]
        result = _pckh_from_gt(preds[first], self._gt, self.threshold, index[first])
        result["pckh"] = result["Mean"]
        return result
