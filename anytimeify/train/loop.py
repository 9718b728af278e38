"""The multi-exit training loop: every exit trained at once, confidence adaptivity trained in.

One optimiser step: the batch runs through the model's ``forward`` (every exit's logits, with
confidence adaptivity in its differentiable dense execution: the ``"auto"`` execution is dense
whenever autograd records), the :class:`~anytimeify.train.MultiExitLoss` sums the exits' losses,
and the gradients of every exit reach the trunk, the exit heads and the interpolation lambdas.
Confidence adaptivity switches on at ``confidence.start_epoch`` (:meth:`AnytimeModel.set_confidence`).

The same loop runs in one process or under ``torchrun`` (DDP); see :mod:`.distributed`.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ..data.sampling import EpochSampler, SeededSamples
from .builders import flip_pairs_of
from .checkpointing import (latest_checkpoint, load_training_state, prune_checkpoints, remove_temporaries, rng_state,
                            save_training_state, save_weights)
from .config import TrainConfig
from .distributed import DistInfo, all_gather_objects, all_reduce_mean, wrap_model
from .evaluate import EvalReport, evaluate
from .losses import MultiExitLoss
from .optim import build_optimizer, build_scheduler
from .progress import RunLog, TrainProgress

_logger = logging.getLogger(__name__)

__all__ = ["Trainer", "TrainResult", "autocast_dtype"]

# the files a run writes atomically in its folder (their temporaries are removed when a run starts)
_RUN_FILES = re.compile(r"^(model\.safetensors|config\.yaml|metrics\.json)$")


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``precision`` (None for fp32)."""
    if precision == "fp32":
        return None
    if precision == "fp16" and device.type == "cpu":
        _logger.warning("fp16 autocast on CPU is slow on most CPUs; bf16 is the CPU's reduced precision")
    return torch.bfloat16 if precision == "bf16" else torch.float16


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns.

    Attributes:
        steps: optimiser steps done in total (including those before a resume).
        epochs: epochs started.
        seconds: wall-clock seconds of this call.
        history: one record per optimiser step of this call: ``step``, ``epoch``, ``lr``, ``loss``,
            ``loss_exits`` (averaged over processes).
        evaluations: the evaluation reports of this call, in order.
        stopped_early: ``max_seconds`` or ``stop_at`` ended the run before its last step.
    """

    steps: int
    epochs: int
    seconds: float
    history: List[Dict[str, Any]] = field(default_factory=list)
    evaluations: List[EvalReport] = field(default_factory=list)
    stopped_early: bool = False


def _to_device(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


class Trainer:
    """Trains an anytime model's exits together (REFERENCE.md §2, §3, §6).

    Args:
        model: an :class:`~anytimeify.AnytimeModel` (exits attached, confidence adaptivity
            configured at conversion).
        train_set: map-style data set of ``(image, target)`` (targets as ``loss`` takes them).
        config: the run's :class:`~anytimeify.train.TrainConfig`.
        loss: the multi-exit loss.
        val_set: optional evaluation data set.
        metric: factory of one exit's metric (required with ``val_set``).
        dist: the process group (:func:`~anytimeify.train.init_distributed`); default: one process.

    The trainer owns the optimiser, the schedule, the gradient scaler and the data order; call
    :meth:`fit`. Rank 0 writes ``<out>/log.jsonl``, ``<out>/checkpoints/ckpt-<step>.pt`` and, at
    the end, ``<out>/model.safetensors``.
    """

    def __init__(self, model: nn.Module, train_set: Dataset, *, config: TrainConfig, loss: MultiExitLoss,
                 val_set: Optional[Dataset] = None, metric: Optional[Callable[[], object]] = None,
                 dist: Optional[DistInfo] = None):
        from ..model import AnytimeModel

        if not isinstance(model, AnytimeModel):
            raise TypeError(f"Trainer trains an anytimeify.AnytimeModel (from anytimeify.convert), got "
                            f"{type(model).__name__}")
        if val_set is not None and metric is None:
            raise ValueError("a val_set needs a metric factory (e.g. lambda: SegmentationMetrics(num_classes))")
        self.config = config
        self.dist = dist or DistInfo()
        self.device = self.dist.device
        self.model = model.to(self.device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss = loss.to(self.device)
        self.train_set = train_set
        self.val_set = val_set
        self.metric = metric
        self.ddp_model = wrap_model(self.model, self.dist, config.sync_bn)
        if self.ddp_model is not self.model and config.sync_bn and self.device.type == "cuda":
            self.model = self.ddp_model.module  # convert_sync_batchnorm returns a new module tree

        data = config.data
        self.sampler = EpochSampler(train_set, num_replicas=self.dist.world_size, rank=self.dist.rank,
                                    shuffle=True, seed=config.seed, drop_last=True)
        self.batches_per_epoch = self.sampler.num_samples // data.batch_size
        self.steps_per_epoch = self.batches_per_epoch // config.optim.grad_accum
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"the training set ({len(train_set)} samples over {self.dist.world_size} processes) is smaller "  # type: ignore[arg-type]
                f"than one step's batch ({data.batch_size} x grad_accum {config.optim.grad_accum}); lower "
                "data.batch_size or optim.grad_accum, or use more data")
        self.total_steps = config.schedule.iterations or config.schedule.epochs * self.steps_per_epoch
        self.loader = DataLoader(SeededSamples(train_set), batch_size=data.batch_size, sampler=self.sampler,
                                 num_workers=data.workers, pin_memory=data.pin_memory and self.device.type == "cuda",
                                 drop_last=True, persistent_workers=False,
                                 # its own generator: creating an iterator must not draw from the global RNG
                                 # (a resumed run creates one mid-epoch, the uninterrupted run does not)
                                 generator=torch.Generator().manual_seed(config.seed))
        self.optimizer = build_optimizer(self.model, config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.schedule, self.total_steps, self.steps_per_epoch,
                                         config.optim.lr)
        self.autocast = autocast_dtype(config.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.step = 0
        self.epoch = 0
        self.sample = 0  # samples of the current epoch this process has consumed
        self.out = config.out
        self.checkpoint_dir = os.path.join(self.out, "checkpoints")

    # ------------------------------------------------------------------------------ state
    def state_position(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "step": self.step, "sample": self.sample,
                "world_size": self.dist.world_size}

    def check_finite(self) -> None:
        """Raise FloatingPointError when a weight or buffer of the model is NaN or infinite.

        Runs after every optimiser step and before anything is saved, so that a diverged run stops
        at the step it diverged and never writes non-finite tensors to a checkpoint or the weights.
        """
        tensors = [(k, v) for k, v in self.model.state_dict().items() if v.is_floating_point()]
        if not tensors:
            return
        finite = torch.stack([torch.isfinite(v).all() for _, v in tensors]).cpu()
        if bool(finite.all()):
            return
        bad = [k for (k, _), ok in zip(tensors, finite.tolist()) if not ok]
        raise FloatingPointError(
            f"the model's weights are not finite after step {self.step} ({len(bad)} tensors hold NaN or inf, e.g. "
            f"{', '.join(bad[:3])}); the training diverged and nothing was saved for this step: lower optim.lr, add "
            "optim.clip_grad or use precision fp32, and resume from an earlier checkpoint or start again")

    def save_checkpoint(self, path: Optional[str] = None) -> Optional[str]:
        """Write the training state (rank 0; every rank must call it, RNG states are gathered).

        Raises:
            FloatingPointError: the model holds NaN or infinite values (nothing is written).
        """
        self.check_finite()
        rngs = all_gather_objects(rng_state(), self.dist)
        if not self.dist.is_main:
            return None
        path = path or os.path.join(self.checkpoint_dir, f"ckpt-{self.step:07d}.pt")
        save_training_state(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                            scaler=self.scaler, position=self.state_position(), config=self.config.to_dict(),
                            rng=rngs)
        prune_checkpoints(self.checkpoint_dir, self.config.checkpoint.keep)
        _logger.info("checkpoint %s", path)
        return path

    def resume(self, path: str) -> None:
        """Continue from a training state (``"auto"``: the newest in ``<out>/checkpoints``).

        The run's config must define the same training as the checkpoint's: the model, confidence
        adaptivity, training data, loss, optimiser (its learning rate included), schedule, batch,
        seed and precision. Where it writes, the device, logging, data loading, evaluation and
        checkpointing may change (:data:`~anytimeify.train.checkpointing.RESUMABLE_KEYS`). A changed
        learning rate is refused rather than applied: the optimiser and schedule states continue
        the checkpoint's; train with another rate in a new run folder (``out``).

        Raises:
            CheckpointMismatch: the checkpoint's config differs in a key that may not change (the
                message lists them), or its tensors or optimiser do not fit; nothing is loaded.
        """
        if path == "auto":
            found = latest_checkpoint(self.checkpoint_dir)
            if found is None:
                _logger.info("no checkpoint in %s: starting from scratch", self.checkpoint_dir)
                return
            path = str(found)
        loaded = load_training_state(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                     scaler=self.scaler, rank=self.dist.rank, config=self.config.to_dict())
        if loaded["config"] is None:
            _logger.warning("checkpoint %s stores no config: the run's settings could not be compared with it", path)
        position = loaded["position"]
        if position.get("world_size", self.dist.world_size) != self.dist.world_size:
            _logger.warning("checkpoint %s was written by %d processes, this run has %d: the data order of the "
                            "current epoch restarts", path, position["world_size"], self.dist.world_size)
            position = {**position, "sample": 0}
        self.epoch, self.step, self.sample = position["epoch"], position["step"], position["sample"]
        _logger.info("resumed from %s at step %d (epoch %d)", path, self.step, self.epoch)

    # --------------------------------------------------------------------------- training
    def _apply_norm_eval(self) -> None:
        if self.config.norm_eval:
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def _set_confidence_for_epoch(self) -> None:
        if self.model.confidence is not None:
            self.model.set_confidence(self.epoch >= self.config.confidence.start_epoch)

    def _forward_backward(self, images: torch.Tensor, target, sync: bool) -> List[torch.Tensor]:
        context = contextlib.nullcontext() if sync or not self.dist.distributed else self.ddp_model.no_sync()
        with context:
            with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                outputs = self.ddp_model(images)
                total, per_exit = self.loss(outputs, target)
            if not torch.isfinite(total):
                raise FloatingPointError(
                    f"the loss is {total.item()} at step {self.step + 1} (per exit {[float(l) for l in per_exit]}); "
                    "lower optim.lr, add optim.clip_grad or use precision fp32 (nothing was saved for this step)")
            self.scaler.scale(total / self.config.optim.grad_accum).backward()
        return per_exit

    def _optimizer_step(self) -> None:
        if self.config.optim.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1

    def evaluate(self, confidence: Optional[bool] = None) -> Optional[EvalReport]:
        """Evaluate on ``val_set`` (every process takes a share; all get the reduced report)."""
        if self.val_set is None:
            return None
        has_confidence = self.model.confidence is not None and self.config.confidence.enabled
        if confidence is None:
            # the epoch the model was last trained in: at an epoch's end the counter already names the next
            trained = self.epoch - 1 if self.sample == 0 and self.epoch > 0 else self.epoch
            confidence = has_confidence and self.config.eval.confidence and \
                trained >= self.config.confidence.start_epoch
        return evaluate(self.model, self.val_set, self.metric, confidence=confidence,
                        batch_size=self.config.data.val_batch_size, workers=self.config.data.workers,
                        device=self.device, max_images=self.config.eval.max_images,
                        channels_last=self.config.channels_last, dist=self.dist,
                        flip_pairs=flip_pairs_of(self.config, self.val_set))

    def _log_eval(self, log: RunLog, bar: TrainProgress, report: EvalReport) -> None:
        record = {"event": "eval", "step": self.step, "epoch": self.epoch, **report.to_dict()}
        log.write(record)
        key = next(iter(report.exits[0].metrics), None)
        if key is not None:
            values = " ".join(f"{e.metrics[key]:.2f}" for e in report.exits)
            bar.print(f"step {self.step}: {key} per exit {values} (confidence {'on' if report.confidence else 'off'})")
            _logger.info("step %d: %s per exit %s", self.step, key, values)

    def fit(self, resume: Optional[str] = None, max_seconds: Optional[float] = None,
            stop_at: Optional[int] = None) -> TrainResult:
        """Train until ``schedule`` ends (or ``max_seconds`` pass), checkpointing and evaluating.

        Args:
            resume: a training state to continue from, or ``"auto"`` (the newest in
                ``<out>/checkpoints``, if any).
            max_seconds: stop after this many seconds of this call (a final checkpoint is written);
                the schedule is not shortened, so a later ``resume`` continues it.
            stop_at: stop after this optimiser step (same: checkpoint, resumable), e.g. to train
                in chunks.

        Returns:
            A :class:`TrainResult`.
        """
        cfg = self.config
        main = self.dist.is_main
        if main:  # writes killed before their rename (a run stopped while checkpointing) left these
            remove_temporaries(self.checkpoint_dir)
            remove_temporaries(self.out, _RUN_FILES)
        if resume:
            self.resume(resume)
        log = RunLog(os.path.join(self.out, "log.jsonl"), enabled=main)
        bar = TrainProgress(self.total_steps, self.step, cfg.progress, enabled=main)
        result = TrainResult(self.step, self.epoch, 0.0)
        start = time.perf_counter()
        last_log_time, last_log_step = start, self.step
        window: List[torch.Tensor] = []
        if main:
            log.write({"event": "start", "step": self.step, "total_steps": self.total_steps,
                       "steps_per_epoch": self.steps_per_epoch, "world_size": self.dist.world_size,
                       "device": str(self.device), "config": cfg.to_dict()})
        try:
            while self.step < self.total_steps and (stop_at is None or self.step < stop_at):
                if self.sample >= self.steps_per_epoch * cfg.optim.grad_accum * cfg.data.batch_size:
                    self.epoch, self.sample = self.epoch + 1, 0  # the last epoch ended exactly at a checkpoint
                    continue
                self.sampler.set_epoch(self.epoch, start=self.sample)
                self._set_confidence_for_epoch()
                self.ddp_model.train()
                self._apply_norm_eval()
                batches_left = (self.steps_per_epoch * cfg.optim.grad_accum
                                - self.sample // cfg.data.batch_size)
                micro = 0
                per_exit_sum: Optional[torch.Tensor] = None
                for images, target in self.loader:
                    if batches_left <= 0:
                        break
                    batches_left -= 1
                    images = images.to(self.device, non_blocking=True)
                    if cfg.channels_last:
                        images = images.contiguous(memory_format=torch.channels_last)
                    target = _to_device(target, self.device)
                    micro += 1
                    per_exit = torch.stack(self._forward_backward(images, target,
                                                                  sync=micro == cfg.optim.grad_accum)).float()
                    per_exit_sum = per_exit if per_exit_sum is None else per_exit_sum + per_exit
                    self.sample += cfg.data.batch_size
                    if micro < cfg.optim.grad_accum:
                        continue
                    lr = self.optimizer.param_groups[0]["lr"]
                    self._optimizer_step()
                    self.check_finite()
                    losses = all_reduce_mean(per_exit_sum / micro, self.dist).cpu()
                    micro, per_exit_sum = 0, None
                    result.history.append({"step": self.step, "epoch": self.epoch, "lr": lr,
                                           "loss": float(losses.sum()), "loss_exits": losses.tolist()})
                    window.append(losses)
                    if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                        now = time.perf_counter()
                        rate = (self.step - last_log_step) / max(now - last_log_time, 1e-9)
                        mean = torch.stack(window).mean(0)
                        images_per_s = rate * cfg.data.batch_size * cfg.optim.grad_accum * self.dist.world_size
                        log.write({"event": "train", "step": self.step, "epoch": self.epoch, "lr": lr,
                                   "loss": float(mean.sum()), "loss_exits": mean.tolist(),
                                   "images_per_s": round(images_per_s, 3)})
                        bar.update(self.step, self.epoch, rate, mean.tolist())
                        window, last_log_time, last_log_step = [], now, self.step
                    if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < self.total_steps:
                        self.save_checkpoint()
                    if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < self.total_steps:
                        report = self.evaluate()
                        if report is not None:
                            result.evaluations.append(report)
                            self._log_eval(log, bar, report)
                        self.ddp_model.train()
                        self._apply_norm_eval()
                    out_of_time = max_seconds is not None and time.perf_counter() - start > max_seconds
                    if self.dist.distributed and max_seconds is not None:
                        # every process must stop at the same step: rank 0's clock decides
                        flag = torch.tensor([1.0 if out_of_time else 0.0], device=self.device)
                        torch.distributed.broadcast(flag, src=0)
                        out_of_time = bool(flag.item())
                    out_of_time = out_of_time or (stop_at is not None and self.step >= stop_at)
                    if self.step >= self.total_steps or out_of_time:
                        result.stopped_early = out_of_time and self.step < self.total_steps
                        break
                if result.stopped_early or self.step >= self.total_steps:
                    break
                epoch_done = self.sample >= self.steps_per_epoch * cfg.optim.grad_accum * cfg.data.batch_size
                if epoch_done:
                    self.epoch, self.sample = self.epoch + 1, 0
                    if (not cfg.eval.every and cfg.eval.every_epochs and self.epoch % cfg.eval.every_epochs == 0
                            and self.step < self.total_steps):
                        report = self.evaluate()
                        if report is not None:
                            result.evaluations.append(report)
                            self._log_eval(log, bar, report)
            bar.close()
            if cfg.checkpoint.at_end:
                self.save_checkpoint()
            if main:
                self.check_finite()
                save_weights(self.model, os.path.join(self.out, "model.safetensors"), cfg.to_dict())
            if self.step >= self.total_steps:
                report = self.evaluate()
                if report is not None:
                    result.evaluations.append(report)
                    self._log_eval(log, bar, report)
            result.steps, result.epochs = self.step, self.epoch
            result.seconds = time.perf_counter() - start
            log.write({"event": "end", "step": self.step, "seconds": round(result.seconds, 3),
                       "stopped_early": result.stopped_early})
            return result
        finally:
            bar.close()
            log.close()
