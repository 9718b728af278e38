"""The analytical cost model of the sparse engine: time estimates of each strategy of one layer
(:class:`CostModel`), the choice where no timings were measured on this machine."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional

from .compiled import kernel_isa
from .geometry import ConvGeometry
from .layout import implicit_block, rows_layout

__all__ = ["CostModel", "DEFAULT_COST_MODEL"]


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
