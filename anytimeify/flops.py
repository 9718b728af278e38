"""FLOP counting with fvcore, per exit and cumulative, in GMACs and in the paper's unit.

Convention (REFERENCE.md §4, the ADP-C paper's): multiply-accumulates of convolutions and linear
layers (matrix products included), bias excluded; batch norm, pooling, resizing and softmax are
not counted. ``gmacs`` = MACs / 1e9; ``paper_gflops`` = MACs / 2**30. Exit k's figure counts
everything executed up to exit k's logits, earlier exits included.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

_logger = logging.getLogger(__name__)

__all__ = ["flops", "count_macs", "FlopReport", "ExitFlops", "PAPER_UNIT", "COUNTED_OPS"]

PAPER_UNIT = 2 ** 30
"""The paper's "GFLOPs" unit: MACs / 2**30 (``paper_gflops = macs / PAPER_UNIT``)."""
COUNTED_OPS = ("conv", "linear", "addmm", "matmul", "bmm", "einsum")
"""fvcore operator names that count: convolutions and linear maps (bias excluded)."""


@dataclass
class ExitFlops:
    """Cumulative cost up to one exit.

    Attributes:
        exit: exit number, 1-based.
        macs: MACs actually executed up to this exit (masked convs: only what the sparse engine
            computes for this input; equal to the dense count without confidence adaptivity).
        gmacs: ``macs / 1e9``.
        paper_gflops: the paper's count up to this exit in MACs / 2**30 (masked convs by the
            paper's formula ``dense * p + (1 - p) * p * C_out * 49 * H * W``).
        skipped: the fraction of positions this exit marks confident for the next segment.
    """

    exit: int
    macs: int
    gmacs: float
    paper_gflops: float
    skipped: float = 0.0


@dataclass
class FlopReport:
    """Per-exit cumulative FLOPs of a model at one input size.

    The base model's count is ``flops(base_model, x).exits[-1]`` (the CLI prints it as
    ``base_paper_gflops``).

    Attributes:
        model: the model's name (``name``, or its class name).
        input: the input shape ``[B, C, H, W]``.
        exits: one :class:`ExitFlops` per exit, cumulative.
        params: the model's parameter count.
    """

    model: str
    input: List[int]
    exits: List[ExitFlops]
    params: int

    def to_dict(self) -> dict:
        """The report as plain dicts and lists (``exits`` as a list of dicts), for JSON."""
        return asdict(self)


def count_macs(module: nn.Module, inputs: Tuple) -> int:
    """MACs of one call of ``module`` on ``inputs`` by fvcore, conv and linear ops only.

    Args:
        module: the module to count.
        inputs: the positional arguments of the call, as a tuple.

    Returns:
        The multiply-accumulates of the operators in :data:`COUNTED_OPS` (bias excluded).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # fvcore.nn scripts a loss with torch.jit.script on import
        from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(module, inputs)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation notices raised inside fvcore's tracer
        by_op = analysis.by_operator()
    return int(sum(v for k, v in by_op.items() if k in COUNTED_OPS))


def _input(x: Union[torch.Tensor, Sequence[int]], device, dtype) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype)
    size = tuple(int(s) for s in x)
    if len(size) == 2:
        size = (1, 3) + size
    if len(size) != 4 or min(size) <= 0:
        raise ValueError(f"input must be a tensor, (H, W) or (B, C, H, W); got {x!r}")
    return torch.randn(size, device=device, dtype=dtype)


def flops(model: nn.Module, x: Union[torch.Tensor, Sequence[int]], name: Optional[str] = None) -> FlopReport:
    """Count per-exit cumulative MACs of ``model`` on input ``x`` (a tensor or a size).

    For an :class:`~anytimeify.AnytimeModel` every segment is counted by fvcore on the values it
    really receives; for any other module, the whole forward is one exit. With confidence
    adaptivity the counts depend on the input's masks: plain convs count their dense MACs (the
    same as fvcore's), masked convs report what they execute and the paper's formula
    (REFERENCE.md §4), and each exit reports the fraction of positions it skips. The model runs
    in eval mode under ``torch.no_grad()`` and is put back in its mode afterwards.

    Args:
        model: an :class:`~anytimeify.AnytimeModel`, or any module (counted as one exit).
        x: an input tensor, or a size, ``(H, W)`` (batch 1, 3 channels) or ``(B, C, H, W)``, for
            which a random input is drawn.
        name: the report's model name (default: the model's class name).

    Returns:
        A :class:`FlopReport` with one cumulative :class:`ExitFlops` per exit.

    Raises:
        ValueError: ``x`` is neither a tensor nor a valid size, or an input the model does not
            take (the message says which sizes it takes).
    """
    from .model import AnytimeModel

    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    x = _input(x, device, dtype)
    params = sum(q.numel() for q in model.parameters())
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(model, AnytimeModel) and model.confidence is not None:
                model.check_input(x)
                exits = [ExitFlops(o.index, o.macs, o.macs / 1e9, o.paper_macs / PAPER_UNIT, o.skipped)
                         for o in model.anytime(x)]
            else:
                if isinstance(model, AnytimeModel):
                    model.check_input(x)
                    per_segment = _segment_macs(model, x)
                else:
                    per_segment = [count_macs(model, (x,))]
                exits, total = [], 0
                for i, macs in enumerate(per_segment):
                    total += macs
                    exits.append(ExitFlops(i + 1, total, total / 1e9, total / PAPER_UNIT))
    finally:
        model.train(was)
    return FlopReport(name or type(model).__name__, list(x.shape), exits, params)


def _segment_macs(model, x: torch.Tensor) -> List[int]:
    """fvcore's count for each segment of a model without masks, on the values it receives."""
    program = model.program
    env = {program.input_name: x}
    counts = []
    for seg in program.segments:
        args = tuple(env[n] for n in seg.inputs)
        counts.append(count_macs(seg.module, args))
        env.update(zip(seg.outputs, seg.module(*args)))
    return counts
