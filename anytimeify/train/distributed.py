"""Data-parallel training on torch.distributed, launched by ``torchrun`` (no launcher of our own).

``torchrun --nproc_per_node N -m anytimeify.cli train CONFIG.yaml`` starts N processes with
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set;
:func:`init_distributed` reads them and joins the process group (NCCL on CUDA, gloo on CPU).
Several machines are torchrun's rendezvous (``--nnodes``, ``--rdzv-backend c10d``,
``--rdzv-endpoint HOST:PORT``); nothing here changes for them. Without those variables everything
runs in one process.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

_logger = logging.getLogger(__name__)

__all__ = ["DistInfo", "init_distributed", "wrap_model", "all_reduce_mean", "all_gather_objects", "barrier",
           "cleanup", "resolve_device"]


@dataclass
class DistInfo:
    """Where this process stands: rank, world size, local rank, its device and the backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process: this is one rank of a torchrun job."""
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> this process's CUDA device when CUDA is available, else the CPU."""
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but CUDA is not available; use device: cpu or auto")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if this process was started by torchrun, else run alone.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; under torchrun, ``auto`` and ``cuda``
            pick ``cuda:LOCAL_RANK``.

    Returns:
        A :class:`DistInfo`; its ``device`` is where this process trains.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = resolve_device(device, local_rank)
    if world_size <= 1:
        return DistInfo(0, 1, 0, target, None)
    backend = "nccl" if target.type == "cuda" else "gloo"
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    _logger.info("rank %d/%d (local %d) on %s, backend %s", rank, world_size, local_rank, target, backend)
    return DistInfo(rank, world_size, local_rank, target, backend)


def wrap_model(model: nn.Module, info: DistInfo, sync_bn: bool = True) -> nn.Module:
    """DistributedDataParallel around ``model`` (with SyncBatchNorm on CUDA when ``sync_bn``).

    SyncBatchNorm computes batch statistics over the global batch; PyTorch implements it for GPUs
    only, so on CPU each process normalises its own share (or use ``norm_eval``).
    """
    if not info.distributed:
        return model
    if sync_bn and info.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=True)


def all_reduce_mean(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of ``tensor`` over all processes (a copy; the input is unchanged)."""
    if not info.distributed:
        return tensor.clone()
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / info.world_size


def all_gather_objects(obj: Any, info: DistInfo) -> List[Any]:
    """Every process's ``obj``, in rank order."""
    if not info.distributed:
        return [obj]
    gathered: List[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    """Leave the process group (when this module joined one)."""
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
