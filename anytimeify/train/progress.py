"""What a training run shows and records: a rich progress bar and a JSON-lines log.

The log (``<out>/log.jsonl``) has one JSON object per line: ``{"event": "train", "step": ...,
"epoch": ..., "lr": ..., "loss": ..., "loss_exits": [...], "images_per_s": ...}`` every
``log_every`` steps and ``{"event": "eval", "step": ..., "exits": [...]}`` after each evaluation,
so a run can be plotted or compared with ``jq`` or pandas. Only rank 0 writes. The library
configures no logging handlers; the progress bar is drawn only where asked (or on a terminal).
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any, Dict, Optional, Sequence

_logger = logging.getLogger(__name__)

__all__ = ["RunLog", "TrainProgress"]


def _finite(value: Any) -> Any:
    """NaN and infinities as null: strict JSON readers (jq, browsers) reject them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class RunLog:
    """Append-only JSON-lines log; every record gets ``time`` (seconds since the log opened)."""

    def __init__(self, path: Optional[str], enabled: bool = True):
        self.path = path
        self.enabled = enabled and path is not None
        self._start = time.perf_counter()
        self._file = None
        if self.enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._file = open(path, "a", encoding="utf-8", buffering=1)  # line-buffered: a crash loses no line

    def write(self, record: Dict[str, Any]) -> None:
        if not self.enabled or self._file is None:
            return
        record = {"time": round(time.perf_counter() - self._start, 3), **record}
        self._file.write(json.dumps(_finite(record), default=float) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TrainProgress:
    """A rich progress bar over optimiser steps: iterations/s, ETA and the per-exit losses.

    Args:
        total: optimiser steps of the run.
        done: steps already done (a resumed run).
        mode: ``auto`` (only on a terminal), ``on`` or ``off``.
        enabled: False on ranks other than 0.
    """

    def __init__(self, total: int, done: int = 0, mode: str = "auto", enabled: bool = True):
        self.active = enabled and (mode == "on" or (mode == "auto" and sys.stderr.isatty()))
        self._progress = None
        self._task = None
        if not self.active:
            return
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self._progress = Progress(
            TextColumn("[bold]train[/] ep {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[speed]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            TextColumn("{task.fields[losses]}"), console=Console(stderr=True), transient=False)
        self._progress.start()
        self._task = self._progress.add_task("train", total=total, completed=done, epoch=0, speed="",
                                             losses="")

    def update(self, step: int, epoch: int, steps_per_s: float, losses: Sequence[float]) -> None:
        if self._progress is None:
            return
        text = "loss " + " ".join(f"{v:.3f}" for v in losses)
        self._progress.update(self._task, completed=step, epoch=epoch, speed=f"{steps_per_s:.2f} it/s",
                              losses=text)

    def print(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
