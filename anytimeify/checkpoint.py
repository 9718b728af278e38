"""Loading weights from local files: ImageNet HRNet backbones and reference ADP-C checkpoints.

Nothing here downloads anything; every function takes the path of a file the user has.
Accepted containers: a bare state dict, ``{"state_dict": ...}`` or ``{"model": ...}``, saved by
``torch.save`` (``.pth``/``.pt``/``.bin``) or safetensors (``.safetensors``); key prefixes
``module.`` (DataParallel) and ``model.`` (training wrappers) are removed.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Union

import torch
import torch.nn as nn

_logger = logging.getLogger(__name__)

__all__ = ["read_state_dict", "load_backbone", "load_reference_checkpoint", "LoadResult"]

#: HRNet-Image-Classification / timm classification head: not part of a dense-prediction trunk
_CLASSIFICATION_HEAD = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.", "fc.")


@dataclass
class LoadResult:
    """What a load took and what it left out.

    Attributes:
        loaded: the model's keys that were loaded.
        missing: the model's keys the file did not provide.
        ignored: the file's keys that were not used.
    """

    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)


def _read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, read on the CPU.

    Raises:
        ValueError: the file cannot be read (truncated, corrupt or not safetensors); the message
            names the path, which safetensors' own errors do not.
    """
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own SafetensorError, OSError, ...
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"cannot read checkpoint {path!r}: the file is truncated, corrupt or not safetensors "
                         f"({type(err).__name__}: {detail})") from err


def read_state_dict(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """Read a state dict from a local file and normalise its container and key prefixes.

    Accepts ``torch.save`` files (``.pth``, ``.pt``, ``.bin``; read with ``weights_only=True``) and
    ``.safetensors``; a bare state dict or one wrapped as ``{"state_dict": ...}``, ``{"model": ...}``
    or ``{"model_state": ...}``; the key prefixes ``module.`` (DataParallel) and ``model.`` are
    removed.

    Args:
        path: a local file.

    Returns:
        The tensors by key.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file cannot be read or holds no state dict; the message names the path.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist or is not a file")
    if path.endswith(".safetensors"):
        obj: object = _read_safetensors(path)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"could not read checkpoint {path!r}: {type(err).__name__}: {err}") from err
    for key in ("state_dict", "model", "model_state"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"checkpoint {path!r} does not hold a state dict of tensors")
    out = {}
    for key, value in obj.items():
        key = re.sub(r"^(module\.|model\.)+", "", key)
        out[key] = value
    return out


def _assign(model: nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise ValueError(f"{source}: {len(bad)} tensors have the wrong shape (is it the right variant?): "
                         + "; ".join(bad[:5]))
    model.load_state_dict(state, strict=False)


def load_backbone(model: nn.Module, path: Union[str, os.PathLike]) -> LoadResult:
    """Load an ImageNet HRNet checkpoint (timm or HRNet-Image-Classification names) into the trunk.

    The classification head in the file is ignored; the model's own head and exits keep their
    weights. Every trunk tensor (stem, ``layer1``, ``transition*``, ``stage*``) must be in the file.

    Args:
        model: an HRNet model (:func:`~anytimeify.models.hrnet_seg`, :func:`~anytimeify.models.hrnet_pose`),
            before or after :func:`~anytimeify.convert`.
        path: the checkpoint, read with :func:`read_state_dict`.

    Returns:
        What was loaded and what in the file was ignored (the classification head).

    Raises:
        ValueError: a trunk tensor is missing or has the wrong shape.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    trunk = [k for k in own if re.match(r"^(conv[12]|bn[12]|layer1|transition\d|stage\d)\.", k)
             and not k.endswith(".interp_lambda")]  # confidence adaptivity's own, not in backbones
    if not trunk:
        raise ValueError(f"{type(model).__name__} has no HRNet trunk (conv1, layer1, stage2, ...) to load into")
    result = LoadResult()
    take = {}
    for key, value in state.items():
        if key.startswith(_CLASSIFICATION_HEAD) or key not in own:
            result.ignored.append(key)
        else:
            take[key] = value
    result.missing = [k for k in trunk if k not in take]
    foreign = [k for k in result.ignored if not k.startswith(_CLASSIFICATION_HEAD)]
    if foreign:
        raise ValueError(
            f"{os.fspath(path)!r} has {len(foreign)} tensors that {type(model).__name__} lacks, e.g. "
            f"{foreign[:3]}; it is probably a deeper HRNet variant than this model's "
            f"({getattr(model, 'variant', '?')}). Load a checkpoint of the same variant."
        )
    if result.missing:
        raise ValueError(
            f"{os.fspath(path)!r} lacks {len(result.missing)} trunk tensors of {type(model).__name__}, "
            f"e.g. {result.missing[:3]}; is it an HRNet checkpoint of the same width?"
        )
    _assign(model, take, os.fspath(path))
    result.loaded = sorted(take)
    _logger.info("loaded %d tensors from %s (%d ignored)", len(take), path, len(result.ignored))
    return result


def reference_key(key: str) -> Optional[str]:
    """Map a key of the ADP-C reference implementation to anytimeify's name (None: not a parameter here)."""
    if key.endswith(".square_dis"):
        return None  # a fixed table of distances, recomputed here
    match = re.match(r"^exit(\d+)\.(.*)$", key)
    if match:
        key = f"exits.{int(match.group(1)) - 1}.{match.group(2)}"
    if key.endswith(".Lambda"):
        key = key[: -len("Lambda")] + "interp_lambda"
    return key


def load_reference_checkpoint(model: nn.Module, path: Union[str, os.PathLike], strict: bool = True) -> LoadResult:
    """Load a checkpoint of the ADP-C reference implementation into a converted model.

    ``exit{k}.*`` becomes ``exits.{k-1}.*``, a masked conv's ``Lambda`` becomes ``interp_lambda``,
    ``square_dis`` is dropped. Convert the model with the same variant, head and confidence
    settings as the checkpoint (EE: ``head="original"``; EE+RH and ADP-C: ``head="redesigned"``).

    Args:
        model: the converted model.
        path: the reference checkpoint, read with :func:`read_state_dict`.
        strict: raise on any mismatch; False loads what matches and reports the rest in the
            :class:`LoadResult`.

    Returns:
        The keys loaded, missing from the file and left unused.

    Raises:
        ValueError: with ``strict``, when a tensor of the model is not in the file or the file has
            tensors the model lacks (for example an ADP-C file loaded without confidence adaptivity).
    """
    state = read_state_dict(path)
    own = model.state_dict()
    result = LoadResult()
    take = {}
    for key, value in state.items():
        mapped = reference_key(key)
        if mapped is None:
            continue
        if mapped in own:
            take[mapped] = value
        else:
            result.ignored.append(key)
    result.missing = [k for k in own if k not in take]
    if strict and (result.missing or result.ignored):
        problems = []
        if result.missing:
            problems.append(f"{len(result.missing)} model tensors are missing from the file (e.g. {result.missing[:3]})")
        if result.ignored:
            problems.append(f"{len(result.ignored)} file tensors have no place in the model (e.g. {result.ignored[:3]})")
        raise ValueError(
            f"{os.fspath(path)!r} does not match the converted model: {'; '.join(problems)}. Convert with the "
            f"checkpoint's head kind, width and confidence settings, or pass strict=False."
        )
    _assign(model, take, os.fspath(path))
    result.loaded = sorted(take)
    return result
