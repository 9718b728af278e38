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
    "prune_checkpoints", "remove_temporaries", "resume_conflicts", "RESUMABLE_KEYS",
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
                        scheduler: Any = None, scaler: Any = None, rank: int = 0,
                        config: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Restore a training state into a model, optimiser, scheduler, scaler and this process's RNGs.

    Everything is checked before anything is changed: the run's config against the stored one
    (when ``config`` is given, :func:`resume_conflicts`), the model's keys and shapes, and the
    optimiser's kind and parameter groups.

    Args:
        config: the resuming run's config as a plain dict (``TrainConfig.to_dict()``); None: not compared.

    Returns:
        The stored ``position`` and ``config`` (``{"position": ..., "config": ...}``).

    Raises:
        CheckpointMismatch: the checkpoint belongs to another model or optimiser set-up, or was
            written with settings (:data:`RESUMABLE_KEYS` aside) that differ from ``config``.
    """
    state = read_training_state(path)
    source = os.fspath(path)
    if config is not None and state.get("config") is not None:
        conflicts = resume_conflicts(state["config"], config)
        if conflicts:
            shown = "; ".join(f"{key}: checkpoint {old!r}, this run {new!r}" for key, old, new in conflicts[:6])
            more = f" (and {len(conflicts) - 6} more)" if len(conflicts) > 6 else ""
            raise CheckpointMismatch(
                f"checkpoint {source!r} was written with other training settings ({shown}{more}); a resumed run "
                f"must train as the run it continues: restore these settings, or train in a new run folder "
                f"(out) to start afresh. Nothing was loaded.")
    target = _unwrap(model)
    check_state_dict(target, state["model"], source)
    saved_groups = state["optimizer"]["param_groups"]
    own_groups = optimizer.state_dict()["param_groups"]
    if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in own_groups]:
        raise CheckpointMismatch(
            f"checkpoint {source!r} has optimiser parameter groups of sizes "
            f"{[len(g['params']) for g in saved_groups]}, this run {[len(g['params']) for g in own_groups]}; "
            "was it written with another optimiser config (exit_lr)? Nothing was loaded.")
    saved_keys = {k for g in saved_groups for k in g if k not in _GROUP_EXTRAS}
    own_keys = {k for g in own_groups for k in g if k not in _GROUP_EXTRAS}
    # another torch version adds or drops a setting (filled in by torch on loading); another
    # optimiser has settings of its own on both sides (SGD's momentum, Adam's betas)
    if saved_keys - own_keys and own_keys - saved_keys:
        raise CheckpointMismatch(
            f"checkpoint {source!r} holds the state of another optimiser (its settings "
            f"{sorted(saved_keys - own_keys)} are unknown to this run's {type(optimizer).__name__}, which needs "
            f"{sorted(own_keys - saved_keys)}); resume with the optimiser it was written with. Nothing was loaded.")
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


# parameter-group entries torch or this project add that do not tell optimisers apart
_GROUP_EXTRAS = frozenset({"params", "name", "initial_lr", "lr"})

#: config keys a resumed run may change: where it writes, on which device, how it reports, loads
#: data, evaluates and checkpoints. Every other key defines what is trained (model, confidence
#: adaptivity, training data, loss, optimiser and learning rate, schedule, batch, seed, precision)
#: and must equal the checkpoint's. A key ending in ``.`` covers everything under it.
RESUMABLE_KEYS = ("out", "device", "progress", "log_every", "threads", "data.workers", "data.pin_memory",
                  "data.val.", "data.val_batch_size", "data.train.root", "eval.", "checkpoint.")


def _flatten(config: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    flat: Dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) or key + "." == k for k in RESUMABLE_KEYS)


def resume_conflicts(saved: Mapping[str, Any], current: Mapping[str, Any]) -> List[tuple]:
    """The settings a resumed run changed that it may not: ``(key, checkpoint's value, run's value)``.

    Both configs are plain dicts (``TrainConfig.to_dict()``); nested keys are compared one by one
    (``optim.lr``, ``data.train.transforms.crop_size``). Keys of :data:`RESUMABLE_KEYS` may differ.
    A setting the checkpoint's config lacks (written before the setting existed) has its default.
    """
    from .config import TrainConfig

    full = TrainConfig().to_dict()
    for key, value in saved.items():  # a section's fields over the defaults, one by one
        if isinstance(full.get(key), dict) and isinstance(value, Mapping):
            full[key] = {**full[key], **value}
        else:
            full[key] = value
    old, new = _flatten(full), _flatten(current)
    missing = object()
    conflicts = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, missing), new.get(key, missing)
        if before != after and not _resumable(key):
            conflicts.append((key, None if before is missing else before, None if after is missing else after))
    return conflicts


_CKPT = re.compile(r"^ckpt-(\d+)\.pt$")
# atomic_write's temporary files: ".tmp-" + mkstemp's 8 random characters + "-" + the target's name
_TEMPORARY = re.compile(r"^\.tmp-[a-z0-9_]{8}-(.+)$")


def remove_temporaries(folder: Union[str, os.PathLike], names: "re.Pattern[str]" = _CKPT) -> List[Path]:
    """Delete the temporary files :func:`atomic_write` left in ``folder`` for targets whose name
    matches ``names`` (a write killed before its rename); other files are not touched.

    Call it only when no other process writes to ``folder`` (at the start of a run, after a write).

    Returns:
        The files removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        match = _TEMPORARY.match(path.name)
        if match and names.match(match.group(1)) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        _logger.info("removed %d unfinished temporary file(s) of an interrupted write in %s", len(removed), folder)
    return removed


def latest_checkpoint(folder: Union[str, os.PathLike]) -> Optional[Path]:
    """The training state with the highest step in ``folder`` (None when there is none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT.match(p.name))]
    return max(found)[1] if found else None


def prune_checkpoints(folder: Union[str, os.PathLike], keep: int) -> None:
    """Delete all but the ``keep`` newest ``ckpt-*.pt`` files of ``folder``, and the temporary
    files of checkpoint writes that were killed before they finished (:func:`remove_temporaries`)."""
    remove_temporaries(folder, _CKPT)
    found = sorted((int(m.group(1)), p) for p in Path(folder).iterdir() if (m := _CKPT.match(p.name)))
    for _, path in found[:-keep] if keep > 0 else found:
        path.unlink(missing_ok=True)
