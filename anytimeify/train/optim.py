"""Optimisers and per-iteration learning-rate schedules of the paper's recipes.

Cityscapes: SGD (momentum 0.9, weight decay 5e-4), poly decay with power 0.9 stepped every
iteration. MPII: Adam (weight decay 1e-4), x0.1 at epochs 170 and 200. Both optionally with a
linear warm-up, and with an own learning rate for the exit heads (they start from scratch while
the trunk may start from ImageNet weights).
"""
from __future__ import annotations

import logging
import math
from typing import Dict, List

import torch
import torch.nn as nn

from .config import OptimConfig, ScheduleConfig

_logger = logging.getLogger(__name__)

__all__ = ["build_optimizer", "build_scheduler", "LRFactor", "exit_parameter_names"]


def exit_parameter_names(model: nn.Module) -> List[str]:
    """Names of the parameters of the exit heads (``exits.*``) of an anytime model."""
    return [name for name, _ in model.named_parameters() if name.startswith("exits.")]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimiser of ``cfg`` over the trainable parameters of ``model``.

    Two parameter groups: the exit heads (``exits.*``, learning rate ``exit_lr`` when set) and
    everything else (trunk, final head, interpolation lambdas). The schedule scales both groups'
    ``initial_lr`` by the same factor.
    """
    exit_params, other_params = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (exit_params if name.startswith("exits.") else other_params).append(param)
    groups: List[Dict] = [{"params": other_params, "lr": cfg.lr, "name": "trunk"}]
    if exit_params:
        groups.append({"params": exit_params, "lr": cfg.exit_lr if cfg.exit_lr is not None else cfg.lr,
                       "name": "exits"})
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    betas = tuple(float(b) for b in cfg.betas)
    if len(betas) != 2:
        raise ValueError(f"optim.betas must be two numbers, got {cfg.betas!r}")
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimiser {cfg.name!r}; choose sgd, adam or adamw")


class LRFactor:
    """The factor on the base learning rate at iteration ``it`` (a picklable callable, so that
    ``LambdaLR.state_dict()`` stores its settings with the checkpoint).

    Args:
        name: ``poly``, ``step``, ``cosine`` or ``constant``.
        total: optimiser steps of the whole run.
        iters_per_epoch: optimiser steps per epoch (for step milestones given in epochs).
        power, milestones, gamma: of ``poly`` and ``step``.
        warmup_iters, warmup_factor: linear warm-up from ``warmup_factor`` to 1.
        min_factor: floor.
    """

    def __init__(self, name: str, total: int, iters_per_epoch: int = 1, power: float = 0.9,
                 milestones: tuple = (), gamma: float = 0.1, warmup_iters: int = 0, warmup_factor: float = 0.1,
                 min_factor: float = 0.0):
        if total < 1:
            raise ValueError(f"a schedule needs at least one iteration, got total={total}")
        self.name = name
        self.total = int(total)
        self.iters_per_epoch = max(1, int(iters_per_epoch))
        self.power = float(power)
        self.milestones = [int(m) for m in milestones]
        self.gamma = float(gamma)
        self.warmup_iters = int(warmup_iters)
        self.warmup_factor = float(warmup_factor)
        self.min_factor = float(min_factor)

    def __call__(self, it: int) -> float:
        progress = min(it, self.total) / self.total
        if self.name == "poly":
            factor = (1.0 - progress) ** self.power
        elif self.name == "step":
            epoch = it // self.iters_per_epoch
            factor = self.gamma ** sum(epoch >= m for m in self.milestones)
        elif self.name == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            factor = 1.0
        if it < self.warmup_iters:
            alpha = it / self.warmup_iters
            factor *= self.warmup_factor * (1 - alpha) + alpha
        return max(factor, self.min_factor)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total: int, iters_per_epoch: int,
                    base_lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepped once per optimiser step, with the factor of :class:`LRFactor`."""
    factor = LRFactor(cfg.name, total, iters_per_epoch, cfg.power, tuple(cfg.milestones), cfg.gamma,
                      cfg.warmup_iters, cfg.warmup_factor, cfg.min_lr / base_lr if base_lr > 0 else 0.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
