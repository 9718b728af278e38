"""Boundaries: the stage outputs where an exit can go, found by module or graph node name.

A *boundary* is a set of tensor nodes that together are a stage's output: one node for a
ResNet-like stage, one per branch for an HRNet stage. Boundaries are named either by a module's
qualified name (all tensors that leave that module) or by a graph node name (that one tensor).
This is the API stage adapters (:mod:`anytimeify._fx.adapters`) are written against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch.fx as fx

__all__ = ["Boundary", "module_boundary", "node_boundary", "hoist", "view_anchor"]


@dataclass
class Boundary:
    """A stage output where an exit can be attached.

    Attributes:
        name: the name ``convert(exits=[...])`` accepts (module path or node name).
        nodes: the tensors leaving the stage, in branch order.
        shapes: their shapes at the probe input.
        stride: input size / size of the first (highest-resolution) tensor.
    """

    name: str
    nodes: List[fx.Node]
    shapes: List[Tuple[int, ...]] = field(default_factory=list)
    stride: float = 1.0

    @property
    def channels(self) -> List[int]:
        return [s[1] for s in self.shapes]

    @property
    def last(self) -> fx.Node:
        """The boundary node that comes last in execution order."""
        order = {n: i for i, n in enumerate(self.nodes[0].graph.nodes)}
        return max(self.nodes, key=order.__getitem__)


def _is_tensor_node(node: fx.Node, ranks: Tuple[int, ...] = (4,)) -> bool:
    """A tensor of one of ``ranks`` dimensions: 4 for feature maps, 3 for a transformer's tokens."""
    val = node.meta.get("tensor_meta")
    return val is not None and hasattr(val, "shape") and len(val.shape) in ranks


def _inside(node: fx.Node, path: str) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    if node.op == "call_module" and (node.target == path or str(node.target).startswith(path + ".")):
        return True
    return path in stack


def _per_image(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether the tensor has one entry per image of the batch (not TNT's pixel tokens ``(B*N, p, c)``)."""
    shape = gm.meta.get("input_shape")
    return shape is None or node.meta["tensor_meta"].shape[0] == shape[0]


def module_boundary(gm: fx.GraphModule, path: str, ranks: Tuple[int, ...] = (4,)) -> Optional[Boundary]:
    """The tensors that leave module ``path`` (None if none does, or it is never called)."""
    outputs = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr") or not _inside(node, path):
            continue
        if any(not _inside(user, path) for user in node.users) and _is_tensor_node(node, ranks) \
                and _per_image(gm, node):
            outputs.append(node)
    if not outputs:
        return None
    return _with_shapes(gm, Boundary(path, outputs))


def node_boundary(gm: fx.GraphModule, name: str, ranks: Tuple[int, ...] = (4,)) -> Optional[Boundary]:
    for node in gm.graph.nodes:
        if node.name == name:
            return _with_shapes(gm, Boundary(name, [node])) if _is_tensor_node(node, ranks) else None
    return None


def _with_shapes(gm: fx.GraphModule, b: Boundary) -> Boundary:
    b.shapes = [tuple(n.meta["tensor_meta"].shape) for n in b.nodes]
    # branch order: highest resolution first, then graph order (stable)
    pairs = sorted(zip(b.nodes, b.shapes), key=lambda p: -p[1][-1] * p[1][-2])
    b.nodes = [p[0] for p in pairs]
    b.shapes = [p[1] for p in pairs]
    in_h = gm.meta["input_shape"][-2]
    if len(b.shapes[0]) == 3:  # tokens (B, N, C): one per patch of a square grid (and a class token)
        b.stride = in_h / max(1, round(math.sqrt(b.shapes[0][1])))
    else:
        b.stride = in_h / b.shapes[0][-2]
    return b


#: methods and functions that only re-view, reshape or measure a tensor (and integer arithmetic on shapes)
_VIEW_METHODS = {"view", "reshape", "permute", "contiguous", "flatten", "unflatten", "transpose", "squeeze",
                 "unsqueeze", "size", "expand", "chunk", "split", "__getitem__"}


def _is_view(node: fx.Node) -> bool:
    if node.op == "call_method":
        return str(node.target) in _VIEW_METHODS
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if name in ("getitem", "getattr", "flatten", "permute", "reshape", "transpose", "unflatten"):
            return True
        return name in ("floordiv", "mul", "add", "sub", "truediv") and "tensor_meta" not in node.meta
    return False


def view_anchor(node: fx.Node) -> fx.Node:
    """The latest computation ``node`` is a view or reshape of (through getitem, reshape, permute,
    ... and shape arithmetic): where a map made of it can move up to (:func:`hoist`)."""
    if not _is_view(node):
        return node
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    anchors, stack, seen = [], list(node.all_input_nodes), {node}
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if _is_view(n):
            stack.extend(n.all_input_nodes)
        else:
            anchors.append(n)
    return max(anchors, key=order.__getitem__) if anchors else node


def hoist(graph: fx.Graph, node: fx.Node, after: fx.Node) -> None:
    """Move ``node``, and those of its ancestors that come after ``after``, up to right after the
    values they read.

    A traced ``forward`` may compute a stage's feature map late: a transformer's
    ``forward_intermediates`` collects the tokens of several blocks and reshapes them into maps
    after the last block. An exit at such a map must run before the later blocks, so the map's
    own computation moves up, each node right after its latest input (nodes only move earlier
    and never above an input, so the order stays a valid execution order). Only pure nodes move.

    Raises:
        ValueError: a node to move is an in-place operation.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    limit = order[after]
    chain, stack, seen = [], [node], set()
    while stack:
        n = stack.pop()
        if n in seen or order[n] <= limit or n.op in ("placeholder", "get_attr"):
            continue
        seen.add(n)
        chain.append(n)
        stack.extend(n.all_input_nodes)
    chain.sort(key=order.__getitem__)
    for n in chain:
        name = str(getattr(n.target, "__name__", n.target))
        if n.op in ("call_method", "call_function") and name.endswith("_") and not name.endswith("__"):
            raise ValueError(f"cannot move the in-place operation {n.name} ({name}) up to its stage")
    for n in chain:
        inputs = n.all_input_nodes
        anchor = max(inputs, key=order.__getitem__) if inputs else after
        if order[anchor] < limit:
            anchor = after
        if order[anchor] + 1 != order[n]:
            anchor.append(n)
            order = {m: i for i, m in enumerate(graph.nodes)}
