"""Confidence criteria: from an exit's logits to the mask of positions later convolutions compute.

Every criterion maps logits ``(B, K, h, w)`` to a boolean "computed" mask ``(B, 1, h, w)``
(True = not confident yet, compute it). Masks carry no gradient. A position whose logits are not
all finite (NaN, inf) is computed whatever the criterion says: comparisons with NaN are False, so
it would otherwise count as confident and its broken prediction would be copied forward silently.
"""
from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

__all__ = ["Confidence", "CRITERIA", "EXECUTIONS", "computed_mask", "NON_FINITE_WARNING"]

CRITERIA = ("max_prob", "entropy", "topk", "random", "heatmap")
"""The criterion names :class:`Confidence` accepts (besides a callable)."""
#: executions of masked convs: "auto" is dense under autograd and sparse without it
EXECUTIONS = ("auto", "dense", "sparse")

CriterionFn = Callable[[torch.Tensor], torch.Tensor]

#: the RuntimeWarning :func:`computed_mask` gives when an exit's logits are not all finite (one
#: stable text, so Python's default filter shows it once per process)
NON_FINITE_WARNING = ("non-finite logits (NaN or inf) found at an early exit: confidence adaptivity computes "
                      "those positions at every exit instead of skipping them; check the input and the model")


@dataclass
class Confidence:
    """Confidence adaptivity settings, passed to ``convert(..., confidence=...)``.

    Args:
        threshold: meaning depends on the criterion. ``max_prob``: a position is skipped where
            the max softmax probability is above it (0.998 in the paper; above 1 skips nothing).
            ``entropy``: skipped where the softmax entropy (nats) is below it. ``heatmap``: skipped
            where the max over joints of the heatmap is below it (0.002 in the paper).
        criterion: ``"max_prob"``, ``"entropy"``, ``"topk"``, ``"random"``, ``"heatmap"``, or a
            callable mapping logits ``(B, K, h, w)`` to a boolean *computed* mask ``(B, 1, h, w)``
            or ``(B, h, w)``; a callable with two parameters also receives the 0-based exit index.
        execution: ``"auto"`` (the default: dense wherever autograd records the computation,
            sparse under ``torch.no_grad()`` / ``torch.inference_mode()``), ``"dense"`` (full
            convolution then blend; differentiable, for training and export) or ``"sparse"``
            (computes only the positions the mask keeps; inference only). Both executions give
            the same outputs up to float rounding, so ``"auto"`` trains and serves one model.
        fraction: for ``topk`` and ``random``: the fraction of positions to skip after each exit,
            one number for all exits or one per early exit.
        seed: seed of the ``random`` criterion's generator (None: torch's global generator).
        enabled: when False every position is computed (plain early exits); switch it with
            :meth:`AnytimeModel.set_confidence` to turn confidence adaptivity on after some epochs.

    ``convert`` copies the settings it is given: change a converted model's own through
    ``model.confidence`` (e.g. ``model.confidence.threshold = 0.99``).

    Raises:
        ValueError: at construction, an unknown criterion or execution, a threshold that is not
            a number, or a fraction outside [0, 1].
        TypeError: a criterion that is neither a name nor a callable.
    """

    threshold: float = 0.998
    criterion: Union[str, CriterionFn] = "max_prob"
    execution: str = "auto"
    fraction: Union[float, Sequence[float]] = 0.5
    seed: Optional[int] = None
    enabled: bool = True
    _generator: Optional[torch.Generator] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.criterion, str) and self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA} or a callable, got {self.criterion!r}")
        if not isinstance(self.criterion, str) and not callable(self.criterion):
            raise TypeError(f"criterion must be a name or a callable, got {type(self.criterion).__name__}")
        if self.execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {self.execution!r}")
        if not isinstance(self.threshold, (int, float)) or math.isnan(self.threshold):
            raise ValueError(f"threshold must be a number, got {self.threshold!r}")
        fractions = [self.fraction] if isinstance(self.fraction, (int, float)) else list(self.fraction)
        if not fractions or any(not 0.0 <= f <= 1.0 for f in fractions):
            raise ValueError(f"fraction must lie in [0, 1] (one value or one per exit), got {self.fraction!r}")

    def fraction_for(self, exit_index: int) -> float:
        if isinstance(self.fraction, (int, float)):
            return float(self.fraction)
        fractions = list(self.fraction)
        if exit_index >= len(fractions):
            raise ValueError(f"fraction gives {len(fractions)} values but exit {exit_index + 1} needs one")
        return float(fractions[exit_index])

    def generator(self, device: torch.device) -> Optional[torch.Generator]:
        if self.seed is None:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator


