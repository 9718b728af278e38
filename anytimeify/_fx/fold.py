"""Inference folding: batch norms merged into the convolutions before them, channels-last weights.

A BN that directly follows a conv (and is that conv's only reader) is an affine map per channel,
``s * y + b``. For a plain conv both fold into the conv's weight and bias. For a masked conv only
the scale folds: the interpolation is linear and per channel, so ``s * blend(y) = blend(s * y)``,
but the shift cannot move before the blend (near a mask border the interpolation weights do not
sum to 1), so it is added after the masked conv by a :class:`ChannelShift`.
"""
from __future__ import annotations

import copy
from typing import Iterable, List, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..exits import Exit
from ..masking.conv import MaskedConv2d

__all__ = ["ChannelShift", "fold_batch_norms", "fold_sequential"]


class ChannelShift(nn.Module):
    """Adds a per-channel constant: what is left of a BN once its scale is folded into a masked conv."""

    def __init__(self, shift: torch.Tensor):
        super().__init__()
        self.register_buffer("shift", shift.detach().reshape(1, -1, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shift


def _scale_shift(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias if bn.affine else 0.0) - bn.running_mean * scale
    return scale.detach(), shift.detach()


def _folded_masked(conv: MaskedConv2d, bn: nn.BatchNorm2d) -> Tuple[MaskedConv2d, ChannelShift]:
    scale, shift = _scale_shift(bn)
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    with torch.no_grad():
        plain.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        plain.bias.copy_(conv.bias * scale if conv.bias is not None else torch.zeros_like(scale))
    folded = MaskedConv2d.from_conv(plain, execution=conv.execution)
    with torch.no_grad():
        folded.interp_lambda.copy_(conv.interp_lambda)
    return folded, ChannelShift(shift)


def _fold_pair(conv: nn.Module, bn: nn.Module) -> Tuple[nn.Module, nn.Module] | None:
    """The folded replacements of a (conv, BN) pair, or None where folding does not apply."""
    if type(bn) is not nn.BatchNorm2d or bn.training or not bn.track_running_stats:
        return None
    if isinstance(conv, MaskedConv2d):
        return _folded_masked(conv, bn)
    if type(conv) is nn.Conv2d:
        return fuse_conv_bn_eval(copy.deepcopy(conv), bn), nn.Identity()
    return None


def fold_sequential(seq: nn.Sequential) -> int:
    """Fold (conv, BN) neighbours of a Sequential in place (exit heads); returns how many."""
    count = 0
    for i in range(len(seq) - 1):
        pair = _fold_pair(seq[i], seq[i + 1])
        if pair is not None:
            seq[i], seq[i + 1] = pair
            count += 1
    return count


def _set(module: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    try:
        parent = module.get_submodule(parent_path) if parent_path else module
    except AttributeError:
        return  # this graph module never calls that path
    if hasattr(parent, leaf):
        setattr(parent, leaf, new)


def fold_batch_norms(root: nn.Module, graph: fx.Graph, holders: Iterable[nn.Module]) -> List[str]:
    """Fold every conv -> BN pair of ``graph`` (eval statistics); returns the folded conv paths.

    The new modules replace the old ones under the same paths in ``root`` and in every module of
    ``holders`` (the graph modules that call them).
    """
    holders = list(holders)
    calls: dict = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = []
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        bn = root.get_submodule(str(node.target))
        if isinstance(bn, Exit):
            fold_sequential(bn)
            continue
        if type(bn) is not nn.BatchNorm2d:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        if calls[node.target] != 1 or calls[src.target] != 1:
            continue  # a module called in several places cannot be folded for one of them
        pair = _fold_pair(root.get_submodule(str(src.target)), bn)
        if pair is None:
            continue
        new_conv, new_bn = pair
        for holder in [root] + holders:
            _set(holder, str(src.target), new_conv)
            _set(holder, str(node.target), new_bn)
        folded.append(str(src.target))
    return folded
