"""RBF interpolation that fills skipped positions of a masked convolution (ADP-C, REFERENCE.md §3).

The filter is a 7x7 depthwise kernel, the same for every channel, with weight
``exp(-lambda^2 * d^2)`` at squared distance ``d^2`` from the centre, normalised as the reference
implementation normalises it: ``kernel / (kernel.sum() + 1e-5)``, the sum over the whole 7x7 kernel
(not over the computed neighbours) plus an epsilon, applied with zero padding. The centre's squared
distance is set to 1e5, as the reference does, so its weight is 0 for any ``lambda`` above 0.01;
it only ever multiplies a skipped (zero) position anyway, but it enters the normalisation. The
epsilon matters: at the initial ``lambda = 3`` the kernel sums to about 5e-4, so it shrinks every
filled value by about 2%.

For a large ``lambda`` almost all of the mass sits on the nearest neighbours, so a cropped kernel
(still normalised by the full 7x7 sum plus epsilon) gives the same result to fp32 precision;
:func:`support_radius` says how far the kernel may be cropped for a given ``lambda``.
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

_logger = logging.getLogger(__name__)

__all__ = ["INTERP_RADIUS", "SUPPORT_TOLERANCE", "NORM_EPSILON", "rbf_kernel", "interpolate", "support_radius",
           "kernel_offsets"]

#: radius of the interpolation kernel of the paper (7x7)
INTERP_RADIUS = 3
#: mass of the normalised kernel that may lie outside a cropped support
SUPPORT_TOLERANCE = 1e-9
#: added to the kernel sum before normalising (the reference implementation's ``10**(-5)``)
NORM_EPSILON = 1e-5
#: squared distance the reference gives the centre tap (so that its weight vanishes)
CENTRE_DISTANCE = 1e5


def _squared_distances(radius: int, dtype: torch.dtype, device: Union[torch.device, str, None]) -> Tensor:
    """The squared distances of a ``(2r+1)^2`` kernel's taps from its centre, the centre's set to
    :data:`CENTRE_DISTANCE` (the reference's ``square_dis`` table)."""
    offsets = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    table = offsets[:, None] ** 2 + offsets[None, :] ** 2
    table[radius, radius] = CENTRE_DISTANCE
    return table


def rbf_kernel(lam: Tensor, radius: int = INTERP_RADIUS, support: Optional[int] = None) -> Tensor:
    """The normalised RBF interpolation kernel.

    Args:
        lam: scalar tensor ``lambda`` (a learnable parameter; the kernel is differentiable in it).
        radius: radius of the full kernel the weights are normalised over (3 gives the paper's 7x7).
        support: if given, crop the kernel to a ``(2*support+1)^2`` window around the centre; the
            weights keep the normalisation of the full kernel, so cropping only drops mass.

    Returns:
        A ``(2r+1, 2r+1)`` tensor with ``r = support`` if given else ``radius``: the weights over
        their sum plus :data:`NORM_EPSILON`; the centre's weight is ``exp(-lambda^2 * 1e5)``.
    """
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    if support is not None and not 0 <= support <= radius:
        raise ValueError(f"support must lie in [0, radius={radius}], got {support}")
    lam = torch.as_tensor(lam)
    dtype = lam.dtype if lam.is_floating_point() else torch.get_default_dtype()
    d2 = _squared_distances(radius, dtype, lam.device)
    weights = torch.exp(-(lam.to(dtype) ** 2) * d2)
    kernel = weights / (weights.sum() + NORM_EPSILON)
    if support is not None and support < radius:
        lo, hi = radius - support, radius + support + 1
        kernel = kernel[lo:hi, lo:hi]
    return kernel


def support_radius(lam: Union[Tensor, float], radius: int = INTERP_RADIUS, tol: float = SUPPORT_TOLERANCE) -> int:
    """Smallest crop radius of the interpolation kernel that is exact to fp32 precision.

    The result ``r`` is the smallest radius such that the total weight of the normalised kernel
    (weights over their sum plus :data:`NORM_EPSILON`) outside the ``(2r+1)^2`` window is below
    ``tol``: a filled value is a weighted sum of kept neighbours, so cropping changes it by at most
    ``tol`` times the largest neighbour. At ``lambda = 3`` that is 1 (a 3x3 support); at ``lambda``
    near 1 the full kernel.

    Args:
        lam: the interpolation parameter ``lambda`` (tensor or float).
        radius: radius of the full kernel.
        tol: mass that may be dropped, relative to the kernel sum.

    Returns:
        An integer in ``[1, radius]`` (``radius`` itself when ``radius < 1``).
    """
    lam_value = float(lam.detach().item()) if isinstance(lam, Tensor) else float(lam)
    if not math.isfinite(lam_value):
        raise ValueError(f"interpolation lambda must be finite, got {lam_value}")
    d2 = _squared_distances(radius, torch.float64, "cpu")
    weights = torch.exp(-(lam_value ** 2) * d2)
    total = weights.sum() + NORM_EPSILON
    ring = torch.maximum(*torch.meshgrid(torch.arange(-radius, radius + 1).abs(),
                                          torch.arange(-radius, radius + 1).abs(), indexing="ij"))
    for r in range(1, radius + 1):
        if float(weights[ring > r].sum() / total) < tol:
            return r
    return max(radius, 0)


def kernel_offsets(support: int) -> Tensor:
    """Row/column offsets of the non-centre taps of a ``(2*support+1)^2`` kernel, row-major.

    Returns:
        A ``(T, 2)`` int64 tensor, ``T = (2*support+1)^2 - 1``; row ``t`` belongs to the kernel
        entry ``rbf_kernel(..., support=support).flatten()`` with the centre removed.
    """
    span = torch.arange(-support, support + 1)
    dy, dx = torch.meshgrid(span, span, indexing="ij")
    offsets = torch.stack([dy.flatten(), dx.flatten()], dim=1)
    return offsets[(offsets != 0).any(dim=1)]


def interpolate(y_masked: Tensor, lam: Tensor, radius: int = INTERP_RADIUS, support: Optional[int] = None) -> Tensor:
    """Apply the RBF interpolation ``I`` to a masked map (depthwise, same filter per channel).

    Args:
        y_masked: ``(B, C, H, W)`` map, already multiplied by the mask (skipped positions 0).
        lam: scalar ``lambda``; gradients flow to it.
        radius: radius of the full kernel (normalisation).
        support: optional crop radius (see :func:`rbf_kernel`).

    Returns:
        ``I(y_masked)``, same shape as the input (zero padding at the borders).
    """
    if y_masked.dim() != 4:
        raise ValueError(f"interpolate expects a (B, C, H, W) tensor, got shape {tuple(y_masked.shape)}")
    kernel = rbf_kernel(lam.to(y_masked.dtype), radius=radius, support=support)
    channels = y_masked.shape[1]
    size = kernel.shape[-1]
    weight = kernel.expand(channels, 1, size, size)
    return F.conv2d(y_masked, weight, padding=size // 2, groups=channels)
