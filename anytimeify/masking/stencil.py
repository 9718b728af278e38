"""The interpolation on the halo: the tap weights of a ``lambda``, the halo stencil (compiled or
PyTorch) and its multiply-adds.

Only the skipped positions within the support radius of a kept one (the halo) get the
interpolation; everywhere else its exact result is 0.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from .compiled import _ext_for, _kernel
from .interp import INTERP_RADIUS, rbf_kernel, support_radius
from .plans import MaskPlan

__all__ = ["halo_stencil", "stencil_taps", "executed_interp_macs"]


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


def executed_interp_macs(plan: MaskPlan, lam: Tensor, channels: int) -> int:
    """Multiply-adds of the halo stencil for a plan and ``lambda`` (0 when all kept or skipped)."""
    if plan.kept in (0, plan.positions):
        return 0
    radius = stencil_taps(lam)[0]
    halo, neighbours = plan.halo_index(radius)
    return int(neighbours.numel()) * channels
