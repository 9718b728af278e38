"""Budgeted batch classification (MSDNet's and RANet's protocol, REFERENCE.md §7) with real early exit.

Given a budget of average cost per sample, :func:`calibrate` chooses one confidence threshold per
exit on a held-out validation split: for a parameter ``q``, exit ``k`` (1-based, of ``K``) is to
take the share ``q**k / sum_j q**j`` of the samples; walking the exits in order, its threshold is
the confidence of the ``floor(N * share_k)``-th most confident validation sample still in (none
leave when that count is 0), and the last exit takes the rest. The expected cost is the
validation samples' mean cumulative cost at the exit they take; ``q`` is searched so that it
meets the budget. :func:`evaluate_budgets` then applies each budget's thresholds to the test set
with :meth:`AnytimeModel.predict`, which really stops computing a sample that has left, and
reports the accuracy and the MACs actually spent.

The same works for dense models at image level: a whole image leaves at the first exit whose mean
confidence over positions reaches the threshold (:func:`anytimeify.model.confidence_scores`).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .model import AnytimeModel, confidence_scores

__all__ = ["Calibration", "BudgetResult", "ExitScores", "exit_scores", "calibrate", "evaluate_budgets",
           "thresholds_for_shares", "geometric_shares", "PROTOCOL_Q"]

#: the budget parameters of MSDNet's and RANet's published curves: q = i / 20 for i = 1..39
PROTOCOL_Q = tuple(i / 20 for i in range(1, 40))

Data = Union[Dataset, Tuple[torch.Tensor, torch.Tensor]]


def _loader(data: Data, batch_size: int) -> DataLoader:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        data = TensorDataset(data[0], data[1])
    if not isinstance(data, Dataset):
        raise TypeError(f"data must be a map-style Dataset of (image, label) or a tuple (images, labels), got "
                        f"{type(data).__name__}")
    return DataLoader(data, batch_size=batch_size, shuffle=False)


@dataclass
class ExitScores:
    """Every exit's confidence and prediction for every sample of a data set (all exits computed).

    Attributes:
        scores: ``(N, K)`` confidence of each sample at each exit.
        correct: ``(N, K)`` whether exit k's prediction is right (classification), else None.
        costs: ``(K,)`` cumulative MACs per sample up to each exit.
    """

    scores: torch.Tensor
    correct: Optional[torch.Tensor]
    costs: torch.Tensor


@torch.no_grad()
def exit_scores(model: AnytimeModel, data: Data, batch_size: int = 64) -> ExitScores:
    """Run every exit on ``data`` and keep each sample's confidence (and correctness) per exit.

    Args:
        model: the anytime model (eval mode, no confidence adaptivity).
        data: a Dataset of ``(image, label)`` or a tuple ``(images, labels)``.
        batch_size: images per pass.

    Returns:
        The :class:`ExitScores`, to reuse across budgets (``calibrate(..., scores=...)``,
            ``evaluate_budgets(..., val_scores=...)``).

    Raises:
        ValueError: the data set is empty.
    """
    _check_model(model)
    scores, correct, costs = [], [], None
    for images, labels in _loader(data, batch_size):
        outs = list(model.anytime(images))
        scores.append(torch.stack([confidence_scores(o.logits) for o in outs], dim=1).cpu())
        if outs[0].logits.dim() == 2:
            correct.append(torch.stack([o.logits.argmax(1).cpu() == labels.cpu() for o in outs], dim=1))
        if costs is None:
            costs = torch.tensor([o.macs / len(images) for o in outs], dtype=torch.float64)
    if costs is None:
        raise ValueError("the data set is empty")
    return ExitScores(torch.cat(scores), torch.cat(correct) if correct else None, costs)


def geometric_shares(q: float, num_exits: int) -> torch.Tensor:
    """Exit k's share of samples, ``q**k / sum_j q**j`` for k = 1..K (float64)."""
    if not q > 0:
        raise ValueError(f"the budget parameter q must be > 0, got {q!r}")
    k = torch.arange(1, num_exits + 1, dtype=torch.float64)
    logs = k * math.log(q)
    return torch.softmax(logs, dim=0)


