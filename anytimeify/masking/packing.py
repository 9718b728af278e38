"""Weight packing: a conv's weights in the layouts the engine's kernels read (:class:`LayerWeights`,
built on first use and cached by the caller)."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import tune
from .compiled import kernel_isa
from .cost import CostModel
from .dispatch import _implicit_variant, dense_kernel, residual_kernel
from .geometry import ConvGeometry
from .layout import implicit_block

__all__ = ["LayerWeights"]


def _gemm_weight(weight: Tensor, groups: int) -> Tensor:
    """Conv weight as a 1x1 conv weight over im2col rows ordered (group, tap, channel)."""
    out_channels = weight.shape[0]
    return weight.permute(0, 2, 3, 1).reshape(out_channels, -1, 1, 1).contiguous()


def _pack_implicit(weight: Tensor, bias: Optional[Tensor], blocks: Optional[Sequence[int]] = None) -> Tuple[Tensor, Tensor]:
    """Weights packed ``(blocks, taps, C_in, VB)`` for the implicit GEMM (``VB`` by
    :func:`implicit_block` among ``blocks``), and the padded bias."""
    out_channels, in_channels, kh, kw = weight.shape
    block = implicit_block(out_channels, blocks)
    blocks = -(-out_channels // block)
    padded = weight.new_zeros(blocks * block, in_channels, kh * kw)
    padded[:out_channels] = weight.reshape(out_channels, in_channels, kh * kw)
    packed = padded.view(blocks, block, in_channels, kh * kw).permute(0, 3, 2, 1).contiguous()
    padded_bias = weight.new_zeros(blocks * block)
    if bias is not None:
        padded_bias[:out_channels] = bias
    return packed, padded_bias


def _pack_rows(weight: Tensor, bias: Optional[Tensor], chunk: int, chunks: int) -> Tuple[Tensor, Tensor]:
    """Weights packed ``(kh, kw, C_in, CP)`` (``CP = chunk * chunks``, zero padded) for the
    row-vectorised implicit GEMM, and the padded bias."""
    out_channels = weight.shape[0]
    padded = weight.new_zeros(chunk * chunks, *weight.shape[1:])
    padded[:out_channels] = weight
    padded_bias = weight.new_zeros(chunk * chunks)
    if bias is not None:
        padded_bias[:out_channels] = bias
    return padded.permute(2, 3, 1, 0).contiguous(), padded_bias


class LayerWeights:
    """A masked conv's weights in the layouts the engine's kernels read, built on first use.

    Args:
        weight: conv weight ``(C_out, C_in/groups, kh, kw)``.
        bias: conv bias or None.
        shift: per-channel constant added after the blend (a BN shift folded in), or None.
        groups: the conv's groups.
    """

    def __init__(self, weight: Tensor, bias: Optional[Tensor], shift: Optional[Tensor], groups: int) -> None:
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.shift = None if shift is None else shift.detach().reshape(-1)
        self.groups = groups
        self._gemm: Optional[Tensor] = None
        self._implicit: Dict[tuple, Tuple[Tensor, Tensor]] = {}
        self._rows: Optional[Tuple[Tensor, Tensor, int]] = None
        self._dense_kernels: Dict[tuple, str] = {}
        #: ``bias + shift``: the bias of the kept rows (None when both are None)
        if self.shift is None:
            self.full_bias = self.bias
        else:
            self.full_bias = self.shift.clone() if self.bias is None else self.bias + self.shift
        self._fills: Dict[bool, Tensor] = {}

    def fill(self, relu: bool) -> Tensor:
        """float32 ``act(shift)``: the value of rows far from every kept one (empty without a shift)."""
        value = self._fills.get(relu)
        if value is None:
            value = torch.empty(0) if self.shift is None else self.shift.float().contiguous()
            if relu and value.numel():
                value = value.clamp_min(0)
            self._fills[relu] = value
        return value

    @property
    def gemm(self) -> Tensor:
        """The 1x1-conv weight of the PyTorch gathered conv."""
        if self._gemm is None:
            self._gemm = _gemm_weight(self.weight, self.groups)
        return self._gemm

    @property
    def implicit(self) -> Tuple[Tensor, Tensor]:
        """Packed weights and padded ``bias + shift`` of the implicit GEMM, for the block widths of
        the loaded kernels."""
        blocks = tuple(kernel_isa()["blocks"])
        packed = self._implicit.get(blocks)
        if packed is None:
            packed = self._implicit[blocks] = _pack_implicit(
                self.weight.float(), None if self.full_bias is None else self.full_bias.float(), blocks)
        return packed

    def dense_kernel(self, geometry: ConvGeometry, x_shape: Sequence[int], cost_model: "CostModel") -> str:
        """:func:`dense_kernel` for an input of ``x_shape``, cached per shape, cost model and state
        of the tuning table."""
        table = tune.active_table()
        key = (geometry, int(x_shape[0]), int(x_shape[2]), int(x_shape[3]), id(cost_model),
               id(table), table.generation if table is not None else 0)
        kernel = self._dense_kernels.get(key)
        if kernel is None:
            kernel = self._dense_kernels[key] = dense_kernel(geometry, key[1], key[2], key[3], cost_model)
        return kernel

    def residual_kernel(self, geometry: ConvGeometry, x_shape: Sequence[int], cost_model: "CostModel") -> str:
        """:func:`residual_kernel` for an input of ``x_shape``, cached like :meth:`dense_kernel`."""
        table = tune.active_table()
        key = ("residual", geometry, int(x_shape[0]), int(x_shape[2]), int(x_shape[3]), id(cost_model),
               id(table), table.generation if table is not None else 0)
        kernel = self._dense_kernels.get(key)
        if kernel is None:
            kernel = self._dense_kernels[key] = residual_kernel(geometry, key[2], key[3], key[4], cost_model)
        return kernel

    def implicit_variant(self, geometry: ConvGeometry, in_height: int, in_width: int) -> int:
        """The implicit GEMM's measured variant for this input size (see ``dispatch._implicit_variant``),
        cached per size and state of the tuning table like :meth:`dense_kernel`."""
        table = tune.active_table()
        key = ("variant", geometry, in_height, in_width, id(table), table.generation if table is not None else 0)
        variant = self._dense_kernels.get(key)
        if variant is None:
            variant = self._dense_kernels[key] = _implicit_variant(geometry, in_height, in_width)
        return variant

    def rows(self, chunk: int, chunks: int) -> Tuple[Tensor, Tensor, int]:
        """Packed weights, padded ``bias + shift`` and chunk width of the row-vectorised implicit GEMM."""
        if self._rows is None or self._rows[2] != chunk:
            packed, bias = _pack_rows(self.weight.float(), None if self.full_bias is None else self.full_bias.float(),
                                      chunk, chunks)
            self._rows = (packed, bias, chunk)
        return self._rows
