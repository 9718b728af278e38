"""Training anytime models: multi-exit losses, confidence adaptivity trained in, DDP, checkpoints.

From a config file (what ``anytimeify train CONFIG.yaml`` does)::

    from anytimeify.train import load_config, run
    result = run(load_config("examples/configs/digits.yaml", ["optim.lr=0.002"]))

From objects::

    from anytimeify.train import Trainer, TrainConfig, MultiExitLoss, SegmentationLoss
    trainer = Trainer(model, train_set, config=TrainConfig(...), loss=MultiExitLoss(SegmentationLoss()),
                      val_set=val_set, metric=lambda: SegmentationMetrics(19))
    trainer.fit()

See docs/training.md for the config keys, the recipes and torchrun.
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from .._trust import TrustCode

from .builders import build_datasets, build_loss, build_metric, build_model
from .checkpointing import (CheckpointMismatch, latest_checkpoint, load_training_state, load_weights,
                            read_training_state, save_training_state, save_weights)
from .config import (CheckpointConfig, ConfidenceConfig, ConfigError, DataConfig, EvalConfig, LossConfig, ModelConfig,
                     OptimConfig, ScheduleConfig, TrainConfig, apply_overrides, config_from_dict, load_config)
from .distributed import DistInfo, cleanup, init_distributed
from .evaluate import EvalReport, ExitResult, evaluate
from .loop import Trainer, TrainResult
from .losses import HeatmapMSELoss, MultiExitLoss, SegmentationLoss

_logger = logging.getLogger(__name__)

__all__ = [
    "run", "Trainer", "TrainResult", "TrainConfig", "ModelConfig", "ConfidenceConfig", "DataConfig", "LossConfig",
    "OptimConfig", "ScheduleConfig", "CheckpointConfig", "EvalConfig", "load_config", "config_from_dict",
    "apply_overrides", "ConfigError", "MultiExitLoss", "SegmentationLoss", "HeatmapMSELoss", "evaluate",
    "EvalReport", "ExitResult", "save_weights", "load_weights", "save_training_state", "load_training_state",
    "read_training_state", "latest_checkpoint", "CheckpointMismatch", "init_distributed", "DistInfo",
    "build_model", "build_datasets", "build_loss", "build_metric", "model_from_checkpoint", "num_outputs",
    "exit_table", "write_metrics",
]


def _threads(cfg: TrainConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)


def run(cfg: TrainConfig, resume: Optional[str] = None, max_seconds: Optional[float] = None) -> TrainResult:
    """Train the run ``cfg`` describes, in this process or as one rank of a torchrun job.

    Builds the model (ImageNet backbone first if configured, then ``convert``), the data sets,
    loss and metric; writes ``<out>/config.yaml``; trains with :class:`Trainer`; writes the last
    evaluation's per-exit metrics and GFLOPs to ``<out>/metrics.json`` (:func:`write_metrics`).

    Args:
        cfg: the run's config.
        resume: a training state to continue from, or ``"auto"`` (the newest in ``<out>/checkpoints``).
        max_seconds: wall-clock budget of this call (the run can be resumed later).
    """
    from .checkpointing import atomic_write

    _threads(cfg)
    dist = init_distributed(cfg.device)
    try:
        model = build_model(cfg)
        train_set, val_set = build_datasets(cfg)
        loss = build_loss(cfg)
        metric = build_metric(cfg, num_outputs(model)) if val_set is not None else None
        if dist.is_main:
            atomic_write(os.path.join(cfg.out, "config.yaml"),
                         lambda tmp: open(tmp, "w", encoding="utf-8").write(cfg.to_yaml()))
        trainer = Trainer(model, train_set, config=cfg, loss=loss, val_set=val_set, metric=metric, dist=dist)
        result = trainer.fit(resume=resume, max_seconds=max_seconds)
        if dist.is_main and result.evaluations:
            write_metrics(os.path.join(cfg.out, "metrics.json"), result.evaluations[-1], step=result.steps)
        return result
    finally:
        cleanup(dist)


def exit_table(report: EvalReport) -> list:
    """One flat record per exit: ``exit``, the metric's scalar results (``miou``, ``acc``; ``pckh``
    and the MPII joint groups), ``paper_gflops``, ``gmacs``, ``skipped``, ``seconds``."""
    rows = []
    for e in report.exits:
        row = {"exit": e.exit}
        row.update({k: v for k, v in e.metrics.items() if isinstance(v, (int, float))})
        row.update(paper_gflops=e.paper_gflops, gmacs=e.gmacs, skipped=e.skipped, seconds=e.seconds)
        rows.append(row)
    return rows


def write_metrics(path: str, report: EvalReport, **extra) -> None:
    """Write ``{"exits": exit_table(report), "confidence": ..., "images": ..., **extra}`` atomically."""
    import json

    from .checkpointing import atomic_write

    payload = {"exits": exit_table(report), "confidence": report.confidence, "images": report.images, **extra}
    text = json.dumps(payload, indent=1, allow_nan=True)
    atomic_write(path, lambda tmp: open(tmp, "w", encoding="utf-8").write(text + "\n"))


def num_outputs(model) -> int:
    """Classes (or joints) an anytime model predicts: the output channels of its first exit."""
    convs = [m for m in model.exits[0].modules() if isinstance(m, torch.nn.Conv2d)]
    if not convs:
        raise ValueError("the model's first exit has no convolution to read the number of classes from")
    return convs[-1].out_channels


def model_from_checkpoint(path: str, cfg: Optional[TrainConfig] = None, *, trust_code: "TrustCode" = False):
    """Rebuild the anytime model of a checkpoint (``.safetensors`` or training state) and load it.

    Args:
        path: the checkpoint.
        cfg: the run's config; default: the config stored in the checkpoint.
        trust_code: a config stored in the checkpoint is data, so the model it names must be a
            built-in one (:func:`anytimeify.models.list_models`) unless you trust the file's
            author: ``["package.module:factory"]`` allows those factories, ``True`` any (as for
            :func:`anytimeify.load`). A ``cfg`` you pass is yours and needs no opt-in.

    Returns:
        (tuple[AnytimeModel, TrainConfig]): ``(model, cfg)`` with the model in eval mode.

    Raises:
        ValueError: the checkpoint stores no config and none is given, or its config names a model
            factory that ``trust_code`` does not allow.
    """
    import dataclasses

    from .._trust import is_trusted, normalise_trust
    from ..models import list_models
    from .checkpointing import read_weights_config

    if cfg is None:
        stored = read_weights_config(path)
        if stored is None:
            raise ValueError(f"checkpoint {path!r} stores no config; pass the run's config file")
        cfg = config_from_dict(stored, source=path)
        name = cfg.model.name
        if name not in list_models() and not is_trusted(name, normalise_trust(trust_code)):
            raise ValueError(f"checkpoint {path!r} stores a config whose model is {name!r}, which anytimeify does not "
                             f"import from a file unless told to: pass trust_code=[{name!r}] if you trust the "
                             "file's author, or pass the run's config")
        # the weights come from the checkpoint: a backbone path stored in it is not read
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone=None))
    model = build_model(cfg)
    load_weights(model, path)
    return model.eval(), cfg