def thresholds_for_shares(scores: torch.Tensor, shares: Sequence[float]) -> torch.Tensor:
    """The protocol's thresholds: exit k's is the confidence of the ``floor(N * share_k)``-th most
    confident sample still in (``inf``: none leaves); the last exit's is ``-inf`` (all the rest)."""
    n, k_exits = scores.shape
    thresholds = torch.full((k_exits,), math.inf, dtype=torch.float64)
    out = torch.zeros(n, dtype=torch.bool)
    for k in range(k_exits - 1):
        count = int(math.floor(n * float(shares[k])))
        remaining = scores[~out, k].to(torch.float64)
        if count >= 1 and len(remaining) >= count:
            thresholds[k] = remaining.sort(descending=True).values[count - 1]
        out |= scores[:, k].to(torch.float64) >= thresholds[k]
    thresholds[-1] = -math.inf
    return thresholds


def _exits_taken(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """0-based exit each sample takes under ``thresholds`` (the first whose score reaches it)."""
    passed = scores.to(torch.float64) >= thresholds[None, :]
    passed[:, -1] = True
    return passed.to(torch.int8).argmax(dim=1)


@dataclass
class Calibration:
    """Thresholds for a cost budget, chosen on a validation split.

    Attributes:
        budget: the requested average MACs per sample.
        q: the protocol's budget parameter found for it.
        thresholds: one per exit (the last ``-inf``); pass to :meth:`AnytimeModel.predict`.
        expected_macs: the validation samples' mean cost under these thresholds.
        exit_fractions: the fraction of validation samples leaving at each exit.
        val_accuracy: validation accuracy under these thresholds (classification), else None.
    """

    budget: float
    q: float
    thresholds: List[float]
    expected_macs: float
    exit_fractions: List[float]
    val_accuracy: Optional[float] = None

    def to_dict(self) -> dict:
        return asdict(self)


def _calibration(val: ExitScores, q: float, budget: float) -> Calibration:
    shares = geometric_shares(q, val.scores.shape[1])
    thresholds = thresholds_for_shares(val.scores, shares)
    taken = _exits_taken(val.scores, thresholds)
    k = val.scores.shape[1]
    fractions = torch.bincount(taken.long(), minlength=k).to(torch.float64) / len(taken)
    expected = float((fractions * val.costs).sum())
    accuracy = None
    if val.correct is not None:
        accuracy = float(100 * val.correct[torch.arange(len(taken)), taken.long()].to(torch.float64).mean())
    return Calibration(float(budget), float(q), [float(t) for t in thresholds], expected,
                       [float(f) for f in fractions], accuracy)


def calibrate(model: Optional[AnytimeModel], val_data: Optional[Data], budget: float, *,
              scores: Optional[ExitScores] = None, batch_size: int = 64, steps: int = 60) -> Calibration:
    """Choose per-exit thresholds that meet an average cost ``budget`` on the validation split.

    Args:
        model: the anytime model (eval mode, no confidence adaptivity).
        val_data: a held-out validation split (not the test set): a Dataset of ``(image, label)``
            or a tuple ``(images, labels)``.
        budget: average MACs per sample (between the first exit's cost and the last's).
        scores: :func:`exit_scores` of the validation split, to reuse across budgets.
        batch_size: images per pass when computing the scores.
        steps: bisection steps over ``log q``.

    Returns:
        A :class:`Calibration`; its ``expected_macs`` is the achievable cost closest to
            ``budget`` found (within one sample's cost of it when the budget lies inside the exits'
            cost range).

    Raises:
        TypeError: ``budget`` is not a number.
        ValueError: ``budget`` is NaN or infinite, or outside the exits' cost range.
    """
    budget = _check_budget(budget, "budget")
    val = scores if scores is not None else exit_scores(model, val_data, batch_size)
    low_cost, high_cost = float(val.costs[0]), float(val.costs[-1])
    if not low_cost <= budget <= high_cost:
        raise ValueError(f"budget {budget:.4g} MACs per sample is outside what the exits cost on average: from "
                         f"{low_cost:.4g} (everything leaves at exit 1) to {high_cost:.4g} (every exit)")
    lo, hi = math.log(1e-4), math.log(1e4)
    best = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        found = _calibration(val, math.exp(mid), budget)
        if best is None or abs(found.expected_macs - budget) < abs(best.expected_macs - budget):
            best = found
        if found.expected_macs > budget:
            hi = mid
        else:
            lo = mid
    assert best is not None
    return best


@dataclass
class BudgetResult:
    """One point of the budgeted-batch curve, measured on the test set with real early exit.

    Attributes:
        calibration: the thresholds and what they gave on the validation split.
        accuracy: test accuracy in percent (classification), else None.
        metrics: the ``metric`` factory's result (dense models), else None.
        mean_macs: MACs actually executed per test sample.
        exit_fractions: the fraction of test samples that left at each exit.
        seconds: wall-clock time of the test pass.
    """

    calibration: Calibration
    accuracy: Optional[float]
    mean_macs: float
    exit_fractions: List[float]
    seconds: float
    metrics: Optional[Dict[str, object]] = None
    extra: Dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate_budgets(model: AnytimeModel, test_data: Data, budgets: Optional[Sequence[float]] = None, *,
                     val_data: Optional[Data] = None, val_scores: Optional[ExitScores] = None,
                     metric: Optional[Callable[[], object]] = None, batch_size: int = 64) -> List[BudgetResult]:
    """The accuracy-versus-cost curve of budgeted batch classification, with real early exit.

    For each budget, thresholds are calibrated on ``val_data`` (:func:`calibrate`), then the test
    set runs through :meth:`AnytimeModel.predict`, so the cost reported is what was computed.

    Args:
        model: the anytime model (eval mode, no confidence adaptivity).
        test_data: the test split, as for :func:`calibrate`.
        budgets: average MACs per sample; None: the protocol's ``q = i/20, i = 1..39``
            (:data:`PROTOCOL_Q`) taken as the parameters themselves.
        val_data: the held-out validation split the thresholds are chosen on (required unless
            ``val_scores`` is given).
        val_scores: :func:`exit_scores` of the validation split.
        metric: for dense models, a factory of a metric with ``update(logits, target)`` and
            ``compute()`` (e.g. ``lambda: SegmentationMetrics(19)``); classification counts accuracy.
        batch_size: images per pass.

    Returns:
        One :class:`BudgetResult` per budget, in the order given: the test accuracy (or the
            ``metric``'s result) and the MACs actually spent.

    Raises:
        ValueError: the test set (or the validation set) is empty; no ``val_data`` nor ``val_scores``.
    """
    _check_model(model)
    if budgets is not None:
        budgets = [_check_budget(b, f"budgets[{i}]") for i, b in enumerate(budgets)]
    test_loader = _loader(test_data, batch_size)
    if _length(test_loader.dataset) == 0:
        raise ValueError("the test set is empty: evaluate_budgets needs at least one (image, label)")
    if val_scores is None:
        if val_data is None:
            raise ValueError("evaluate_budgets needs val_data (a held-out split to choose thresholds on); choosing "
                             "them on the test set would overstate the accuracy")
        val_scores = exit_scores(model, val_data, batch_size)
    if budgets is None:
        calibrations = [_calibration(val_scores, q, float("nan")) for q in PROTOCOL_Q]
        for c in calibrations:
            c.budget = c.expected_macs
    else:
        calibrations = [calibrate(model, None, float(b), scores=val_scores) for b in budgets]
    results = []
    for cal in calibrations:
        right, count, spent = 0, 0, 0
        taken = torch.zeros(model.num_exits, dtype=torch.float64)
        meter = metric() if metric is not None else None
        seconds = 0.0
        for images, labels in test_loader:
            pred = model.predict(images, cal.thresholds)
            seconds += pred.seconds
            spent += pred.total_macs
            count += len(images)
            taken += torch.bincount(pred.exits - 1, minlength=model.num_exits).to(torch.float64)
            if meter is not None:
                meter.update(pred.logits, labels)
            elif pred.logits.dim() == 2:
                right += int((pred.labels.cpu() == labels.cpu()).sum())
        accuracy = 100.0 * right / count if meter is None and count else None
        results.append(BudgetResult(cal, accuracy, spent / max(1, count), [float(t) for t in taken / max(1, count)],
                                    seconds, meter.compute() if meter is not None else None))
    return results


def _check_budget(value: object, name: str) -> float:
    """A budget as a float: a finite number (MACs per sample), else a one-line error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite number of MACs per sample, got {value!r} ({type(value).__name__})")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number of MACs per sample, got {value!r}")
    return float(value)


def _length(dataset: Dataset) -> Optional[int]:
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError:
        return None


def _check_model(model: AnytimeModel) -> None:
    if not isinstance(model, AnytimeModel):
        raise TypeError(f"expected an anytimeify.AnytimeModel, got {type(model).__name__}")
    if model.training:
        raise RuntimeError("call model.eval() before calibrating or evaluating budgets")
