"""How the implicit GEMMs split output channels for the loaded kernels' ISA: the channel-blocked
kernel's register block (:func:`implicit_block`) and the row-vectorised kernel's chunks
(:func:`rows_layout`). The weight packing, the cost model and the kernel calls all follow them."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

from .compiled import kernel_isa
from .geometry import ConvGeometry

__all__ = ["implicit_block", "rows_layout"]


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
