"""Confidence adaptivity: criteria, masks that flow through the graph, and masked convolutions."""
from .conv import MaskedConv2d
from .criteria import CRITERIA, Confidence, computed_mask
from .masks import MaskDecider, MaskSet, copy_aggregate

__all__ = ["Confidence", "CRITERIA", "computed_mask", "MaskedConv2d", "MaskSet", "MaskDecider", "copy_aggregate"]
