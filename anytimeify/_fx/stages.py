"""Stage discovery: where in a traced graph the early exits go.

A *boundary* is a set of tensor nodes that together are a stage's output: one node for a
ResNet-like stage, one per branch for an HRNet stage. Boundaries are named either by a module's
qualified name (all tensors that leave that module) or by a graph node name (that one tensor);
:func:`anytimeify.inspect` lists both kinds and :func:`anytimeify.convert` accepts both.

Adapters decide what ``exits="stages"`` means for a model family; they live in one registry
(:mod:`anytimeify._fx.registry`), first match wins. Boundaries themselves are found by
:mod:`anytimeify._fx.boundary`; this module re-exports both APIs.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

# the built-in adapters (HRNet, timm, segmentation-models-pytorch) register themselves on import
from . import adapters  # noqa: F401
from .boundary import Boundary, _is_tensor_node, hoist, module_boundary, node_boundary, view_anchor
from .registry import StageAdapter, register_stage_adapter, stage_adapter_for

_logger = logging.getLogger(__name__)

__all__ = ["Boundary", "register_stage_adapter", "module_boundary", "node_boundary",
           "candidate_boundaries", "resolve_exits", "StageAdapter", "spatial_divisor"]


def candidate_boundaries(gm: fx.GraphModule, max_depth: int = 2, include: Sequence[str] = ()) -> List[Boundary]:
    """Module boundaries of every module up to ``max_depth`` levels below the root, in graph order.

    Args:
        gm: the traced model, after shape propagation.
        max_depth: how deep below the root modules are listed.
        include: module names listed whatever their depth (e.g. what an adapter picked).
    """
    seen = set()
    found = []
    deeper = set(include)
    for name, _ in gm.named_modules():
        if not name or (name.count(".") >= max_depth and name not in deeper) or name in seen:
            continue
        seen.add(name)
        b = module_boundary(gm, name)
        if b is not None:
            found.append(b)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    found.sort(key=lambda b: order[b.last])
    return found


def resolve_exits(model: nn.Module, gm: fx.GraphModule, exits, tokens: bool = False) -> List[Boundary]:
    """Turn ``exits`` ("stages" or a list of names) into boundaries, in execution order.

    ``tokens``: token sequences ``(B, N, C)`` are boundaries too (classification exits pool them).
    """
    ranks = (3, 4) if tokens else (4,)
    if isinstance(exits, str):
        if exits != "stages":
            raise ValueError(f"exits must be 'stages' or a list of boundary names, got {exits!r}")
        gm.meta["accept_tokens"] = tokens  # a classifier's exits also take tokens and NHWC maps
        _, names = stage_adapter_for(model, gm)
    else:
        names = list(exits)
        if not names:
            raise ValueError("exits is an empty list; name at least one boundary")
    boundaries = []
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"exit names must be strings, got {name!r}")
        b = module_boundary(gm, name, ranks) if _is_module(gm, name) else node_boundary(gm, name, ranks)
        if b is not None and not _is_module(gm, name):  # a map computed late (reshaped tokens) runs at its stage
            try:
                hoist(gm.graph, b.nodes[0], view_anchor(b.nodes[0]))
            except ValueError as err:
                _logger.debug("exit %s stays where it is: %s", name, err)
        if b is None:
            valid = [c.name for c in candidate_boundaries(gm)]
            raise ValueError(
                f"{name!r} is not a stage boundary of {type(model).__name__}. Valid module boundaries: "
                f"{', '.join(valid)}; any 4-D tensor node name is accepted too. "
                f"anytimeify.inspect(model) lists them with shapes."
            )
        boundaries.append(b)
    gm.recompile()
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    boundaries.sort(key=lambda b: order[b.last])
    for a, b in zip(boundaries, boundaries[1:]):
        if a.last is b.last:
            raise ValueError(f"exits {a.name!r} and {b.name!r} end at the same node; name each stage once")
    return boundaries


def _is_module(gm: fx.GraphModule, name: str) -> bool:
    try:
        gm.get_submodule(name)
        return True
    except AttributeError:
        return False


# -- input divisor ---------------------------------------------------------------------------------


class _ShapeRecorder(fx.Interpreter):
    """Runs a graph and keeps the spatial size of every 4-D tensor it makes."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.sizes: Dict[str, Tuple[int, int]] = {}

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if isinstance(result, torch.Tensor) and result.dim() == 4:
            self.sizes[n.name] = (int(result.shape[-2]), int(result.shape[-1]))
        return result


def _meta_sizes(gm: fx.GraphModule, shape: Tuple[int, ...]) -> Dict[str, Tuple[int, int]]:
    """Spatial sizes of every node at input ``shape``, computed on the meta device (no arithmetic)."""
    from torch.nn.utils.stateless import _reparametrize_module

    tensors = {name: torch.empty_like(t, device="meta")
               for name, t in list(gm.named_parameters()) + list(gm.named_buffers())}
    recorder = _ShapeRecorder(gm)
    was = gm.training
    gm.eval()
    try:
        with torch.no_grad(), _reparametrize_module(gm, tensors):
            recorder.run(torch.empty(shape, device="meta"))
    finally:
        gm.train(was)
    return recorder.sizes


def spatial_divisor(gm: fx.GraphModule) -> int:
    """The largest power-of-two stride of any 4-D tensor whose size follows the input size.

    Tensors of a fixed size (global pooling in squeeze-excitation blocks, PSPNet's pyramid,
    ASPP's image pooling) say nothing about which inputs the model accepts, so they are told
    apart from the others by running the graph once more on the meta device at twice the probe
    size. Needs ``gm.meta["input_shape"]`` and the probe's ``tensor_meta`` (shape propagation).
    """
    probe = tuple(gm.meta["input_shape"])
    in_h = probe[-2]
    try:
        doubled = _meta_sizes(gm, probe[:-2] + (2 * probe[-2], 2 * probe[-1]))
    except Exception as err:  # an op without a meta kernel: count every node, as before
        _logger.debug("meta probe of %s failed (%s); every 4-D tensor counts for the divisor",
                      type(gm).__name__, err)
        doubled = None
    divisor = 1
    for node in gm.graph.nodes:
        if not _is_tensor_node(node) or node.meta["tensor_meta"].shape[-2] <= 0:
            continue
        h, w = node.meta["tensor_meta"].shape[-2:]
        if doubled is not None and doubled.get(node.name) != (2 * h, 2 * w):
            continue  # fixed size, or not a function of the input size alone
        divisor = max(divisor, 2 ** max(0, round(math.log2(in_h / h))))
    return divisor
