"""Graph surgery for confidence adaptivity: mask deciders, copy aggregation, masked convolutions.

Given a graph with exits inserted, for early exit k (0-based):

* ``agg_k``: exit 0's logits, then ``copy_aggregate(agg_{k-1}, exit_k, masks_{k-1})``;
* ``masks_k = mask_deciders.k(agg_k)``: a :class:`~anytimeify.masking.masks.MaskSet`;
* every ``nn.Conv2d`` call after ``masks_k`` (up to the next exit, whose head is masked too)
  becomes a :class:`~anytimeify.masking.conv.MaskedConv2d` called as ``conv(x, mask[, plan])``
  with the mask for its output size.

The final output is aggregated the same way from the last early exit's masks.
"""
from __future__ import annotations

import logging
import warnings
from typing import Dict, List, Tuple

import torch.fx as fx
import torch.nn as nn

from ..masking.conv import MaskedConv2d
from ..masking.criteria import Confidence
from ..masking.masks import MaskDecider, copy_aggregate, geometry_of, mask_for_conv, plan_for_mask

_logger = logging.getLogger(__name__)

__all__ = ["apply_confidence"]


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, module)


def _maskable(conv: nn.Module) -> bool:
    return type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def apply_confidence(root: nn.Module, graph: fx.Graph, exit_nodes: List[fx.Node], final: fx.Node,
                     confidence: Confidence, replaced: Dict[str, MaskedConv2d]) -> Tuple[List[fx.Node], List[fx.Node]]:
    """Rewrite ``graph`` in place; returns (result nodes per exit, MaskSet node per early exit).

    ``replaced`` maps module paths already swapped for masked convs (shared across the train and
    eval graphs, so both use the same modules).
    """
    if not hasattr(root, "mask_deciders"):
        root.add_module("mask_deciders", nn.ModuleList(MaskDecider(confidence, k) for k in range(len(exit_nodes))))
    results: List[fx.Node] = []
    mask_nodes: List[fx.Node] = []
    agg = None
    for k, exit_node in enumerate(exit_nodes):
        anchor = exit_node
        if agg is None:
            agg = exit_node
        else:
            with graph.inserting_after(anchor):
                agg = graph.call_function(copy_aggregate, (agg, exit_node, mask_nodes[-1]))
            anchor = agg
        with graph.inserting_after(anchor):
            masks = graph.call_module(f"mask_deciders.{k}", (agg,))
        results.append(agg)
        mask_nodes.append(masks)
    output = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(output):
        final_agg = graph.call_function(copy_aggregate, (agg, final, mask_nodes[-1]))
    results.append(final_agg)

    # which MaskSet governs each node: the one decided last before it in execution order
    governing = None
    mask_at = {m: i for i, m in enumerate(mask_nodes)}
    skipped_convs, not_per_image = [], []
    batch = _probe_batch(graph)
    for node in list(graph.nodes):
        if node in mask_at:
            governing = node
            continue
        if governing is None or node.op != "call_module":
            continue
        target = str(node.target)
        module = root.get_submodule(target)
        if target.startswith("exits."):
            node.args = (*node.args, governing)
            for name, child in list(module.named_modules()):
                if _maskable(child):
                    _set_module(module, name, MaskedConv2d.from_conv(child, execution=confidence.execution))
            continue
        if target not in replaced and _maskable(module) and not _per_image_input(node, batch):
            not_per_image.append(target)  # e.g. MViTv2's attention pooling, on (B * heads, C, H, W)
            continue
        if target not in replaced and _maskable(module):
            replaced[target] = MaskedConv2d.from_conv(module, execution=confidence.execution)
            _set_module(root, target, replaced[target])
        elif target not in replaced:
            if any(isinstance(m, nn.Conv2d) for m in module.modules()):
                skipped_convs.append(target)
            continue
        x = node.args[0]
        geometry = geometry_of(replaced[target])
        with graph.inserting_before(node):
            mask = graph.call_function(mask_for_conv, (governing, x, geometry))
            plan = graph.call_function(plan_for_mask, (governing, mask))
        node.args = (x, mask, plan)
    if skipped_convs:
        warnings.warn(
            f"confidence adaptivity cannot mask the convolutions inside {skipped_convs} (leaf modules or "
            f"convs with non-zero padding modes); they run densely.", stacklevel=3)
    if not_per_image:
        warnings.warn(
            f"confidence adaptivity cannot mask the convolutions {not_per_image}: their input holds "
            f"other than one entry per image (heads or windows folded into the batch), which a mask per "
            f"image does not cover; they run densely.", stacklevel=3)
    graph.lint()
    return results, mask_nodes


def _probe_batch(graph: fx.Graph):
    """The batch size of the traced probe input (None where shapes were not propagated)."""
    for node in graph.nodes:
        if node.op == "placeholder":
            shape = getattr(node.meta.get("tensor_meta"), "shape", None)
            return int(shape[0]) if shape is not None and len(shape) else None
    return None


def _per_image_input(node: fx.Node, batch) -> bool:
    """Whether the conv ``node`` reads one entry per image (always where shapes are unknown)."""
    x = node.args[0] if node.args else None
    shape = getattr(x.meta.get("tensor_meta"), "shape", None) if isinstance(x, fx.Node) else None
    return batch is None or shape is None or int(shape[0]) == batch
