"""The registry of stage adapters: what ``exits="stages"`` means for a model family.

Adapters live in one registry, tried newest first; the first that recognises a model decides.
The built-in ones (:mod:`anytimeify._fx.adapters`) register themselves when imported, which
:mod:`anytimeify._fx.stages` does.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch.fx as fx
import torch.nn as nn

__all__ = ["StageAdapter", "register_stage_adapter", "stage_adapter_for"]

StageAdapter = Callable[[nn.Module, fx.GraphModule], Optional[List[str]]]
_ADAPTERS: List[Tuple[str, StageAdapter]] = []


def register_stage_adapter(name: str) -> Callable[[StageAdapter], StageAdapter]:
    """Decorator: register ``fn(model, graph_module) -> list of boundary names or None``.

    Adapters are tried newest first, so yours come before the built-in ones (HRNet, timm,
    segmentation-models-pytorch); the first that returns a list decides ``exits="stages"``. An
    adapter returns None for a model that is not its own, to let the next one try.

    Args:
        name: the adapter's name (shown in logs and errors).

    Returns:
        The decorator, which registers ``fn`` and returns it unchanged.
    """

    def deco(fn: StageAdapter) -> StageAdapter:
        _ADAPTERS.insert(0, (name, fn))
        return fn

    return deco


def stage_adapter_for(model: nn.Module, gm: fx.GraphModule) -> Tuple[str, List[str]]:
    """The first registered adapter that recognises ``model``, and the boundary names it picks.

    Raises:
        ValueError: no adapter recognises the model; the message says how to name exits instead.
    """
    for name, fn in _ADAPTERS:
        picked = fn(model, gm)
        if picked is not None:
            return name, picked
    raise ValueError(
        f"no stage adapter recognises {type(model).__name__}; pass explicit boundary names, e.g. "
        f"convert(model, exits=[...]) with names from anytimeify.inspect(model)"
    )