def _takes_exit_index(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


def _skip_fraction(score: torch.Tensor, fraction: float) -> torch.Tensor:
    """Computed mask that skips the ``fraction`` highest-scoring positions of each sample."""
    b = score.shape[0]
    flat = score.reshape(b, score.shape[-2] * score.shape[-1])  # (an empty batch too)
    n_skip = int(round(fraction * flat.shape[1]))
    computed = torch.ones_like(flat, dtype=torch.bool)
    if n_skip > 0:
        idx = flat.topk(n_skip, dim=1).indices
        computed.scatter_(1, idx, False)
    return computed.view(b, 1, *score.shape[-2:])


@torch.no_grad()
def computed_mask(logits: torch.Tensor, confidence: Confidence, exit_index: int) -> torch.Tensor:
    """The boolean computed mask ``(B, 1, h, w)`` that exit ``exit_index`` (0-based) decides.

    Positions whose logits are not all finite are computed whatever the criterion says, with a
    ``RuntimeWarning`` (:data:`NON_FINITE_WARNING`).
    """
    logits = logits.detach()
    if not confidence.enabled:
        return torch.ones(logits.shape[0], 1, *logits.shape[-2:], dtype=torch.bool, device=logits.device)
    return _criterion_mask(logits, confidence, exit_index) | _non_finite(logits)


def _non_finite(logits: torch.Tensor) -> torch.Tensor:
    """``(B, 1, h, w)``: True where some logit is NaN or infinite (warning once when there are)."""
    from .compiled import _traced

    traced = _traced((logits,))  # (no data to look at while tracing)
    # a finite sum over the channels means every logit there is finite (a NaN or an infinity makes
    # the sum NaN or infinite): one reduction decides the usual case, the exact test runs only where
    # some sum is not finite (a NaN, an infinity, or finite logits whose sum overflows)
    total = logits.sum(dim=1, keepdim=True)
    if not traced and bool(torch.isfinite(total).all()):
        return torch.zeros(total.shape, dtype=torch.bool, device=logits.device)
    bad = ~torch.isfinite(logits).all(dim=1, keepdim=True)
    if not traced and bool(bad.any()):
        warnings.warn(NON_FINITE_WARNING, RuntimeWarning)
    return bad


def _criterion_mask(logits: torch.Tensor, confidence: Confidence, exit_index: int) -> torch.Tensor:
    """The computed mask of the criterion alone."""
    crit = confidence.criterion
    if callable(crit):
        mask = crit(logits, exit_index) if _takes_exit_index(crit) else crit(logits)
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"the confidence criterion returned {type(mask).__name__}, expected a tensor")
        if mask.dim() == 3:
            mask = mask.unsqueeze(1)
        expected = (logits.shape[0], 1, *logits.shape[-2:])
        if tuple(mask.shape) != expected:
            raise ValueError(f"the confidence criterion returned a mask of shape {tuple(mask.shape)}, "
                             f"expected {expected} (or without the channel axis)")
        return mask.to(torch.bool)
    if crit == "max_prob":
        prob = logits.float().softmax(dim=1).amax(dim=1, keepdim=True)
        return prob <= confidence.threshold
    if crit == "entropy":
        logp = logits.float().log_softmax(dim=1)
        entropy = -(logp.exp() * logp).sum(dim=1, keepdim=True)
        return entropy >= confidence.threshold
    if crit == "heatmap":
        return logits.amax(dim=1, keepdim=True) >= confidence.threshold
    if crit == "topk":
        score = logits.float().softmax(dim=1).amax(dim=1)
        return _skip_fraction(score, confidence.fraction_for(exit_index))
    if crit == "random":
        score = torch.rand(logits.shape[0], *logits.shape[-2:], device=logits.device,
                           generator=confidence.generator(logits.device))
        return _skip_fraction(score, confidence.fraction_for(exit_index))
    raise ValueError(f"unknown criterion {crit!r}")  # unreachable: validated in Confidence
