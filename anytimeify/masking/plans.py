"""Index plans of a mask: the index lists a masked conv's kernels read, built once per mask.

:class:`MaskPlan` holds the index lists of one mask (kept positions, skipped positions, the
interpolation halo and its neighbour lists, and per conv geometry the im2col gather lists). They
are built lazily, once, and reused by every conv governed by the same mask. A plan belongs to one
forward call: the caller creates it (directly or through an :class:`IndexCache`) and passes it to
every :class:`~anytimeify.masking.conv.MaskedConv2d` that shares the mask. Nothing is stored on
modules, so interleaved calls cannot corrupt each other.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .compiled import _extension, _traced
from .geometry import ConvGeometry
from .interp import kernel_offsets

__all__ = ["MaskPlan", "IndexCache"]


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
        #: per-layer decisions taken under this mask (strategy, MAC counts), keyed by
        #: everything they depend on: the many convs of a segment that share a geometry look them
        #: up in the tuning table once per forward instead of once each (see ``dispatch``)
        self.decisions: Dict[Tuple, object] = {}

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
    #: build the halo lists with the compiled kernels where they are loaded (False: PyTorch's ops,
    #: the reference the tests compare them with)
    use_extension = True

    def _ext(self):
        """The compiled kernels where they may build this plan's lists (a CPU mask with data)."""
        if not self.use_extension or self.keep.device.type != "cpu" or _traced((self.keep,)):
            return None
        return _extension()

    def _keep_contiguous(self) -> Tensor:
        return self.keep.contiguous()

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
        ext = self._ext()
        if ext is not None:  # one pass over the keep map (the code below is the reference)
            halo, neighbours = ext.halo_lists(self._keep_contiguous(), radius)
            self._halo[radius] = (halo, neighbours)
            return halo, neighbours
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
        ext = self._ext()
        if ext is not None:
            result = tuple(ext.boundary_slots(self._keep_contiguous(), radius))
            self._halo[key] = result  # type: ignore[assignment]
            return result  # type: ignore[return-value]
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
