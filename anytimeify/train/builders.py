"""From a :class:`~anytimeify.train.TrainConfig` to the objects of a run: model, data, loss, metric."""
from __future__ import annotations

import importlib
import logging
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from .config import ConfigError, TrainConfig
from .losses import HeatmapMSELoss, MultiExitLoss, SegmentationLoss

_logger = logging.getLogger(__name__)

__all__ = ["build_model", "build_datasets", "build_val_dataset", "build_loss", "build_metric", "import_object", "flip_pairs_of"]


def import_object(path: str, what: str) -> Any:
    """``"package.module:attribute"`` (or ``"package.module:Class.attribute"``) -> the attribute
    (a clear error otherwise)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{what} {path!r} must be a known name or 'package.module:callable'")
    try:
        found = importlib.import_module(module_name)
        for part in attr.split("."):
            found = getattr(found, part)
        return found
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"cannot import {what} {path!r}: {err}") from err


def build_base_model(cfg: TrainConfig) -> nn.Module:
    """The network before conversion, with the ImageNet backbone loaded if one is configured."""
    from ..models import create_model, list_models

    mc = cfg.model
    if mc.name in list_models():
        if mc.kwargs:
            raise ConfigError(f"model.kwargs is for 'module:callable' models; built-in {mc.name!r} takes only "
                              "num_classes")
        net = create_model(mc.name, mc.num_classes)
    else:
        factory = import_object(mc.name, "model")
        kwargs = dict(mc.kwargs)
        if mc.num_classes is not None:
            kwargs.setdefault("num_classes", mc.num_classes)
        net = factory(**kwargs)
        if not isinstance(net, nn.Module):
            raise ConfigError(f"model {mc.name!r} returned {type(net).__name__}, not an nn.Module")
    if mc.backbone:
        from ..checkpoint import load_backbone

        loaded = load_backbone(net, mc.backbone)
        _logger.info("backbone: %d tensors from %s", len(loaded.loaded), mc.backbone)
    return net


def build_model(cfg: TrainConfig, seed: Optional[int] = None):
    """Build, (optionally) initialise from the backbone checkpoint, and convert the model of ``cfg``.

    The weights are drawn from ``torch.manual_seed(seed if given else cfg.seed)``, so every process
    of a DDP run starts from the same model.
    """
    import anytimeify

    torch.manual_seed(cfg.seed if seed is None else seed)
    net = build_base_model(cfg)
    if isinstance(net, anytimeify.AnytimeModel):  # a network with its own exits (RANet)
        if cfg.confidence.enabled:
            raise ConfigError(f"model {cfg.model.name!r} has its own exits and no spatial confidence adaptivity; set "
                              "confidence.enabled: false")
        return net.train()
    confidence = None
    cc = cfg.confidence
    if cc.enabled:
        confidence = anytimeify.Confidence(threshold=cc.threshold, criterion=cc.criterion, execution=cc.execution)
    model = anytimeify.convert(net, exits=cfg.model.exits, head=cfg.model.head, width=cfg.model.width,
                               confidence=confidence)
    if model.confidence is not None:
        model.set_confidence(cc.start_epoch == 0)
    return model.train()


def _transform(cfg: TrainConfig, spec: Dict[str, Any], train: bool):
    from ..data import pose_transforms, segmentation_transforms

    options = dict(spec.get("transforms") or {})
    if cfg.task == "segmentation":
        options.setdefault("ignore_index", cfg.loss.ignore_index)
        try:
            return segmentation_transforms(train, **options)
        except TypeError as err:
            raise ConfigError(f"data transforms {sorted(options)}: {err}") from err
    if cfg.task == "pose":
        try:
            return pose_transforms(train, **options)
        except TypeError as err:
            raise ConfigError(f"data transforms {sorted(options)}: {err}") from err
    if options:
        raise ConfigError("task 'custom' takes no data transforms; give the data set factory its own")
    return None


def _dataset(cfg: TrainConfig, spec: Dict[str, Any], split: str, train: bool) -> Dataset:
    from ..data import OWN_GEOMETRY, create_dataset

    options = {k: v for k, v in spec.items() if k not in ("name", "transforms", "split")}
    if spec["name"] in OWN_GEOMETRY:
        # the data set crops and augments itself: its transform options are its own arguments
        options.update(spec.get("transforms") or {})
        return create_dataset(spec["name"], split=spec.get("split", split), train=train, **options)
    return create_dataset(spec["name"], split=spec.get("split", split), transform=_transform(cfg, spec, train),
                          **options)


def build_datasets(cfg: TrainConfig) -> Tuple[Dataset, Optional[Dataset]]:
    """The training and (if configured) validation data sets, each with its transforms."""
    return _dataset(cfg, cfg.data.train, "train", True), build_val_dataset(cfg)


def build_val_dataset(cfg: TrainConfig) -> Optional[Dataset]:
    """The validation data set with its evaluation transforms (None when ``data.val`` is not set);
    evaluating does not need the training split on disk."""
    return _dataset(cfg, cfg.data.val, "val", False) if cfg.data.val is not None else None


def build_loss(cfg: TrainConfig) -> MultiExitLoss:
    """The multi-exit loss of ``cfg`` (per-exit loss chosen by ``loss.name`` or the task)."""
    lc = cfg.loss
    name = lc.name or {"segmentation": "cross_entropy", "pose": "heatmap_mse"}.get(cfg.task)
    if name is None:
        raise ConfigError("task 'custom' needs loss.name: 'package.module:callable'")
    if name == "cross_entropy":
        per_exit: Callable = SegmentationLoss(lc.class_weights, lc.ignore_index)
    elif name == "heatmap_mse":
        per_exit = HeatmapMSELoss(lc.use_target_weight)
    else:
        obj = import_object(name, "loss")
        per_exit = obj() if isinstance(obj, type) else obj
    return MultiExitLoss(per_exit, lc.exit_weights)


def build_metric(cfg: TrainConfig, num_classes: int) -> Optional[Callable[[], object]]:
    """Factory of one exit's metric: mIoU (segmentation); pose: MPII's PCKh@0.5 on ``mpii`` data
    (against ``<root>/annot/gt_<split>.mat``), else heatmap PCK; None (custom)."""
    import os

    from ..metrics import HeatmapPCK, SegmentationMetrics

    if cfg.task == "segmentation":
        return lambda: SegmentationMetrics(num_classes, ignore_index=cfg.loss.ignore_index)
    if cfg.task == "pose":
        val = cfg.data.val or {}
        if val.get("name") == "mpii":
            from ..data.mpii import SPLIT_FILES

            split = SPLIT_FILES.get(val.get("split", "valid"), val.get("split", "valid"))
            gt = os.path.join(str(val.get("root", "")), "annot", f"gt_{split}.mat")
            if not os.path.isfile(gt):
                raise FileNotFoundError(f"MPII ground truth {gt!r} does not exist; the PCKh evaluation needs the "
                                        "annot/gt_valid.mat of the HRNet pose code's MPII layout")
            from ..metrics import MPIIPCKh

            return lambda: MPIIPCKh(gt)
        return lambda: HeatmapPCK()
    return None


def flip_pairs_of(cfg: TrainConfig, dataset: Optional[Dataset]) -> Optional[list]:
    """The joint pairs of the flip test when ``eval.flip_test`` is on (the data set's
    ``flip_pairs``), else None."""
    if not cfg.eval.flip_test or dataset is None:
        return None
    if cfg.task != "pose":
        raise ConfigError("eval.flip_test is the pose flip test; set it only with task: pose")
    pairs = getattr(dataset, "flip_pairs", None)
    if pairs is None:
        raise ConfigError(f"eval.flip_test: the data set {type(dataset).__name__} has no flip_pairs (left/right "
                          "joint pairs); give it a flip_pairs attribute or set eval.flip_test: false")
    return [tuple(p) for p in pairs]
