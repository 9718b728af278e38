"""Masks as values that flow through the converted graph, never state kept on modules.

After early exit k, a :class:`MaskDecider` module turns the (aggregated) logits into a
:class:`MaskSet`: the boolean computed mask at the logits' resolution, resized on demand (nearest
neighbour, as the reference resizes the logits) to every conv output size it governs, and the
sparse engine's index plans for each size. A MaskSet lives for one call, so two interleaved
generators or calls at different input sizes never see each other's masks.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .criteria import Confidence, computed_mask

__all__ = ["MaskSet", "MaskDecider", "copy_aggregate", "mask_for_conv", "plan_for_mask", "geometry_of"]


class MaskSet:
    """The masks one exit decides, for one forward call.

    Args:
        computed: ``(B, 1, h, w)`` bool, True where later convolutions compute.
        sparse: whether the convs it governs run the sparse engine (then index plans are built).
        all_computed: known to compute every position (confidence adaptivity switched off): the
            convs it governs then run as plain convs, with no blend (it would change nothing).
    """

    def __init__(self, computed: torch.Tensor, sparse: bool = False, all_computed: bool = False):
        self.computed = computed
        self.sparse = sparse
        self.all_computed = all_computed
        self._masks: Dict[Tuple[int, int, torch.dtype], torch.Tensor] = {}
        self._plans: Dict[Tuple[int, int, torch.dtype], object] = {}

    def at(self, height: int, width: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The mask at ``height x width`` (1.0 = computed), shared by every conv of that size."""
        key = (height, width, dtype)
        mask = self._masks.get(key)
        if mask is None:
            mask = self.computed.to(dtype)
            if tuple(mask.shape[-2:]) != (height, width):
                mask = F.interpolate(mask, size=(height, width), mode="nearest")
            self._masks[key] = mask
        return mask

    def plan_at(self, height: int, width: int, dtype: torch.dtype = torch.float32):
        """The sparse engine's index plan for the mask at that size, built once per call."""
        from .plans import MaskPlan

        key = (height, width, dtype)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = MaskPlan(self.at(height, width, dtype))
        return plan

    @property
    def skipped(self) -> float:
        """Fraction of positions (over the batch) marked confident (0.0 for an empty batch)."""
        if self.computed.numel() == 0:
            return 0.0
        return 1.0 - self.computed.float().mean().item()


class MaskDecider(nn.Module):
    """Graph node after early exit ``exit_index``: logits -> :class:`MaskSet` (no parameters)."""

    def __init__(self, confidence: Confidence, exit_index: int):
        super().__init__()
        self.confidence = confidence
        self.exit_index = exit_index

    def forward(self, logits: torch.Tensor) -> MaskSet:
        execution = self.confidence.execution
        sparse = execution == "sparse" or (execution == "auto" and not torch.is_grad_enabled())
        return MaskSet(computed_mask(logits, self.confidence, self.exit_index), sparse=sparse,
                       all_computed=not self.confidence.enabled)

    def extra_repr(self) -> str:
        crit = self.confidence.criterion
        name = crit if isinstance(crit, str) else getattr(crit, "__name__", "callable")
        return f"exit={self.exit_index + 1}, criterion={name}, threshold={self.confidence.threshold}"


def copy_aggregate(previous: torch.Tensor, new: torch.Tensor, masks: MaskSet) -> torch.Tensor:
    """Copy aggregation: confident positions keep the earlier prediction.

    ``out = previous * (1 - m) + new * m`` with ``m`` the computed mask at the logits' size.
    Where an exit's logits come out a row or column off the next one's (an exit resized by a
    fraction at an input size whose maps round differently), the earlier prediction is resized
    bilinearly to the new one's size first.
    """
    if previous.shape != new.shape and previous.dim() == 4 and previous.shape[:2] == new.shape[:2]:
        previous = F.interpolate(previous, size=tuple(new.shape[-2:]), mode="bilinear", align_corners=False)
    if previous.shape != new.shape:
        raise ValueError(f"copy aggregation needs exits of equal shape, got {tuple(previous.shape)} "
                         f"and {tuple(new.shape)}")
    m = masks.at(new.shape[-2], new.shape[-1], torch.bool)
    return torch.where(m, new, previous)


def mask_for_conv(masks: MaskSet, x: torch.Tensor, geometry: Tuple[int, ...]) -> Optional[torch.Tensor]:
    """The mask at the output size of a conv with ``geometry`` = (kh, kw, sh, sw, ph, pw, dh, dw) on
    ``x``; None while confidence adaptivity is switched off (the plain conv, no blend: before it
    is switched on in training, the 7x7 blend of an all-ones mask would cost a quarter of a step
    and change nothing)."""
    from .geometry import conv_output_hw

    if masks.all_computed:
        return None
    kh, kw, sh, sw, ph, pw, dh, dw = geometry
    return masks.at(*conv_output_hw(x.shape[-2], x.shape[-1], (kh, kw), (sh, sw), (ph, pw), (dh, dw)), x.dtype)


def plan_for_mask(masks: MaskSet, mask: Optional[torch.Tensor]):
    """The sparse engine's index plan of a mask :func:`mask_for_conv` returned (None in dense
    execution and for no mask)."""
    if mask is None or not masks.sparse:
        return None
    return masks.plan_at(mask.shape[-2], mask.shape[-1], mask.dtype)


def geometry_of(conv: nn.Conv2d) -> Tuple[int, ...]:
    """(kh, kw, sh, sw, ph, pw, dh, dw) of a conv with explicit symmetric padding."""
    from .conv import conv_geometry

    g = conv_geometry(conv)
    return (*conv.kernel_size, *conv.stride, *g.padding, *conv.dilation)
