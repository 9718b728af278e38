"""Metrics: mIoU from confusion matrices (hand-computed expectations), PCK, one metric per exit."""
import math

import pytest
import torch

from anytimeify.metrics import ExitMetrics, HeatmapPCK, SegmentationMetrics, miou_from_confusion


def test_miou_of_a_hand_counted_example():
    metric = SegmentationMetrics(3, ignore_index=255)
    target = torch.tensor([[0, 0, 1, 1, 2, 255]])
    preds = torch.tensor([[0, 1, 1, 1, 0, 2]])
    metric.update(preds, target)
    result = metric.compute()
    # IoU: class 0 1/(2+2-1), class 1 2/(2+3-2), class 2 0/(1+0-0); accuracy 3 of 5 labelled pixels
    assert result["iou"] == pytest.approx([100 / 3, 200 / 3, 0.0])
    assert result["miou"] == pytest.approx(100 / 3)
    assert result["acc"] == pytest.approx(60.0)


def test_classes_absent_from_labels_and_predictions_are_left_out_of_the_mean():
    confusion = torch.tensor([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    result = miou_from_confusion(confusion)
    assert math.isnan(result["iou"][3])
    assert result["miou"] == pytest.approx(100 / 3)


def test_logits_are_upsampled_to_the_label_size_before_the_argmax():
    metric = SegmentationMetrics(2, ignore_index=None)
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 0, :, 0] = 5.0  # left column says class 0,
    logits[0, 1, :, 1] = 5.0  # right column class 1: bilinearly, the boundary falls between columns 3 and 4
    target = torch.zeros(1, 8, 8, dtype=torch.int64)
    target[0, :, 4:] = 1
    metric.update(logits, target)
    assert metric.compute()["miou"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="classes"):
        metric.update(torch.zeros(1, 3, 2, 2), target)


def test_heatmap_pck_counts_joints_within_half_a_tenth_of_the_map():
    pred = torch.zeros(1, 2, 10, 10)
    pred[0, 0, 3, 2] = 1.0  # joint 0 at x 2, y 3: on target
    pred[0, 1, 5, 5] = 1.0  # joint 1 at x 5: two cells from its target
    target = torch.zeros(1, 2, 10, 10)
    target[0, 0, 3, 2] = 1.0
    target[0, 1, 5, 7] = 1.0
    metric = HeatmapPCK()
    metric.update(pred, {"heatmaps": target, "weights": torch.tensor([[1.0, 1.0]])})
    assert metric.compute()["pck"] == pytest.approx(50.0)
    unweighted = HeatmapPCK()
    unweighted.update(pred, {"heatmaps": target, "weights": torch.tensor([[1.0, 0.0]])})
    assert unweighted.compute()["pck"] == pytest.approx(100.0)


def test_exit_metrics_keep_one_confusion_matrix_per_exit():
    metrics = ExitMetrics(lambda: SegmentationMetrics(2, ignore_index=None), num_exits=2)
    target = torch.tensor([[0, 1]])
    metrics.update([torch.tensor([[1, 0]]), torch.tensor([[0, 1]])], target)
    first, second = metrics.compute()
    assert first["miou"] == 0.0 and second["miou"] == 100.0
    metrics.reset()
    metrics.update([torch.tensor([[0, 1]]), torch.tensor([[0, 1]])], target)
    assert metrics.compute()[0]["miou"] == 100.0
    with pytest.raises(ValueError, match="2 metrics"):
        metrics.update([torch.tensor([[0, 1]])], target)
