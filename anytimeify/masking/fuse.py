"""HRNet's fuse layers as one op: :func:`fuse_sum`, a sum of resized terms and an activation."""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .compiled import _kernel, inference_kernels
from .kernels import ACTIVATIONS

__all__ = ["FUSE_SUM_MODES", "fuse_sum"]


#: resize modes :func:`fuse_sum` computes itself
FUSE_SUM_MODES = ("nearest", "nearest-exact", "bilinear")


def _resized(t: Tensor, resize: Optional[dict]) -> Tensor:
    return t if resize is None else F.interpolate(t, **resize)


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
