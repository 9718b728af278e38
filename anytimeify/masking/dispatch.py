"""Which kernel runs a layer: the strategy of a masked conv (:func:`choose_strategy`,
:func:`resolve_strategy`), the kernel of an unmasked one (:func:`dense_kernel`) and the implicit
GEMM's variant. The timings measured on this machine decide where there are some
(:mod:`anytimeify.masking.tune`), else the cost model (:mod:`anytimeify.masking.cost`)."""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from .cost import DEFAULT_COST_MODEL, CostModel
from .geometry import ConvGeometry
from .layout import rows_layout
from .plans import MaskPlan

__all__ = ["STRATEGIES", "DENSE_KERNELS", "RESIDUAL_KERNELS", "INTO_KERNELS", "choose_strategy", "resolve_strategy",
           "dense_kernel", "residual_kernel", "residual_candidates", "onednn_post_ops_available"]


#: execution strategies of the sparse engine ("auto": the measured choice of this machine, see
#: :mod:`anytimeify.masking.tune`, else the cost model's; "pytorch": PyTorch's conv and blend, no
#: compiled kernel)
STRATEGIES = ("auto", "dense", "gather", "implicit", "implicit_rows", "pytorch")


DENSE_KERNELS = ("onednn", "implicit", "implicit_rows")

#: kernels of an unmasked conv with a residual that nothing reads after it (``act(conv(x) + r)``):
#: oneDNN's convolution with the addition (and ReLU) as post-ops, written into the residual's own
#: memory (``"onednn_into"``); the compiled implicit GEMMs writing into it (``"implicit_into"``,
#: ``"implicit_rows_into"``); or adding the residual as they write a pooled output (``"implicit"``,
#: ``"implicit_rows"``)
RESIDUAL_KERNELS = ("onednn_into", "implicit_into", "implicit_rows_into", "implicit", "implicit_rows")
#: the kernels of :data:`RESIDUAL_KERNELS` that write into the residual
INTO_KERNELS = ("onednn_into", "implicit_into", "implicit_rows_into")


@functools.lru_cache(maxsize=None)
def onednn_post_ops_available() -> bool:
    """Whether this PyTorch has oneDNN's convolution with post-ops, out of place and in place
    (x86 and ARM builds with oneDNN; the ops inductor's CPU fusions call). Asked once: the engine
    asks at every unmasked conv."""
    try:
        return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
                and hasattr(torch.ops.mkldnn, "_convolution_pointwise_"))
    except (AttributeError, RuntimeError):
        return False


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
        key = ("strategy", geometry, implicit, id(cost_model), device_type, in_positions, in_hw)
        chosen = plan.decisions.get(key)
        if chosen is None:  # once per geometry and plan: the lookup costs more than a small conv's kernel
            chosen = plan.decisions[key] = choose_strategy(
                geometry, plan.positions, plan.kept, cost_model, implicit=implicit, device_type=device_type,
                runs=plan.row_runs, in_positions=in_positions, out_rows=plan.batch * plan.height, in_hw=in_hw)
        return chosen
    if strategy == "implicit_rows" and (not implicit or rows_layout(geometry) is None):
        strategy = "implicit"
    if strategy == "implicit" and not implicit:
        strategy = "gather"
    return strategy


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


def _implicit_variant(geometry: ConvGeometry, in_height: int, in_width: int) -> int:
    """Which of the implicit GEMM's two kernels a layer runs: measured on this machine where tuning
    is on (1: weights shared in L1 by groups of positions; 2: accumulators in registers over every
    kernel row), else 0 (by the kernel's shape: 2 with several kernel rows, else 1)."""
    from . import tune

    return tune.implicit_variant(geometry, in_height, in_width)


def residual_kernel(geometry: ConvGeometry, batch: int, in_height: int, in_width: int,
                    cost_model: CostModel = DEFAULT_COST_MODEL) -> str:
    """The fastest kernel for an unmasked conv whose residual is dead after it (one of
    :data:`RESIDUAL_KERNELS`): measured on this machine where tuning is on (each candidate timed
    with a residual), else the cost model's dense kernel (:func:`dense_kernel`) writing into the
    residual."""
    from . import tune

    timing = tune.lookup(geometry, in_height, in_width, masked=False, residual=True)
    allowed = residual_candidates(geometry)
    if timing is not None and timing.residual:
        best = timing.best_residual(allowed)
        if best is not None:
            return best
    # not measured: the cost model's dense kernel, written into the residual
    dense = dense_kernel(geometry, batch, in_height, in_width, cost_model)
    into = dense + "_into"
    if into in allowed:
        return into
    return allowed[0] if allowed else "implicit"


def residual_candidates(geometry: ConvGeometry) -> list:
    """The kernels of :data:`RESIDUAL_KERNELS` that can run a conv (oneDNN's where this PyTorch has
    it; the implicit GEMMs for groups 1, the row kernel where its layout fits)."""
    names = []
    for name in RESIDUAL_KERNELS:
        if name == "onednn_into":
            if onednn_post_ops_available():
                names.append(name)
        elif geometry.groups == 1 and (not name.startswith("implicit_rows") or rows_layout(geometry) is not None):
            names.append(name)
    return names
