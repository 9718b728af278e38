"""A convolution's hyper-parameters as the sparse engine sees them (:class:`ConvGeometry`) and
the output size they give."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

__all__ = ["ConvGeometry", "conv_output_hw"]


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
