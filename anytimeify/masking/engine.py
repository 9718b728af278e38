"""The sparse execution engine of masked convolutions: index plans, a cost model, CPU kernels.

A masked conv's output is ``y*m + I(y*m)*(1-m)`` (REFERENCE.md §3). The engine computes it
without the dense conv where that pays, following what was measured on CPU (SPARSE-NOTES.md):

* :class:`MaskPlan` holds the index lists of one mask (kept positions, skipped positions, the
  interpolation halo and its neighbour lists, and per conv geometry the im2col gather lists).
  They are built lazily, once, and reused by every conv governed by the same mask. A plan belongs
  to one forward call: the caller creates it (directly or through an :class:`IndexCache`) and
  passes it to every :class:`~anytimeify.masking.conv.MaskedConv2d` that shares the mask. Nothing
  is stored on modules, so interleaved calls cannot corrupt each other.
* Per layer, :func:`choose_strategy` compares the cost of the dense conv followed by the blend
  with the cost of computing the kept positions only: with the compiled kernels, an implicit GEMM
  (no im2col matrix, accumulators in registers, writing straight into the output rows); without
  them (or for grouped convs), the gathered conv (im2col rows of the kept positions, gathered in
  cache-sized chunks, each chunk one GEMM run as a channels-last 1x1 convolution, which oneDNN
  executes faster than MKL's ``addmm``).
* Every strategy finishes in the same way: a channels-last output holding ``y`` at the kept
  positions, then the interpolation computed only on the halo (skipped positions within the
  support radius of a kept one); everywhere else the exact result is 0. A masked conv can carry
  an inference epilogue (a folded BN's shift, a ReLU, a residual addition): the compiled output
  pass then writes ``act(shift)`` to the skipped rows, ``I(y*m) + shift`` to the halo and
  ``act(y + shift)`` to the kept rows, keeping the few pre-activation rows the stencil still reads.
* The compiled kernels are C++/OpenMP (:mod:`anytimeify.masking._ext`, built at first use); the
  pure-PyTorch code here is the fallback and the reference of the tests.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .interp import INTERP_RADIUS, kernel_offsets, rbf_kernel, support_radius

_logger = logging.getLogger(__name__)

__all__ = [
    "MaskPlan", "IndexCache", "ConvGeometry", "CostModel", "DEFAULT_COST_MODEL", "choose_strategy",
    "sparse_masked_conv2d", "halo_stencil", "STRATEGIES", "ACTIVATIONS", "LayerWeights", "implicit_available", "add_residual",
    "implicit_block", "rows_layout", "kernel_isa", "DEFAULT_ISA", "resolve_strategy", "dense_conv2d", "dense_kernel", "fuse_sum", "buffer_pool_stats", "set_buffer_pool_limit", "release_buffers",
]

#: execution strategies of the sparse engine ("auto": the measured choice of this machine, see
#: :mod:`anytimeify.masking.tune`, else the cost model's; "pytorch": PyTorch's conv and blend, no
#: compiled kernel)
STRATEGIES = ("auto", "dense", "gather", "implicit", "implicit_rows", "pytorch")

#: what the kernels are built for when none are loaded (the AVX-512 build's tables): block widths
#: of the implicit GEMM, output channels per chunk and positions per block of the row kernel
DEFAULT_ISA = {"isa": "none", "lanes": 16, "registers": 32, "blocks": [16, 32, 48, 64],
               "block_positions": [14, 12, 8, 6], "row_chunks": [4, 6, 8, 10, 12], "row_block": 32}


def kernel_isa(ext=None) -> dict:
    """What the compiled kernels (``ext``, default: the loaded ones) are built for: ``isa``
    (``"avx512"``, ``"avx2"``, ``"neon"``, ...), vector ``lanes`` and ``registers``, the implicit
    GEMM's block widths (``blocks``) and the row kernel's chunks (``row_chunks``) and positions per
    block (``row_block``); :data:`DEFAULT_ISA` without compiled kernels."""
    ext = ext if ext is not None else _extension()
    if ext is None:
        return DEFAULT_ISA
    info = getattr(ext, "_anytimeify_isa", None)
    if info is None:
        info = dict(ext.isa())
        ext._anytimeify_isa = info
    return info


def conv_output_hw(height: int, width: int, kernel_size: Tuple[int, int], stride: Tuple[int, int],
                   padding: Tuple[int, int], dilation: Tuple[int, int]) -> Tuple[int, int]:
    """Output height and width of a convolution with symmetric zero padding."""
    h = (height + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
    w = (width + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
    return h, w


@dataclass(frozen=True)
class ConvGeometry:
    """Everything about a convolution that the index lists depend on (weights excluded)."""

    in_channels: int
    out_channels: int
    kernel_size: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int

    @property
    def taps(self) -> int:
        """Number of kernel taps (``kh * kw``)."""
        return self.kernel_size[0] * self.kernel_size[1]

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        """Output height and width for an input of ``height x width``."""
        return conv_output_hw(height, width, self.kernel_size, self.stride, self.padding, self.dilation)

    def macs_per_output(self) -> int:
        """Multiply-adds of one output pixel over all output channels (bias excluded)."""
        return self.out_channels * (self.in_channels // self.groups) * self.taps


def _version_of(tensor: Tensor) -> Optional[int]:
    """In-place version counter of ``tensor`` (None for inference tensors, which have none)."""
    return None if tensor.is_inference() else tensor._version


class MaskPlan:
    """Index lists of one mask, built lazily and shared by every conv governed by the mask.

    A plan is tied to one mask tensor (identity and in-place version) and to one forward call;
    create it with ``MaskPlan(mask)`` or ``IndexCache().plan(mask)``. It also keeps scratch
    buffers that consecutive layers reuse (SPARSE-NOTES fact 3: writing into preallocated buffers
    avoids page faults on fresh large allocations); layer outputs are never scratch buffers.

    Args:
        mask: ``(B, 1, H, W)`` mask, bool or float (non-zero = computed).
    """

    def __init__(self, mask: Tensor) -> None:
        if mask.dim() != 4 or mask.shape[1] != 1:
            raise ValueError(f"a mask must have shape (B, 1, H, W); got {tuple(mask.shape)}")
        self.mask = mask
        self._version = _version_of(mask)
        self.batch, _, self.height, self.width = (int(s) for s in mask.shape)
        keep = mask.detach()
        keep = keep if keep.dtype == torch.bool else keep != 0
        self.keep = keep.reshape(self.batch, self.height, self.width)
        self.positions = self.batch * self.height * self.width
        self.kept_index = torch.nonzero(self.keep.reshape(-1)).reshape(-1)
        self.kept = int(self.kept_index.numel())
        self._kept_per_sample: Optional[List[int]] = None
        self._skipped_index: Optional[Tensor] = None
        self._row_runs: Optional[int] = None
        self._gather: Dict[Tuple, object] = {}
        self._halo: Dict[object, Tuple[Tensor, Tensor]] = {}
        self._scratch: Dict[Tuple, Tensor] = {}

    # ----------------------------------------------------------------------------------- queries
    def matches(self, mask: Tensor) -> bool:
        """True when ``mask`` is the tensor this plan was built for, unchanged since."""
        return mask is self.mask and _version_of(mask) == self._version

    def check(self, mask: Tensor) -> None:
        """Raise if this plan was not built for ``mask``."""
        if not self.matches(mask):
            raise ValueError(
                f"the plan was built for another mask (plan mask shape {tuple(self.mask.shape)}, given "
                f"{tuple(mask.shape)}, or the mask was modified in place); build one plan per mask tensor, "
                "e.g. with IndexCache().plan(mask)")

    @property
    def density(self) -> float:
        """Kept fraction of the whole batch."""
        return self.kept / self.positions if self.positions else 0.0

    @property
    def kept_per_sample(self) -> List[int]:
        """Number of kept positions of every sample."""
        if self._kept_per_sample is None:
            self._kept_per_sample = [int(v) for v in self.keep.reshape(self.batch, -1).sum(dim=1).tolist()]
        return self._kept_per_sample

    def keep_column(self, dtype: torch.dtype) -> Tensor:
        """The mask as a ``(B*H*W, 1)`` column of 0/1 in ``dtype``, to scale NHWC rows."""
        key = ("keep", dtype)
        column = self._scratch.get(key)
        if column is None:
            column = self.keep.reshape(-1, 1).to(dtype)
            self._scratch[key] = column
        return column

    @property
    def row_runs(self) -> int:
        """Number of runs of consecutive kept positions along the rows of the mask (the blocks of
        positions the row-vectorised implicit GEMM computes start at the first kept position of a run)."""
        if self._row_runs is None:
            keep = self.keep
            starts = int(keep[:, :, :1].sum()) + int((keep[:, :, 1:] & ~keep[:, :, :-1]).sum())
            self._row_runs = starts
        return self._row_runs

    @property
    def skipped_index(self) -> Tensor:
        """Flat indices (into ``B*H*W``) of the skipped positions."""
        if self._skipped_index is None:
            self._skipped_index = torch.nonzero(~self.keep.reshape(-1)).reshape(-1)
        return self._skipped_index

    # ------------------------------------------------------------------------------ index lists
    def gather_index(self, geometry: ConvGeometry, in_height: int, in_width: int) -> Tuple[Tensor, Optional[Tensor]]:
        """im2col gather lists of the kept output positions for a conv geometry.

        Returns:
            ``(index, outside)``: ``index`` is ``(N * taps,)`` rows of the flat NHWC input
            (``B*H_in*W_in`` rows), row-major over (kept position, tap); taps that fall into the
            zero padding point at row 0 and are listed in ``outside`` (rows of the gathered
            matrix to zero), which is None when no tap falls outside.
        """
        key = (geometry.kernel_size, geometry.stride, geometry.padding, geometry.dilation, in_height, in_width)
        cached = self._gather.get(key)
        if cached is not None:
            return cached  # type: ignore[return-value]
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geometry.kernel_size, geometry.stride, geometry.padding, geometry.dilation
        plane = self.height * self.width
        index = self.kept_index
        b, rem = index // plane, index % plane
        top = (rem // self.width) * sh - ph  # input row of the first tap
        left = (rem % self.width) * sw - pw
        ky = torch.arange(kh).repeat_interleave(kw) * dh
        kx = torch.arange(kw).repeat(kh) * dw
        # one broadcast add gives every tap's row; only positions whose window crosses the border
        # need the per-tap bounds check (few of them), so it is not run on the whole (N, taps) grid
        base = b * (in_height * in_width) + top * in_width + left
        rows = base[:, None] + (ky * in_width + kx)[None, :]
        crossing = (top < 0) | (top + (kh - 1) * dh >= in_height) | (left < 0) | (left + (kw - 1) * dw >= in_width)
        outside: Optional[Tensor] = None
        border = torch.nonzero(crossing).reshape(-1)
        if border.numel():
            iy = top[border, None] + ky[None, :]
            ix = left[border, None] + kx[None, :]
            off_map = (iy < 0) | (iy >= in_height) | (ix < 0) | (ix >= in_width)
            rows[border] = torch.where(off_map, torch.zeros_like(iy), rows[border])
            taps = geometry.taps
            local = torch.nonzero(off_map)
            outside = torch.sort(border[local[:, 0]] * taps + local[:, 1]).values
            if outside.numel() == 0:
                outside = None
        result = (rows.reshape(-1).contiguous(), outside)
        self._gather[key] = result
        return result

    def gather_chunks(self, geometry: ConvGeometry, in_height: int, in_width: int,
                      chunk: int) -> List[Tuple[int, int, Tensor, Optional[Tensor]]]:
        """The im2col gather lists split into chunks of at most ``chunk`` kept positions.

        Returns:
            A list of ``(start, end, index, outside)``: kept positions ``start:end``, their gather
            rows and the rows of the chunk's gathered matrix that lie in the zero padding (or None).
        """
        key = ("chunks", geometry.kernel_size, geometry.stride, geometry.padding, geometry.dilation,
               in_height, in_width, chunk)
        cached = self._gather.get(key)
        if cached is not None:
            return cached  # type: ignore[return-value]
        rows, outside = self.gather_index(geometry, in_height, in_width)
        taps = geometry.taps
        chunks = []
        for start in range(0, self.kept, chunk):
            end = min(self.kept, start + chunk)
            local: Optional[Tensor] = None
            if outside is not None:
                lo, hi = torch.searchsorted(outside, torch.tensor([start * taps, end * taps])).tolist()
                if hi > lo:
                    local = outside[lo:hi] - start * taps
            chunks.append((start, end, rows[start * taps:end * taps], local))
        self._gather[key] = chunks  # type: ignore[assignment]
        return chunks

    def halo_index(self, radius: int) -> Tuple[Tensor, Tensor]:
        """Interpolation halo for a support radius.

        Returns:
            ``(halo, neighbours)``: ``halo`` the ``(M,)`` flat indices of skipped positions with a
            kept position within ``radius`` (Chebyshev distance); ``neighbours`` the ``(M, T)`` flat
            indices of their non-centre taps (order of :func:`~anytimeify.masking.interp.kernel_offsets`).
            Taps outside the map point at the halo position itself, which holds 0 when the stencil
            reads it, so they contribute nothing (zero padding).
        """
        cached = self._halo.get(radius)
        if cached is not None:
            return cached
        size = 2 * radius + 1
        keep = self.keep[:, None].to(torch.float32)
        near = F.max_pool2d(keep, size, stride=1, padding=radius)[:, 0] > 0
        halo = torch.nonzero((near & ~self.keep).reshape(-1)).reshape(-1)
        offsets = kernel_offsets(radius)
        plane = self.height * self.width
        b, rem = halo // plane, halo % plane
        y, x = rem // self.width, rem % self.width
        ny = y[:, None] + offsets[None, :, 0]
        nx = x[:, None] + offsets[None, :, 1]
        inside = (ny >= 0) & (ny < self.height) & (nx >= 0) & (nx < self.width)
        neighbours = (b * plane)[:, None] + ny * self.width + nx
        neighbours = torch.where(inside, neighbours, halo[:, None].expand_as(neighbours)).contiguous()
        self._halo[radius] = (halo, neighbours)
        return halo, neighbours

    def boundary_slots(self, radius: int) -> Tuple[Tensor, int]:
        """Slots of the kept positions the halo stencil reads (a skipped position within ``radius``).

        Returns:
            ``(slots, count)``: ``slots`` a ``(B*H*W,)`` int32 tensor, ``0..count-1`` at those kept
            positions (in index order) and -1 elsewhere. A conv with a fused ReLU keeps their
            values before the activation in ``count`` side rows for the stencil.
        """
        key = ("slots", radius)
        cached = self._halo.get(key)  # type: ignore[call-overload]
        if cached is not None:
            return cached  # type: ignore[return-value]
        size = 2 * radius + 1
        skipped = (~self.keep)[:, None].to(torch.float32)
        near = F.max_pool2d(skipped, size, stride=1, padding=radius)[:, 0] > 0
        boundary = torch.nonzero((self.keep & near).reshape(-1)).reshape(-1)
        slots = torch.full((self.positions,), -1, dtype=torch.int32)
        slots[boundary] = torch.arange(boundary.numel(), dtype=torch.int32)
        result = (slots, int(boundary.numel()))
        self._halo[key] = result  # type: ignore[assignment]
        return result

    def scratch(self, name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A reusable buffer of at least ``shape``'s size, returned as a contiguous ``shape`` view."""
        numel = 1
        for s in shape:
            numel *= int(s)
        key = (name, dtype, device)
        buffer = self._scratch.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype, device=device)
            self._scratch[key] = buffer
        return buffer[:numel].view(*shape)


