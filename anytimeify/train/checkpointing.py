"""Checkpoints of training runs: written atomically, read without unrestricted unpickling.

A *training state* (``ckpt-<step>.pt``) holds everything a run needs to continue as if it had never
stopped: model, optimiser, scheduler and gradient-scaler states, every random generator (Python,
NumPy, torch CPU and CUDA, per process), the position in the data order and the config. It is a
``torch.save`` file of tensors and plain containers only, so it is read with
``torch.load(weights_only=True)``. *Weights* (``model.safetensors``) hold only the model's tensors,
with the config as metadata, for evaluation and deployment.

Every file is written to a temporary file in the same folder and renamed over the target, so a
crash never leaves a half-written checkpoint; a checkpoint that does not fit the model is
rejected before anything in the model or optimiser changes, naming the keys that differ.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import numpy as np
import torch
import torch.nn as nn

_logger = logging.getLogger(__name__)

__all__ = [
    "save_training_state", "load_training_state", "read_training_state", "save_weights", "load_weights",
    "check_state_dict", "atomic_write", "rng_state", "set_rng_state", "latest_checkpoint", "CheckpointMismatch",
]

FORMAT = "anytimeify-train-state"
VERSION = 1


class CheckpointMismatch(ValueError):
    """A checkpoint whose tensors do not fit the model (other architecture, classes or exits)."""


def atomic_write(path: Union[str, os.PathLike], write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, rename it over ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------ RNG states
def rng_state() -> Dict[str, Any]:
    """Every random generator of this process, as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------- state dicts
def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointMismatch` unless ``state`` has exactly ``model``'s keys and shapes.

    The message names the missing, unexpected and wrongly shaped keys (the first few of each).
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shapes):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} model tensors missing from it ({', '.join(missing[:5])})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors the model lacks ({', '.join(unexpected[:5])})")
    if shapes:
        problems.append(f"{len(shapes)} with other shapes ({'; '.join(shapes[:5])})")
    raise CheckpointMismatch(
        f"checkpoint {source!r} does not fit this model: {'; '.join(problems)}. It was saved from another "
        f"model (architecture, number of classes, exits or confidence settings); build the model from the "
        f"checkpoint's config. Nothing was loaded.")


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module) else model


def save_weights(model: nn.Module, path: Union[str, os.PathLike], config: Optional[Mapping[str, Any]] = None) -> None:
    """Write the model's tensors as safetensors (atomically), with ``config`` as JSON metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in _unwrap(model).state_dict().items()}
    metadata = {"format": "pt"}
    if config is not None:
        metadata["anytimeify_config"] = json.dumps(config)
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def read_weights(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file or of a training state (its ``model``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from ..checkpoint import _read_safetensors

        return _read_safetensors(path)
    return read_training_state(path)["model"]


def load_weights(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Load weights saved by :func:`save_weights` (or a training state's model) into ``model``.

    Raises:
        FileNotFoundError: no such file.
        CheckpointMismatch: the tensors do not fit the model (nothing is loaded).
    """
    state = read_weights(path)
    target = _unwrap(model)
    check_state_dict(target, state, os.fspath(path))
    target.load_state_dict(state)


def read_weights_config(path: Union[str, os.PathLike]) -> Optional[Dict[str, Any]]:
    """The config stored with a checkpoint (safetensors metadata or a training state), if any."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            text = (f.metadata() or {}).get("anytimeify_config")
        return json.loads(text) if text else None
    return read_training_state(path).get("config")


# ----------------------------------------------------------------------------- training state
def save_training_state(path: Union[str, os.PathLike], *, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: Any = None, scaler: Any = None, position: Mapping[str, int],
                        config: Optional[Mapping[str, Any]] = None,
                        rng: Optional[List[Dict[str, Any]]] = None) -> None:
    """Write a training state atomically.

    Args:
        path: target file (``.pt``).
        model: the model (a DDP wrapper is unwrapped).
        optimizer: its ``state_dict()`` is stored.
        scheduler: the learning-rate scheduler; its ``state_dict()`` is stored (optional).
        scaler: the gradient scaler; its ``state_dict()`` is stored (optional).
        position: where the run is: ``epoch``, ``step`` (optimiser steps done), ``sample`` (samples of
            this epoch already consumed per process).
        config: the run's config as a plain dict.
        rng: per-process RNG states (:func:`rng_state` of every rank); default: this process's.
    """
    state = {
        "format": FORMAT,
        "version": VERSION,
        "model": {k: v.detach().to("cpu") for k, v in _unwrap(model).state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng": rng if rng is not None else [rng_state()],
        "position": {k: int(v) for k, v in position.items()},
        "config": dict(config) if config is not None else None,
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def read_training_state(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Read a training state with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is corrupt or not a training state (the message names it).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read checkpoint {path!r} (corrupt, truncated or not a torch file): "
                         f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not an anytimeify training checkpoint (no {FORMAT!r} header); "
                         "for plain weights use anytimeify.train.load_weights")
    if int(state.get("version", 0)) > VERSION:
        raise ValueError(f"{path!r} was written by a newer anytimeify (format version {state['version']}); upgrade")
    return state


def load_training_state(path: Union[str, os.PathLike], *, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler: Any = None, scaler: Any = None, rank: int = 0) -> Dict[str, Any]:
    """Restore a training state into a model, optimiser, scheduler, scaler and this process's RNGs.

    Everything is checked before anything is changed: the model's keys and shapes, and the
    optimiser's parameter groups.

    Returns:
        The stored ``position`` and ``config`` (``{"position": ..., "config": ...}``).

    Raises:
        CheckpointMismatch: the checkpoint belongs to another model or optimiser set-up.
    """
    state = read_training_state(path)
    target = _unwrap(model)
    check_state_dict(target, state["model"], os.fspath(path))
    saved_groups = state["optimizer"]["param_groups"]
    own_groups = optimizer.state_dict()["param_groups"]
    if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in own_groups]:
        raise CheckpointMismatch(
            f"checkpoint {os.fspath(path)!r} has optimiser parameter groups of sizes "
            f"{[len(g['params']) for g in saved_groups]}, this run {[len(g['params']) for g in own_groups]}; "
            "was it written with another optimiser config (exit_lr)? Nothing was loaded.")
    target.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    rngs = state.get("rng") or []
    if rngs:
        if rank >= len(rngs):
            _logger.warning("checkpoint %s holds RNG states of %d processes, this is rank %d: using rank 0's",
                            path, len(rngs), rank)
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    return {"position": state["position"], "config": state.get("config")}


_CKPT = re.compile(r"^ckpt-(\d+)\.pt$")


def latest_checkpoint(folder: Union[str, os.PathLike]) -> Optional[Path]:
    """The training state with the highest step in ``folder`` (None when there is none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT.match(p.name))]
    return max(found)[1] if found else None


def prune_checkpoints(folder: Union[str, os.PathLike], keep: int) -> None:
    """Delete all but the ``keep`` newest ``ckpt-*.pt`` files of ``folder``."""
    found = sorted((int(m.group(1)), p) for p in Path(folder).iterdir() if (m := _CKPT.match(p.name)))
    for _, path in found[:-keep] if keep > 0 else found:
        path.unlink(missing_ok=True)