class IndexCache:
    """Plans of one forward call, one per mask tensor (keyed by identity and size).

    Create one per forward call (per image batch and segment), ask it for the plan of each mask
    and pass that plan to every masked conv governed by the mask::

        cache = IndexCache()
        y = conv_a(x, mask, plan=cache.plan(mask))
        y = conv_b(y, mask, plan=cache.plan(mask))   # same index lists, built once
    """

    def __init__(self) -> None:
        self._plans: Dict[Tuple[int, Tuple[int, ...]], MaskPlan] = {}

    def plan(self, mask: Tensor) -> MaskPlan:
        """The plan of ``mask`` (built on first request)."""
        key = (id(mask), tuple(mask.shape))
        plan = self._plans.get(key)
        if plan is None or not plan.matches(mask):
            plan = MaskPlan(mask)
            self._plans[key] = plan
        return plan

    def __len__(self) -> int:
        return len(self._plans)

    def clear(self) -> None:
        """Forget every plan (and its scratch buffers)."""
        self._plans.clear()


# ------------------------------------------------------------------------------------ cost model
@dataclass(frozen=True)
class CostModel:
    """Time estimates (nanoseconds per thread, this CPU class) of the strategies of one layer.

    Only the ratios of the estimates matter, so single-thread figures serve for any thread count.
    The constants come from per-strategy times of HRNet-W48 and W18-Small-v2 layers (2 threads,
    clustered masks; ``benchmarks/density_sweep.py`` and its ``--strategies`` option):

    * the compiled implicit GEMM (``"implicit"``) runs at about 0.85-0.95 of the dense conv's
      throughput over the kept positions (counting the padded lanes of its register blocks), a
      little less from 384 input channels on. Its outputs come from the engine's buffer pool,
      while the dense conv's output is a fresh allocation, which costs page faults and zeroing
      once it is above glibc's 32 MB mmap threshold (``fresh_ns``: oneDNN took 40 ms for a 64- to
      256-channel 1x1 conv at 256x512, the pooled implicit GEMM 13.6 ms; 332 against 252 ms for the
      W48 head's 720-channel one). The dense conv followed by the
      blend (``mask_ns``: filling the skipped rows and the halo) measured 0.72-0.98 of the plain
      conv, the thin layers (18-36 channels) at the low end. So the implicit GEMM is chosen up to
      a keep fraction of about 0.91-0.94 (0.87 for 384 input channels; 0.96 and more for 1x1
      convs with outputs above 32 MB, as the W48 and W18 heads').
      With 16-channel register blocks (one vector of accumulators per position) or short
      reduction runs (fewer than ``short_run`` floats per kernel row: 18 input channels x 3 taps)
      it measured about 0.8 of that (``slow_block_factor``; measured with partial sums between
      kernel rows in memory: the kernel that keeps them in registers narrowed the gap, and the
      factor still ranks the kernels as W18-Small-v2's density sweep does).
    * its row-vectorised form (``"implicit_rows"``, for thin outputs: see :func:`rows_layout`)
      wastes no lanes on padded channels, so on 18-, 36- and 72-channel layers it beat the
      channel-blocked kernel from a keep fraction of about 0.3 / 0.8 / 0.8 on, and the dense conv
      plus the blend at every keep fraction up to 0.9 (18 channels: 1.56x at 0.9). It pays for a
      transposition of its input (``transpose_ns`` per element) and for the partial blocks at the
      ends of runs of kept positions.
    * the dense strategy runs the fastest of the kernels above (or PyTorch's conv) over every
      position (see :meth:`dense_costs`, :func:`dense_kernel`) before the blend.
    * the PyTorch gathered conv (``"gather"``, the path without the compiled kernels and for
      grouped convs) breaks even with the dense conv at about 0.45 for a 3x3 conv with 48 channels,
      0.6-0.7 at 96 and 192 channels, 0.8 at 384 and for a 1x1 conv with 720 channels.

    With ``margin`` the gathered conv must be estimated clearly cheaper than the dense conv plus
    the blend. The implicit GEMM needs no margin (``implicit_margin`` 1): in the density sweep it
    was at least as fast as the dense conv plus the blend at every keep fraction up to 0.9 on the
    W48 layers, and above the break-even both are within a few percent of each other.

    Args:
        dense_gmacs: throughput of the dense channels-last conv (GMAC/s) with a multiple of 16
            output channels (see :meth:`dense_rate`).
        gemm_gmacs: throughput of the gathered GEMM of a conv with more than one tap (GMAC/s);
            for a 1x1 conv the gathered GEMM is the dense conv's own kernel, at its rate.
        implicit_gmacs: throughput of the compiled implicit GEMM over the kept positions.
        implicit_wide_gmacs: the same for convs with at least ``wide_channels`` input channels.
        wide_channels: where the implicit GEMM's throughput drops (its weight blocks leave L1).
        gather_ns: cost of gathering one input element into the im2col matrix.
        zero_ns: cost of filling one output element of a skipped row.
        scatter_ns: cost of scattering one computed output element.
        mask_ns: cost of the blend per element of the dense result.
        fresh_ns: cost per element of a fresh dense output of at least ``fresh_bytes``.
        fresh_bytes: output size from which a fresh allocation is mapped anew (glibc: 32 MB).
        margin: the gathered conv must be estimated at most ``margin`` times the dense cost.
        implicit_margin: the same for the implicit GEMM.
        short_run: floats per kernel row (``C_in * kw``) below which the implicit GEMM slows.
        slow_block_factor: its throughput with 16-channel blocks or short runs, relative.
        rows_gmacs: throughput of the row-vectorised implicit GEMM (before the chunk factor, see
            :meth:`rows_cost`).
        rows_block: positions per block of the row-vectorised kernel (0: the ISA's).
        isa: the kernels' ISA, as :func:`kernel_isa` describes it (None: the loaded kernels'); it
            sets the register blocks, the vector lanes and the row kernel's chunks.
        transpose_ns: cost per input element of its transposition.
    """

    dense_gmacs: float = 60.0
    gemm_gmacs: float = 55.0
    implicit_gmacs: float = 54.0
    implicit_wide_gmacs: float = 52.0
    wide_channels: int = 384
    gather_ns: float = 0.8
    zero_ns: float = 0.3
    scatter_ns: float = 0.5
    mask_ns: float = 0.4
    fresh_ns: float = 3.0
    fresh_bytes: int = 32 << 20
    margin: float = 0.9
    implicit_margin: float = 1.0
    short_run: int = 64
    slow_block_factor: float = 0.8
    rows_gmacs: float = 66.0
    rows_block: int = 0
    transpose_ns: float = 0.4
    isa: Optional[dict] = field(default=None, compare=False)

    def kernels(self) -> dict:
        """The kernels' ISA the estimates are for (``isa``, else the loaded kernels': see
        :func:`kernel_isa`)."""
        return self.isa if self.isa is not None else kernel_isa()

    def dense_rate(self, geometry: ConvGeometry) -> float:
        """Throughput of the dense conv (GMAC/s): oneDNN computes output channels in blocks of 16
        lanes, so a partial last block costs a full one (measured at 18 / 36 / 72 channels: 0.42 /
        0.57 / 0.79 of the rate of 48 or 96; the padding alone explains 0.56 / 0.75 / 0.9)."""
        channels = geometry.out_channels
        lanes = self.kernels()["lanes"]
        return self.dense_gmacs * channels / (-(-channels // lanes) * lanes)

    def dense_costs(self, geometry: ConvGeometry, positions: int, compiled: bool = True,
                    in_positions: Optional[int] = None, out_rows: int = 0) -> Dict[str, float]:
        """Estimated ns of each kernel that computes every output position (no blend), by name
        (see :func:`dense_kernel`): PyTorch's conv with a fresh output (``"onednn"``) and, with
        the compiled kernels (``compiled``) and groups 1, the implicit GEMMs into pooled outputs.
        ``out_rows``: ``B*H_out`` (each row ends in a partial block of the row kernel)."""
        elements = positions * geometry.out_channels
        costs = {"onednn": positions * geometry.macs_per_output() / self.dense_rate(geometry)
                 + self.fresh_cost(elements)}
        if compiled and geometry.groups == 1 and positions:
            costs["implicit"] = self.implicit_cost(geometry, positions, positions)
            costs["implicit_rows"] = self.rows_cost(geometry, positions, positions, out_rows, in_positions)
        return costs

    def dense_cost(self, geometry: ConvGeometry, positions: int, kept: int, compiled: bool = False,
                   in_positions: Optional[int] = None, out_rows: int = 0) -> float:
        """Estimated ns of the dense strategy: the fastest dense kernel (PyTorch's conv only,
        unless ``compiled``; see :meth:`dense_costs`) plus the blend of its result."""
        best = min(self.dense_costs(geometry, positions, compiled, in_positions, out_rows).values())
        return best + positions * geometry.out_channels * self.mask_ns

    def fresh_cost(self, elements: int) -> float:
        """Estimated ns of faulting in a fresh output of ``elements`` floats (the dense conv's and
        the PyTorch path's outputs; the compiled kernels' outputs come from the buffer pool)."""
        return elements * self.fresh_ns if elements * 4 >= self.fresh_bytes else 0.0

    def gather_cost(self, geometry: ConvGeometry, positions: int, kept: int) -> float:
        """Estimated ns of the PyTorch gathered conv at ``kept`` of ``positions`` output positions."""
        macs = kept * geometry.macs_per_output()
        # a 1x1 conv is itself one GEMM over positions: gathered or dense, the same kernel runs
        gemm_gmacs = self.dense_rate(geometry) if geometry.taps == 1 else self.gemm_gmacs
        gather = kept * geometry.taps * geometry.in_channels * self.gather_ns
        output = positions * geometry.out_channels * self.zero_ns + kept * geometry.out_channels * self.scatter_ns
        return macs / gemm_gmacs + gather + output + self.fresh_cost(positions * geometry.out_channels)

    def implicit_cost(self, geometry: ConvGeometry, positions: int, kept: int) -> float:
        """Estimated ns of the compiled implicit GEMM at ``kept`` of ``positions`` output positions."""
        macs = kept * geometry.macs_per_output()
        # output channels are computed in register blocks: a partial last block costs a full one
        isa = self.kernels()
        block = implicit_block(geometry.out_channels, isa["blocks"])
        macs = macs * (-(-geometry.out_channels // block) * block) / geometry.out_channels
        rate = self.implicit_wide_gmacs if geometry.in_channels >= self.wide_channels else self.implicit_gmacs
        if block == isa["lanes"] or geometry.in_channels * geometry.kernel_size[1] < self.short_run:
            rate *= self.slow_block_factor
        return macs / rate + (positions - kept) * geometry.out_channels * self.zero_ns

    def rows_cost(self, geometry: ConvGeometry, positions: int, kept: int, runs: int = 0,
                  in_positions: Optional[int] = None) -> float:
        """Estimated ns of the row-vectorised implicit GEMM (``"implicit_rows"``; inf where it cannot run).

        Its blocks of ``rows_block`` positions start at the first kept position of a run, so each of
        the ``runs`` runs of kept positions along the rows wastes about half a block; its chunks of
        ``nc`` output channels run at ``rows_gmacs * nc / (nc + 2)`` (fewer accumulators per loaded
        vector), and every input element is transposed once (``transpose_ns``; ``in_positions``:
        ``B*H_in*W_in``, by default ``positions``).
        """
        isa = self.kernels()
        layout = rows_layout(geometry, max(isa["row_chunks"]))
        if layout is None:
            return math.inf
        chunk, chunks = layout
        rows_block = self.rows_block or isa["row_block"]
        computed = min(positions, kept + runs * rows_block // 2)
        macs = computed * geometry.in_channels * geometry.taps * chunk * chunks
        rate = self.rows_gmacs * chunk / (chunk + 2)
        inputs = (positions if in_positions is None else in_positions) * geometry.in_channels
        return (macs / rate + inputs * self.transpose_ns
                + (positions - kept) * geometry.out_channels * self.zero_ns)


DEFAULT_COST_MODEL = CostModel()


def rows_layout(geometry: ConvGeometry, max_chunk: Optional[int] = None) -> Optional[Tuple[int, int]]:
    """``(nc, chunks)`` of the row-vectorised implicit GEMM for this conv, or None where it cannot
    run (it needs groups 1, stride and dilation 1 along x and dilation 1 along y) or never pays
    (a multiple of 16 output channels above 16).

    The output channels are split into ``chunks`` equal chunks of at most ``max_chunk`` channels
    (default: the loaded kernels' largest, 12 with 32 vector registers, 6 with 16), rounded up to
    an even ``nc`` of at least 4 (with 12: 18 and 19 channels 2 x 10, 72 channels 6 x 12; with 6:
    18 channels 3 x 6).
    """
    if geometry.groups != 1 or geometry.stride[1] != 1 or geometry.dilation != (1, 1):
        return None
    if geometry.out_channels % 16 == 0 and geometry.out_channels > 16:
        return None  # the channel-blocked kernel wastes no lanes there and was faster on every such layer
    if max_chunk is None:
        max_chunk = max(kernel_isa()["row_chunks"])
    chunks = -(-geometry.out_channels // max_chunk)
    chunk = -(-geometry.out_channels // chunks)
    chunk = max(4, chunk + chunk % 2)
    return chunk, chunks


def choose_strategy(geometry: ConvGeometry, positions: int, kept: int,
                    cost_model: CostModel = DEFAULT_COST_MODEL, implicit: bool = False,
                    device_type: str = "cpu", runs: int = 0, in_positions: Optional[int] = None,
                    out_rows: int = 0, in_hw: Optional[Tuple[int, int]] = None) -> str:
    """Pick the fastest strategy of one layer: "dense", "gather", "implicit", "implicit_rows" or "pytorch".

    With ``in_hw`` and tuning on (:mod:`anytimeify.masking.tune`), the strategy measured fastest on
    this machine at this keep fraction (measuring the shape first if it is new); otherwise the cost
    model's estimate decides.

    Args:
        geometry: the conv.
        positions: output positions of the batch (``B*H_out*W_out``).
        kept: kept output positions.
        cost_model: the time estimates.
        implicit: whether the compiled implicit GEMM can run this layer (see
            :func:`implicit_available`); it then replaces the PyTorch gathered conv, and its
            row-vectorised form (``"implicit_rows"``, for thin outputs) is considered too.
        device_type: where the layer runs. The cost model describes the CPU; on other devices
            (where it was never measured) the choice is the dense kernel plus the blend, the
            execution of the paper's reference, which measured no speed-up from masking on GPU.
            ``MaskedConv2d.strategy = "gather"`` still selects the gathered conv there.

        runs: runs of kept positions along the rows (:attr:`MaskPlan.row_runs`), for the
            row-vectorised kernel's estimate.
        in_positions: ``B*H_in*W_in`` (default ``positions``).
        out_rows: ``B*H_out``, for the row kernel's estimate as the dense strategy's kernel.
        in_hw: the input's ``(H, W)``: the key of the layer's measured timings.

    Returns:
        ``"dense"`` (full conv, then the blend), ``"gather"``, ``"implicit"`` or ``"implicit_rows"``
        (kept positions only), or ``"pytorch"`` (PyTorch's conv and blend; only where measured
        fastest).
    """
    masked = "implicit" if implicit else "gather"
    if kept >= positions:
        return "dense"
    if kept == 0:
        return masked
    if device_type != "cpu":
        return "dense"
    if in_hw is not None:
        from . import tune

        timing = tune.lookup(geometry, in_hw[0], in_hw[1], masked=True)
        if timing is not None:
            allowed = ["pytorch", "dense", "gather"]
            if implicit:
                allowed.append("implicit")
                if rows_layout(geometry) is not None:
                    allowed.append("implicit_rows")
            best = timing.best_masked(kept / positions, allowed)
            if best is not None:
                return best
    if implicit:
        cost, margin = cost_model.implicit_cost(geometry, positions, kept), cost_model.implicit_margin
        rows = cost_model.rows_cost(geometry, positions, kept, runs, in_positions)
        if rows < cost:
            masked, cost = "implicit_rows", rows
    else:
        cost, margin = cost_model.gather_cost(geometry, positions, kept), cost_model.margin
    dense = cost_model.dense_cost(geometry, positions, kept, implicit, in_positions, out_rows)
    return masked if cost <= margin * dense else "dense"


def resolve_strategy(strategy: str, geometry: ConvGeometry, plan: MaskPlan, implicit: bool,
                     cost_model: CostModel = DEFAULT_COST_MODEL, device_type: str = "cpu",
                     in_positions: Optional[int] = None, in_hw: Optional[Tuple[int, int]] = None) -> str:
    """The strategy a masked conv runs (some kept, some skipped positions): ``strategy`` itself,
    the measured or estimated choice for ``"auto"`` (:func:`choose_strategy`), and the fallbacks
    where a kernel cannot run (``"implicit_rows"`` -> ``"implicit"`` for other geometries,
    ``"implicit"`` -> ``"gather"`` without the compiled kernels). ``implicit``: whether the
    compiled implicit GEMM can run."""
    if strategy == "auto":
        return choose_strategy(geometry, plan.positions, plan.kept, cost_model, implicit=implicit,
                               device_type=device_type, runs=plan.row_runs, in_positions=in_positions,
                               out_rows=plan.batch * plan.height, in_hw=in_hw)
    if strategy == "implicit_rows" and (not implicit or rows_layout(geometry) is None):
        strategy = "implicit"
    if strategy == "implicit" and not implicit:
        strategy = "gather"
    return strategy


# -------------------------------------------------------------------------------------- kernels
def _extension():
    """The compiled kernels, or None (not built, disabled with ``ANYTIMEIFY_NO_EXT=1``)."""
    if os.environ.get("ANYTIMEIFY_NO_EXT", "") not in ("", "0"):
        return None
    from . import _ext

    return _ext.load()


def buffer_pool_stats() -> Dict[str, int]:
    """State of the compiled kernels' buffer pool (all zero without the compiled kernels).

    The kernels allocate their outputs of 4 MiB and more (masked conv outputs, branch fusion, fuse
    layers) from a pool: the memory of a dead output serves the next one of about its size with its
    pages still mapped, instead of a fresh allocation that the kernel must fault in and zero again
    (glibc maps every allocation above 32 MB anew). The pool keeps at most ``limit_bytes`` of
    unused buffers, 2 GiB unless ``ANYTIMEIFY_POOL_MB`` or :func:`set_buffer_pool_limit` says
    otherwise.

    Returns:
        ``unused_bytes`` and ``unused_buffers`` held for reuse, ``hits`` and ``misses`` (pooled
        allocations served from the pool / newly allocated) and ``limit_bytes``.
    """
    ext = _extension()
    values = ext.pool_stats() if ext is not None else [0, 0, 0, 0, 0]
    return dict(zip(("unused_bytes", "unused_buffers", "hits", "misses", "limit_bytes"), values))


def set_buffer_pool_limit(limit_bytes: int) -> int:
    """Keep at most ``limit_bytes`` of unused buffers for reuse (0 turns pooling off); returns the
    previous limit (0 without the compiled kernels). Buffers above the new limit are released."""
    if not isinstance(limit_bytes, int) or isinstance(limit_bytes, bool) or limit_bytes < 0:
        raise ValueError(f"limit_bytes must be an int >= 0, got {limit_bytes!r}")
    ext = _extension()
    return int(ext.set_pool_limit(limit_bytes)) if ext is not None else 0


def release_buffers() -> None:
    """Return every unused pooled buffer to the system (outputs still alive are not affected)."""
    ext = _extension()
    if ext is not None:
        ext.release_pool()


def _implicit_variant(geometry: ConvGeometry, in_height: int, in_width: int) -> int:
    """Which of the implicit GEMM's two kernels a layer runs: measured on this machine where tuning
    is on (1: weights shared in L1 by groups of positions; 2: accumulators in registers over every
    kernel row), else 0 (by the kernel's shape: 2 with several kernel rows, else 1)."""
    from . import tune

    return tune.implicit_variant(geometry, in_height, in_width)


_UNLABELLED = contextlib.nullcontext()


def _kernel(name: str):
    """A profiler label for a compiled kernel call (``anytimeify::<name>`` in torch.profiler tables);
    nothing while no profiler runs (a label costs about as much as a small kernel call)."""
    if not torch.autograd.profiler._is_profiler_enabled:
        return _UNLABELLED
    return torch.profiler.record_function("anytimeify::" + name)


def _traced(tensors: Sequence[Tensor]) -> bool:
    """Whether ops on ``tensors`` are being traced or compiled rather than run on their data.

    The compiled kernels are opaque to every tracer and read the tensors' memory, so they must
    not run on proxies or on tensors without data: under ``torch.jit.trace``, torch.fx symbolic
    tracing, ``torch.compile`` and ``torch.export`` (both set ``torch.compiler.is_compiling()``),
    under a dispatch mode (``make_fx``, ``FakeTensorMode``, functionalization: the mode would not
    see the kernel's work) and on tensors that are not plain (FakeTensor, functional tensors,
    other subclasses). PyTorch's ops take their place there, with the same result up to float
    rounding.
    """
    if (torch.jit.is_tracing() or torch.fx._symbolic_trace.is_fx_symbolic_tracing() or torch.compiler.is_compiling()
            or _get_current_dispatch_mode() is not None):
        return True
    for t in tensors:  # (a loop: this runs for every engine call, a generator costs as much as the checks)
        if type(t) not in _PLAIN_TENSORS or torch._is_functional_tensor(t):
            return True
    return False


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def _ext_for(x: Tensor, use_extension: bool = True):
    """The compiled kernels if they can run on ``x`` (float32 on the CPU, not traced), else None."""
    if not use_extension or x.dtype != torch.float32 or x.device.type != "cpu" or _traced((x,)):
        return None
    return _extension()


def inference_kernels(tensors: Sequence[Tensor]):
    """The compiled kernels for a dense inference op on ``tensors`` (HRNet's branch fusion, fuse
    layers): 4-d float32 CPU tensors, no autograd, not while tracing, compiling or exporting
    (see :func:`_traced`); else None (use PyTorch)."""
    if _traced(tensors):
        return None
    if any(t.dim() != 4 or t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    return _extension()


def implicit_available(geometry: ConvGeometry, x: Tensor, use_extension: bool = True) -> bool:
    """Whether the compiled implicit GEMM can run a conv of ``geometry`` on tensors like ``x``.

    It needs the compiled kernels, float32 CPU tensors and an ungrouped conv.
    """
    return geometry.groups == 1 and _ext_for(x, use_extension) is not None


def halo_stencil(out_flat: Tensor, halo: Tensor, neighbours: Tensor, weights: Tensor,
                 plan: Optional[MaskPlan] = None, use_extension: bool = True) -> None:
    """Write the interpolation into the halo rows of an NHWC output, in place.

    ``out_flat`` (``(B*H*W, C)``) must hold ``y`` at the kept positions and 0 at every skipped
    one; afterwards each halo row holds ``sum_t weights[t] * out_flat[neighbours[:, t]]``, computed
    from the values before any halo row was written.

    Args:
        out_flat: ``(R, C)`` contiguous output rows.
        halo: ``(M,)`` rows to fill.
        neighbours: ``(M, T)`` rows read by each halo row.
        weights: ``(T,)`` tap weights (cropped, normalised RBF kernel without its centre).
        plan: optional plan whose scratch buffers are reused (and whose mask the compiled kernel
            reads to skip the neighbours that are not kept).
        use_extension: use the compiled kernel if available.
    """
    count, taps = neighbours.shape
    if count == 0:
        return
    ext = _ext_for(out_flat, use_extension)
    if ext is not None:
        if plan is not None:
            keep = plan.keep.reshape(-1)
        else:  # the rows the stencil may read: every row that is not a halo row is kept or 0
            keep = torch.ones(out_flat.shape[0], dtype=torch.bool)
            keep[halo] = False
        with _kernel("halo_stencil"):
            ext.halo_stencil(out_flat, halo, neighbours, weights.to(torch.float32).contiguous(), keep,
                             torch.empty(0), False, torch.empty(0, dtype=torch.int32), torch.empty(0), torch.empty(0))
        return
    channels = out_flat.shape[1]
    if plan is not None:
        gathered = plan.scratch("halo", (count * taps, channels), out_flat.dtype, out_flat.device)
        torch.index_select(out_flat, 0, neighbours.reshape(-1), out=gathered)
    else:
        gathered = out_flat.index_select(0, neighbours.reshape(-1))
    gathered = gathered.view(count, taps, channels)
    tap_weights = weights.tolist()
    values = gathered[:, 0] * tap_weights[0]
    for t in range(1, taps):
        values.add_(gathered[:, t], alpha=tap_weights[t])
    out_flat.index_copy_(0, halo, values)


@functools.lru_cache(maxsize=256)
def _stencil_taps(lam: float) -> Tuple[int, Tensor]:
    """Support radius and non-centre tap weights (float32) of the interpolation at ``lam`` (cached)."""
    radius = support_radius(lam)
    kernel = rbf_kernel(torch.tensor(lam, dtype=torch.float64), radius=INTERP_RADIUS, support=radius).flatten()
    centre = kernel.numel() // 2
    return radius, torch.cat([kernel[:centre], kernel[centre + 1:]]).to(torch.float32)


def stencil_taps(lam: Tensor) -> Tuple[int, Tensor]:
    """Support radius and non-centre tap weights of the interpolation for a ``lambda`` tensor.

    The weights are shared between calls: read them, never modify them.
    """
    return _stencil_taps(float(lam.detach().item()))


def _gemm_weight(weight: Tensor, groups: int) -> Tensor:
    """Conv weight as a 1x1 conv weight over im2col rows ordered (group, tap, channel)."""
    out_channels = weight.shape[0]
    return weight.permute(0, 2, 3, 1).reshape(out_channels, -1, 1, 1).contiguous()


def implicit_block(out_channels: int, blocks: Optional[Sequence[int]] = None) -> int:
    """Output channels per register block of the implicit GEMM, one of ``blocks`` (default: the
    loaded kernels' block widths, ``kernel_isa()["blocks"]``).

    With AVX-512's blocks (16, 32, 48, 64): 48 suits 48 and 96 channels (8 positions x 3 vectors of
    accumulators), 32 the wider layers (12 positions x 2 vectors: fewer weight loads per
    multiply-add). Otherwise, and for other ISAs (AVX2: 8, 16, 24), the block that wastes the
    fewest padded channels, the widest among equals (fewer passes over the input).
    """
    blocks = tuple(kernel_isa()["blocks"] if blocks is None else blocks)
    if set(blocks) == {16, 32, 48, 64}:
        if out_channels % 48 == 0 and out_channels <= 96:
            return 48
        if out_channels % 32 == 0:
            return 32
    return min(blocks, key=lambda b: (-(-out_channels // b) * b - out_channels, -b))


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
        from . import tune

        table = tune.active_table()
        key = (geometry, int(x_shape[0]), int(x_shape[2]), int(x_shape[3]), id(cost_model),
               id(table), table.generation if table is not None else 0)
        kernel = self._dense_kernels.get(key)
        if kernel is None:
            kernel = self._dense_kernels[key] = dense_kernel(geometry, key[1], key[2], key[3], cost_model)
        return kernel

    def rows(self, chunk: int, chunks: int) -> Tuple[Tensor, Tensor, int]:
        """Packed weights, padded ``bias + shift`` and chunk width of the row-vectorised implicit GEMM."""
        if self._rows is None or self._rows[2] != chunk:
            packed, bias = _pack_rows(self.weight.float(), None if self.full_bias is None else self.full_bias.float(),
                                      chunk, chunks)
            self._rows = (packed, bias, chunk)
        return self._rows


#: bytes of im2col rows gathered per chunk: the GEMM then reads them from cache, not memory
CHUNK_BYTES = 8 << 20


def _gathered_conv_into(out_flat: Tensor, x_flat: Tensor, bias: Optional[Tensor], geometry: ConvGeometry,
                        plan: MaskPlan, in_height: int, in_width: int, gemm_weight: Tensor) -> None:
    """Write the conv outputs at the kept positions into their rows of ``out_flat``.

    Kept positions are processed in chunks: gather their im2col rows into a reused buffer, run
    one GEMM as a channels-last 1x1 conv (SPARSE-NOTES fact 1: oneDNN beats MKL's ``addmm`` here),
    and copy the result rows into the output.
    """
    taps, channels, groups = geometry.taps, geometry.in_channels, geometry.groups
    width = taps * channels
    chunk = max(1024, CHUNK_BYTES // (width * x_flat.element_size()))
    chunks = plan.gather_chunks(geometry, in_height, in_width, chunk)
    buffer = plan.scratch("cols", (min(chunk, plan.kept) * taps, channels), x_flat.dtype, x_flat.device)
    for start, end, rows, outside in chunks:
        count = end - start
        cols = buffer[:count * taps]
        torch.index_select(x_flat, 0, rows, out=cols)
        if outside is not None:
            cols.index_fill_(0, outside, 0)
        if groups > 1:
            # a grouped 1x1 conv needs each group's (tap, channel) block contiguous
            per_group = channels // groups
            cols = cols.view(count, taps, groups, per_group).permute(0, 2, 1, 3).reshape(count * taps, channels)
        view = cols.view(1, count, 1, width).permute(0, 3, 1, 2)
        y = F.conv2d(view, gemm_weight, bias, groups=groups)
        out_flat.index_copy_(0, plan.kept_index[start:end], y.permute(0, 2, 3, 1).reshape(count, geometry.out_channels))


#: activations a masked conv can apply to its own output (fused into the engine's output pass)
ACTIVATIONS = (None, "relu")


def _finish(out: Tensor, shift: Optional[Tensor], activation: Optional[str]) -> Tensor:
    """``act(out + shift)`` in place (the PyTorch path's epilogue)."""
    if shift is not None:
        out.add_(shift.reshape(1, -1) if out.dim() == 2 else shift.reshape(1, -1, 1, 1))
    if activation == "relu":
        out.relu_()
    return out


def sparse_masked_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], geometry: ConvGeometry,
                         lam: Tensor, plan: MaskPlan, strategy: str = "auto",
                         cost_model: CostModel = DEFAULT_COST_MODEL, use_extension: bool = True,
                         shift: Optional[Tensor] = None, activation: Optional[str] = None,
                         weights: Optional[LayerWeights] = None, residual: Optional[Tensor] = None,
                         reader_radius: Optional[int] = None, engine_dense: bool = False) -> Tensor:
    """Masked conv ``act(y*m + I(y*m)*(1-m) + shift [+ residual])`` computing ``y`` only where needed.

    Args:
        x: ``(B, C_in, H, W)`` input (any memory format).
        weight: conv weight ``(C_out, C_in/groups, kh, kw)``.
        bias: conv bias or None.
        geometry: the conv's hyper-parameters (explicit symmetric zero padding).
        lam: interpolation ``lambda`` (scalar tensor).
        plan: the mask's plan (its mask is ``(B, 1, H_out, W_out)``).
        strategy: ``"auto"`` (measured on this machine, else the cost model), ``"dense"``,
            ``"gather"``, ``"implicit"`` (the compiled implicit GEMM; where it cannot run,
            ``"gather"``), ``"implicit_rows"`` (its row-vectorised form for thin outputs; where it
            cannot run, ``"implicit"``) or ``"pytorch"`` (PyTorch's conv and blend).
        cost_model: estimates used by ``"auto"``.
        use_extension: allow the compiled kernels.
        shift: optional ``(C_out,)`` constant added after the blend (a folded BN's shift).
        activation: None or ``"relu"``, applied last.
        weights: optional :class:`LayerWeights` of ``(weight, bias, shift)``, cached by the caller.
        residual: optional ``(B, C_out, H_out, W_out)`` tensor added before the activation (a
            residual connection folded into the conv). The compiled implicit GEMM adds it in its
            output pass; elsewhere one more pass adds it (:func:`add_residual`).
        reader_radius: set when the output's only reader is a conv governed by the same mask that
            reads it only within this many positions of the kept ones (0: the kept positions only;
            1: a 3x3 conv). The compiled path then leaves the rows nobody reads unwritten (0: every
            skipped row; otherwise the rows beyond the interpolation's halo, where the halo is at
            least that wide). None: every row is written.
        engine_dense: where every position is kept, run the engine's fastest dense kernel
            (:func:`dense_conv2d`) instead of PyTorch's conv (frozen models; the result then
            differs from the plain conv by float rounding).

    Returns:
        ``(B, C_out, H_out, W_out)`` output in channels-last memory format.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if weights is None:
        weights = LayerWeights(weight, bias, shift, geometry.groups)
    batch, _, in_height, in_width = x.shape
    out_height, out_width = plan.height, plan.width
    positions = plan.positions
    out_channels = geometry.out_channels
    if residual is not None:
        if tuple(residual.shape) != (batch, out_channels, out_height, out_width):
            raise ValueError(f"residual shape {tuple(residual.shape)} does not match the conv output "
                             f"{(batch, out_channels, out_height, out_width)}")
    if plan.kept == positions:  # all kept: the plain conv (same memory format as given)
        if engine_dense and _ext_for(x, use_extension) is not None:  # the engine's fastest dense kernel
            y = dense_conv2d(x, weight, weights.full_bias, geometry, weights,
                             weights.dense_kernel(geometry, x.shape, cost_model),
                             activation=activation if residual is None else None)
            return y if residual is None else add_residual(y, residual, activation, use_extension)
        y = F.conv2d(x, weight, weights.full_bias, geometry.stride, geometry.padding, geometry.dilation, geometry.groups)
        if residual is not None:
            return add_residual(y, residual, activation, use_extension)
        return y.relu_() if activation == "relu" else y
    if plan.kept == 0:  # all skipped: y*m = 0, so its interpolation is 0 too
        out = x.new_zeros(batch, out_height, out_width, out_channels).permute(0, 3, 1, 2)
        if residual is not None:
            return add_residual(_finish(out, shift, None), residual, activation, use_extension)
        return _finish(out, shift, activation)
    ext = _ext_for(x, use_extension)
    strategy = resolve_strategy(strategy, geometry, plan, ext is not None and geometry.groups == 1, cost_model,
                                x.device.type, batch * in_height * in_width, (in_height, in_width))
    if strategy == "pytorch":  # PyTorch's conv and blend, no compiled kernel
        ext, strategy = None, "dense"
    in_pass = strategy in ("implicit", "implicit_rows")  # an implicit GEMM writes the final kept rows

    radius, tap_weights = stencil_taps(lam)
    halo, neighbours = plan.halo_index(radius)

    if ext is not None:
        # fused output pass: kept rows hold y + shift, skipped rows act(shift) (0 without a shift),
        # then the halo rows get I(y*m) + shift in one stencil pass, and the kept rows the activation
        relu = activation == "relu"
        none_i32, none_f32 = torch.empty(0, dtype=torch.int32), torch.empty(0)
        # a residual the implicit GEMM's output pass can read in place: (B*H*W, C) rows
        res_rows = _rows_of(residual, positions, out_channels) if in_pass else None
        unfused = residual is not None and res_rows is None
        post_act = relu and unfused  # the activation then follows the separate residual pass
        relu = relu and not unfused
        # rows nobody reads: the only reader reads kept rows (0) or rows within its kernel radius,
        # which the halo covers where the interpolation's support is at least that wide
        write_skipped = reader_radius is None or (reader_radius > 0 and reader_radius > radius)
        write_halo = reader_radius is None or reader_radius > 0
        res_arg = res_rows if res_rows is not None else none_f32
        if strategy == "dense":  # the fastest dense kernel, then the blend
            x_cl = x.contiguous(memory_format=torch.channels_last)
            y = dense_conv2d(x_cl, weight, weights.full_bias, geometry, weights,
                             weights.dense_kernel(geometry, x.shape, cost_model)).contiguous(memory_format=torch.channels_last)
            out_flat = y.permute(0, 2, 3, 1).view(positions, out_channels)
            if write_skipped:
                with _kernel("fill_skipped"):
                    ext.fill_skipped(out_flat, plan.kept_index, weights.fill(relu))
        else:
            # with a residual in the pass, skipped rows become act(shift + residual)
            fill = weights.fill(False) if res_rows is not None else weights.fill(relu)
            with _kernel("masked_output"):
                out_flat = ext.masked_output(positions, out_channels, plan.kept_index, fill, res_arg, relu,
                                             write_skipped)
            if in_pass:
                # with an activation or a residual the rows are written final; the kept rows the
                # stencil reads keep y + shift in side rows
                needs_side = (relu or res_rows is not None) and write_halo and halo.numel()
                slots, count = plan.boundary_slots(radius) if needs_side else (none_i32, 0)
                side = plan.scratch("side", (count, out_channels), torch.float32, x.device)
                x_nhwc = x.permute(0, 2, 3, 1).contiguous()
                if strategy == "implicit_rows":
                    packed, padded_bias, chunk = weights.rows(*rows_layout(geometry))
                    with _kernel("implicit_rows"):
                        ext.implicit_rows(x_nhwc, packed, padded_bias, plan.kept_index, out_flat, out_height, out_width,
                                          geometry.stride[0], *geometry.padding, chunk, relu, slots, side, res_arg)
                else:
                    packed, padded_bias = weights.implicit
                    with _kernel("implicit_conv"):
                        ext.implicit_conv(x_nhwc, packed, padded_bias, plan.kept_index, out_flat, out_height, out_width,
                                          *geometry.kernel_size, *geometry.stride, *geometry.padding, *geometry.dilation,
                                          relu, slots, side, res_arg, _implicit_variant(geometry, in_height, in_width))
            else:
                x_flat = x.permute(0, 2, 3, 1).contiguous().view(batch * in_height * in_width, geometry.in_channels)
                _gathered_conv_into(out_flat, x_flat, weights.full_bias, geometry, plan, in_height, in_width,
                                    weights.gemm)
        finalized = in_pass and (relu or res_rows is not None)  # kept rows already final
        if halo.numel() and write_halo:
            with _kernel("halo_stencil"):
                ext.halo_stencil(out_flat, halo, neighbours, tap_weights, plan.keep.reshape(-1), weights.fill(False), relu,
                                 slots if finalized else none_i32, side if finalized else none_f32, res_arg)
        if relu and not finalized:  # every row but the kept ones has it already: one vectorised pass
            out_flat.relu_()
        out = out_flat.view(batch, out_height, out_width, out_channels).permute(0, 3, 1, 2)
        if unfused:
            return add_residual(out, residual, "relu" if post_act else None, use_extension)
        return out

    if strategy == "dense":
        x_cl = x.contiguous(memory_format=torch.channels_last)
        y = F.conv2d(x_cl, weight, bias, geometry.stride, geometry.padding, geometry.dilation, geometry.groups)
        y = y.contiguous(memory_format=torch.channels_last)
        out_flat = y.permute(0, 2, 3, 1).view(positions, out_channels)
        out_flat.mul_(plan.keep_column(out_flat.dtype))  # y*m, as the dense execution computes it
    else:
        x_flat = x.permute(0, 2, 3, 1).contiguous().view(batch * in_height * in_width, geometry.in_channels)
        out_flat = x.new_zeros(positions, out_channels)
        _gathered_conv_into(out_flat, x_flat, bias, geometry, plan, in_height, in_width, weights.gemm)
    if reader_radius != 0:  # 0: the only reader reads kept rows only
        halo_stencil(out_flat, halo, neighbours, tap_weights.to(out_flat.dtype), plan=plan, use_extension=False)
    if residual is not None:
        _finish(out_flat, shift, None)
        out = out_flat.view(batch, out_height, out_width, out_channels).permute(0, 3, 1, 2)
        return add_residual(out, residual, activation, use_extension=False)
    _finish(out_flat, shift, activation)
    return out_flat.view(batch, out_height, out_width, out_channels).permute(0, 3, 1, 2)


DENSE_KERNELS = ("onednn", "implicit", "implicit_rows")


def dense_kernel(geometry: ConvGeometry, batch: int, in_height: int, in_width: int,
                 cost_model: CostModel = DEFAULT_COST_MODEL) -> str:
    """The fastest kernel for an unmasked conv: ``"onednn"`` (PyTorch's conv, a fresh output), or
    the compiled implicit GEMM over every position, channel-blocked (``"implicit"``) or
    row-vectorised (``"implicit_rows"``), which write into pooled outputs. Measured on this machine
    where tuning is on (:mod:`anytimeify.masking.tune`), so never one measured slower than
    PyTorch's; else the cost model's estimate.

    The implicit GEMMs win where the output is large enough for a fresh allocation to cost page
    faults (above 32 MB: HRNet's 256-channel ``layer1`` outputs, its heads' 270- and 720-channel
    convs) or where oneDNN wastes padded lanes (18 or 36 channels).
    """
    from . import tune

    timing = tune.lookup(geometry, in_height, in_width, masked=False)
    if timing is not None:
        allowed = ["onednn"]
        if geometry.groups == 1:
            allowed.append("implicit")
            if rows_layout(geometry) is not None:
                allowed.append("implicit_rows")
        best = timing.best_dense(allowed)
        if best is not None:
            return best
    out_height, out_width = geometry.output_size(in_height, in_width)
    costs = cost_model.dense_costs(geometry, batch * out_height * out_width, True, batch * in_height * in_width,
                                   batch * out_height)
    return min(costs, key=costs.__getitem__)


@functools.lru_cache(maxsize=8)
def _every_row(positions: int) -> Tensor:
    """``arange(positions)``: the kept index of an unmasked conv (a few sizes cached: 8 MiB each
    at 1M positions)."""
    return torch.arange(positions, dtype=torch.int64)


def dense_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], geometry: ConvGeometry,
                 weights: Optional[LayerWeights] = None, kernel: Optional[str] = None,
                 cost_model: CostModel = DEFAULT_COST_MODEL, activation: Optional[str] = None) -> Tensor:
    """An unmasked conv (then ``activation``: None or ``"relu"``) by the kernel :func:`dense_kernel`
    picks (or ``kernel``), for inference.

    Without the compiled kernels, for other dtypes or devices and for grouped convs it is
    ``F.conv2d`` (the ReLU then in place on its output). The implicit GEMMs compute every output
    position into a pooled channels-last output, the ReLU as they write it; they agree with
    ``F.conv2d`` up to float rounding (a different summation order).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    ext = _ext_for(x)
    batch, _, in_height, in_width = x.shape
    if kernel is None:
        kernel = dense_kernel(geometry, batch, in_height, in_width, cost_model) if ext is not None else "onednn"
    elif kernel not in DENSE_KERNELS:
        raise ValueError(f"kernel must be one of {DENSE_KERNELS}, got {kernel!r}")
    if kernel == "implicit_rows" and rows_layout(geometry) is None:
        kernel = "implicit"
    relu = activation == "relu"
    if ext is None or geometry.groups != 1 or kernel == "onednn":
        y = F.conv2d(x, weight, bias, geometry.stride, geometry.padding, geometry.dilation, geometry.groups)
        return y.relu_() if relu else y
    if weights is None:
        weights = LayerWeights(weight, bias, None, geometry.groups)
    out_height, out_width = geometry.output_size(in_height, in_width)
    positions = batch * out_height * out_width
    out_channels = geometry.out_channels
    rows = _every_row(positions)
    none_i32, none_f32 = torch.empty(0, dtype=torch.int32), torch.empty(0)
    out_flat = ext.masked_output(positions, out_channels, rows, none_f32, none_f32, False, False)  # no fill
    x_nhwc = x.permute(0, 2, 3, 1).contiguous()
    if kernel == "implicit_rows":
        packed, padded_bias, chunk = weights.rows(*rows_layout(geometry))
        with _kernel("implicit_rows"):
            ext.implicit_rows(x_nhwc, packed, padded_bias, rows, out_flat, out_height, out_width, geometry.stride[0],
                              *geometry.padding, chunk, relu, none_i32, none_f32, none_f32)
    else:
        packed, padded_bias = weights.implicit
        with _kernel("implicit_conv"):
            ext.implicit_conv(x_nhwc, packed, padded_bias, rows, out_flat, out_height, out_width, *geometry.kernel_size,
                              *geometry.stride, *geometry.padding, *geometry.dilation, relu, none_i32, none_f32,
                              none_f32, _implicit_variant(geometry, in_height, in_width))
    return out_flat.view(batch, out_height, out_width, out_channels).permute(0, 3, 1, 2)


def _rows_of(t: Optional[Tensor], rows: int, channels: int) -> Optional[Tensor]:
    """``t`` (``(B, C, H, W)``, channels-last contiguous float32 CPU) as a ``(rows, C)`` view, else None."""
    if t is None or t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != 4 or t.shape[1] != channels:
        return None
    nhwc = t.permute(0, 2, 3, 1)
    return nhwc.view(rows, channels) if nhwc.is_contiguous() else None


def add_residual(out: Tensor, residual: Tensor, activation: Optional[str] = None,
                 use_extension: bool = True) -> Tensor:
    """``act(out + residual)``, in place on ``out`` (a fresh output of the engine) where possible.

    Both channels-last float32 CPU tensors of one shape take the compiled single pass; anything
    else (broadcasting, other layouts) PyTorch's ops.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    ext = _ext_for(out, use_extension)
    if (ext is not None and residual.shape == out.shape and residual.dtype == out.dtype
            and residual.device == out.device and out.dim() == 4
            and out.is_contiguous(memory_format=torch.channels_last)
            and residual.is_contiguous(memory_format=torch.channels_last)):
        channels = out.shape[1]
        with _kernel("add_residual"):
            ext.add_residual(out.permute(0, 2, 3, 1).view(-1, channels), residual.permute(0, 2, 3, 1).reshape(-1, channels),
                             activation == "relu")
        return out
    out = out + residual
    return out.relu_() if activation == "relu" else out


def _resized(t: Tensor, resize: Optional[dict]) -> Tensor:
    return t if resize is None else F.interpolate(t, **resize)


#: resize modes :func:`fuse_sum` computes itself
FUSE_SUM_MODES = ("nearest", "nearest-exact", "bilinear")


@functools.lru_cache(maxsize=256)
def _nearest_index(length: int, resize_items: tuple, axis: int) -> Tensor:
    """The source index of every output row (axis 0) or column (axis 1) of a nearest resize,
    as PyTorch's own kernel picks it (read off a resized ramp, so it is exact by construction)."""
    resize = dict(resize_items)
    shape = (1, 1, length, 1) if axis == 0 else (1, 1, 1, length)
    ramp = torch.arange(length, dtype=torch.float32).reshape(shape)
    picked = F.interpolate(ramp, **resize)
    return (picked[0, 0, :, 0] if axis == 0 else picked[0, 0, 0, :]).to(torch.int64).contiguous()


@functools.lru_cache(maxsize=256)
def _bilinear_axis(length: int, out_length: int, align_corners: bool, scale: Optional[float]) -> Tuple[Tensor, Tensor]:
    """Source indices ``(2, out)`` (lower, upper) and weights ``(2, out)`` of a bilinear resize along
    one axis, computed as PyTorch's ``upsample_bilinear2d`` computes them in float32 (``scale``: the
    scale factor given to ``F.interpolate``, which PyTorch then uses instead of the size ratio)."""
    d = torch.arange(out_length, dtype=torch.float32)
    if align_corners:
        ratio = torch.tensor((length - 1) / (out_length - 1) if out_length > 1 else 0.0, dtype=torch.float32)
        src = ratio * d
    else:
        ratio = torch.tensor(1.0 / scale if scale else length / out_length, dtype=torch.float32)
        src = (ratio * (d + 0.5) - 0.5).clamp_min(0.0)
    lower = src.to(torch.int64).clamp_max(length - 1)
    upper = lower + (lower < length - 1).to(torch.int64)
    upper_weight = (src - lower.to(torch.float32)).clamp(0.0, 1.0)
    return (torch.stack([lower, upper]).contiguous(),
            torch.stack([1.0 - upper_weight, upper_weight]).contiguous())


def _resize_tables(t: Tensor, resize: Optional[dict], out_size: Tuple[int, int]):
    """``(ys, xs, yw, xw)`` of one :func:`fuse_sum` term for the compiled kernel."""
    empty = torch.empty(0)
    if resize is None:
        return torch.arange(out_size[0]), torch.arange(out_size[1]), empty, empty
    if resize["mode"] != "bilinear":
        items = tuple(sorted(resize.items()))
        return _nearest_index(t.shape[2], items, 0), _nearest_index(t.shape[3], items, 1), empty, empty
    scales = resize.get("scale_factor")
    if resize.get("size") is not None or resize.get("recompute_scale_factor"):
        scales = None  # PyTorch then uses the ratio of the sizes
    sy, sx = (scales, scales) if scales is None or isinstance(scales, (int, float)) else scales
    align = bool(resize.get("align_corners") or False)
    ys, yw = _bilinear_axis(int(t.shape[2]), out_size[0], align, sy)
    xs, xw = _bilinear_axis(int(t.shape[3]), out_size[1], align, sx)
    return ys, xs, yw, xw


def fuse_sum(terms: Sequence[Tensor], resizes: Sequence[Optional[dict]], activation: Optional[str] = None) -> Tensor:
    """``act(r0(t0) + r1(t1) + ...)``, added left to right, where ``rj`` is ``F.interpolate`` with the
    keyword arguments ``resizes[j]`` (None: the term as it is), nearest or bilinear.

    HRNet's fuse layers have this form (the branches upsampled by ``nn.Upsample`` and summed, then
    a ReLU; nearest in timm's and the pose network's trunk, bilinear in the segmentation network's);
    :func:`anytimeify._fx.fold.fuse_sums` rewrites them into calls of this function. For float32
    channels-last CPU inference the compiled kernel reads every term once and writes the result
    once; otherwise PyTorch's ops run. With nearest resizes both give the same result bit for bit,
    with bilinear ones up to float rounding (the kernel's weights are PyTorch's, its order of
    operations may differ).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if any(r is not None and r.get("mode") not in FUSE_SUM_MODES for r in resizes):
        raise ValueError(f"fuse_sum resizes must use one of the modes {FUSE_SUM_MODES}, got "
                         f"{[r.get('mode') for r in resizes if r is not None]}")
    ext = inference_kernels(terms)
    if ext is not None:
        out_size = _resized_size(terms[0], resizes[0])
        if (all(t.permute(0, 2, 3, 1).is_contiguous() for t in terms)
                and all(_resized_size(t, r) == out_size for t, r in zip(terms, resizes))
                and all(t.shape[:2] == terms[0].shape[:2] for t in terms)):
            tables = [_resize_tables(t, r, out_size) for t, r in zip(terms, resizes)]
            with _kernel("fuse_sum"):
                out = ext.fuse_sum([t.permute(0, 2, 3, 1) for t in terms], *(list(column) for column in zip(*tables)),
                                   out_size[0], out_size[1], activation == "relu")
            return out.permute(0, 3, 1, 2)
    out = _resized(terms[0], resizes[0])
    for t, r in zip(terms[1:], resizes[1:]):
        out = out + _resized(t, r)
    return torch.relu(out) if activation == "relu" else out


def _resized_size(t: Tensor, resize: Optional[dict]) -> Tuple[int, int]:
    """The (H, W) of ``_resized(t, resize)`` (PyTorch floors ``size * scale_factor``)."""
    if resize is None:
        return int(t.shape[2]), int(t.shape[3])
    if resize.get("size") is not None:
        size = resize["size"]
        return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    scale = resize["scale_factor"]
    sy, sx = (scale, scale) if isinstance(scale, (int, float)) else scale
    return int(math.floor(t.shape[2] * sy)), int(math.floor(t.shape[3] * sx))


def executed_interp_macs(plan: MaskPlan, lam: Tensor, channels: int) -> int:
    """Multiply-adds of the halo stencil for a plan and ``lambda`` (0 when all kept or skipped)."""
    if plan.kept in (0, plan.positions):
        return 0
    radius = stencil_taps(lam)[0]
    halo, neighbours = plan.halo_index(radius)
    return int(neighbours.numel()) * channels
