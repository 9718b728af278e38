"""Kernel choices measured on the machine that runs them: the tuner and its cache.

Which kernel computes a conv fastest depends on the CPU (vector width, caches, what oneDNN does
there), the thread count and the layer's shape; constants calibrated on one CPU were 10x off on
another. So the engine times the candidates of every layer shape where it runs:

* an unmasked conv (:class:`~anytimeify.masking.conv.EngineConv2d`, and a masked conv whose mask
  keeps everything): PyTorch's conv (``"onednn"``) and the compiled implicit GEMMs over every
  position (``"implicit"``, ``"implicit_rows"``); where its residual addition moved into it and
  nothing reads the residual after it, also with that residual: oneDNN's convolution adding it in
  place (``"onednn_into"``), the implicit GEMMs writing into it (``"implicit_into"``,
  ``"implicit_rows_into"``) or into a pooled output (``"implicit"``, ``"implicit_rows"``);
* a masked conv, at a few keep fractions (:data:`TUNE_KEEPS`, clustered masks): PyTorch's conv and
  blend (``"pytorch"``), the engine's fastest dense kernel plus the compiled blend (``"dense"``),
  the gathered conv (``"gather"``) and the implicit GEMMs over the kept positions.

A layer then runs the candidate with the smallest measured time (interpolated linearly in the keep
fraction), so it is never slower than PyTorch's own conv on that layer as measured here. Timings
are per output position, taken on a crop of the layer of at most :data:`CROP_MACS` multiply-adds
(the outputs of PyTorch's conv above glibc's 32 MB mmap threshold, which it allocates afresh on
every call, get the page-fault cost measured once on this machine added).

Measurements are cached in ``$ANYTIMEIFY_CACHE_DIR`` (default ``~/.cache/anytimeify``), under
``tuning/<key>.json``, the key hashing the CPU model, its vector flags, the thread count, the torch
version and the compiled kernels' build; a file whose key is not this machine's is ignored.

``ANYTIMEIFY_TUNE`` says when: ``auto`` (default: a layer shape met for the first time on this
machine is measured then, about 0.2-2 s each), ``cache`` (use what is cached, measure nothing),
``off`` (the analytical :class:`~anytimeify.masking.engine.CostModel` only). ``anytimeify tune
MODEL`` and :func:`tune` measure a whole model ahead, with a progress bar. Measuring at first use
happens inside a model's call; :func:`measuring_seconds` counts it, so that the library's timings
(evaluation, the demo, the benchmarks) leave it out.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._env import getenv
from .compiled import _extension

_logger = logging.getLogger(__name__)

__all__ = ["TUNE_KEEPS", "MASKED_CANDIDATES", "DENSE_CANDIDATES", "RESIDUAL_CANDIDATES", "LayerTiming", "TuningTable", "tune_mode",
           "active_table", "shape_key", "measure_layer", "tune", "TuneReport", "cache_dir", "measuring_seconds"]

#: keep fractions at which masked convs are timed
TUNE_KEEPS = (0.2, 0.45, 0.7, 0.9)
#: candidates of a masked conv with some positions skipped
MASKED_CANDIDATES = ("pytorch", "dense", "gather", "implicit", "implicit_rows")
#: candidates of an unmasked conv
DENSE_CANDIDATES = ("onednn", "implicit", "implicit_rows")
#: candidates of an unmasked conv whose residual nothing reads after it (timed with the residual)
RESIDUAL_CANDIDATES = ("onednn_into", "implicit_into", "implicit_rows_into", "implicit", "implicit_rows")
#: most multiply-adds of one timed call (a crop of the layer's rows)
CROP_MACS = 2.5e8
#: outputs at least this large are fresh mmaps in glibc (its largest dynamic mmap threshold)
FRESH_BYTES = 32 << 20
#: timed rounds per candidate (the minimum counts: noise only ever adds time)
REPS = 3
#: version of the cache file's format
FORMAT = 3
TUNE_MODES = ("auto", "cache", "off")

ShapeKey = Tuple[int, ...]


def tune_mode() -> str:
    """``ANYTIMEIFY_TUNE``: ``"auto"`` (default), ``"cache"`` or ``"off"``."""
    mode = getenv("ANYTIMEIFY_TUNE", "auto").strip().lower() or "auto"
    if mode in ("0", "false", "no"):
        return "off"
    if mode not in TUNE_MODES:
        raise ValueError(f"ANYTIMEIFY_TUNE must be one of {TUNE_MODES}, got {mode!r}")
    return mode


def cache_dir() -> Path:
    """Where tuning results live: ``$ANYTIMEIFY_CACHE_DIR``, else ``$XDG_CACHE_HOME/anytimeify``,
    else ``~/.cache/anytimeify``."""
    root = os.environ.get("ANYTIMEIFY_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "anytimeify"


def shape_key(geometry, in_height: int, in_width: int) -> ShapeKey:
    """The key of a conv call: its geometry and input size (timings are per output position, so
    the batch does not enter)."""
    g = geometry
    return (g.in_channels, g.out_channels, *g.kernel_size, *g.stride, *g.padding, *g.dilation, g.groups,
            int(in_height), int(in_width))


def _key_text(key: ShapeKey) -> str:
    return ",".join(map(str, key))


def _interpolate(keeps: Sequence[float], values: Sequence[float], keep: float) -> float:
    """Piecewise-linear in the keep fraction; beyond the ends, the nearest segment's line (not
    below 0)."""
    if len(keeps) == 1:
        return values[0]
    i = 0
    while i < len(keeps) - 2 and keep > keeps[i + 1]:
        i += 1
    k0, k1, v0, v1 = keeps[i], keeps[i + 1], values[i], values[i + 1]
    return max(0.0, v0 + (v1 - v0) * (keep - k0) / (k1 - k0))


@dataclass
class LayerTiming:
    """Measured ns per output position of one layer shape.

    Attributes:
        dense: per unmasked candidate (:data:`DENSE_CANDIDATES` that can run it).
        masked: per masked candidate (:data:`MASKED_CANDIDATES` that can run it), one value per keep.
        keeps: the keep fractions of ``masked``.
        implicit_variant: the faster of the implicit GEMM's two kernels over every position (1:
            weights shared in L1 by groups of positions; 2: accumulators in registers over every
            kernel row; 0: not measured), which ``"implicit"`` then runs.
        residual: per candidate of :data:`RESIDUAL_CANDIDATES` that can run it, timed with a
            residual addition and a ReLU (empty: not measured).
    """

    dense: Dict[str, float] = field(default_factory=dict)
    masked: Dict[str, List[float]] = field(default_factory=dict)
    keeps: List[float] = field(default_factory=lambda: list(TUNE_KEEPS))
    implicit_variant: int = 0
    residual: Dict[str, float] = field(default_factory=dict)

    def best_residual(self, allowed: Iterable[str] = RESIDUAL_CANDIDATES) -> Optional[str]:
        """The fastest candidate with a dead residual among ``allowed`` (None: none measured)."""
        options = {k: v for k, v in self.residual.items() if k in allowed}
        return min(options, key=options.__getitem__) if options else None

    def best_dense(self, allowed: Iterable[str] = DENSE_CANDIDATES) -> Optional[str]:
        """The fastest unmasked candidate among ``allowed`` (None: none measured)."""
        options = {k: v for k, v in self.dense.items() if k in allowed}
        return min(options, key=options.__getitem__) if options else None

    def masked_at(self, keep: float) -> Dict[str, float]:
        """Estimated ns per output position of every masked candidate at ``keep``."""
        return {name: _interpolate(self.keeps, values, keep) for name, values in self.masked.items()}

    def best_masked(self, keep: float, allowed: Iterable[str] = MASKED_CANDIDATES) -> Optional[str]:
        """The fastest masked candidate among ``allowed`` at ``keep`` (None: none measured)."""
        allowed = set(allowed)
        options = {k: v for k, v in self.masked_at(keep).items() if k in allowed}
        return min(options, key=options.__getitem__) if options else None

    def to_json(self) -> dict:
        return {"dense": self.dense, "masked": self.masked, "keeps": self.keeps,
                "implicit_variant": self.implicit_variant, "residual": self.residual}

    @classmethod
    def from_json(cls, data: dict) -> "LayerTiming":
        return cls(dense={str(k): float(v) for k, v in data["dense"].items()},
                   masked={str(k): [float(x) for x in v] for k, v in data["masked"].items()},
                   keeps=[float(k) for k in data["keeps"]], implicit_variant=int(data.get("implicit_variant", 0)),
                   residual={str(k): float(v) for k, v in data.get("residual", {}).items()})


class TuningTable:
    """Measured layer timings of one machine key (see :func:`~anytimeify._machine.machine_key`)."""

    def __init__(self, key: str, machine: Optional[dict] = None, path: Optional[Path] = None) -> None:
        self.key = key
        self.machine = machine or {}
        self.path = path
        self.layers: Dict[ShapeKey, LayerTiming] = {}
        self.fresh_ns: Optional[float] = None
        #: bumped by every :meth:`put`, so choices cached from an older state are made again
        self.generation = 0
        self._lock = threading.Lock()

    def get(self, key: ShapeKey) -> Optional[LayerTiming]:
        return self.layers.get(key)

    def put(self, key: ShapeKey, timing: LayerTiming) -> None:
        with self._lock:
            self.layers[key] = timing
            self.generation += 1

    def to_json(self) -> dict:
        return {"format": FORMAT, "key": self.key, "machine": self.machine, "fresh_ns": self.fresh_ns,
                "layers": {_key_text(k): t.to_json() for k, t in sorted(self.layers.items())}}

    @classmethod
    def read(cls, path: Path, key: str) -> Optional["TuningTable"]:
        """The table in ``path`` if it was measured for ``key`` (another CPU, thread count, torch
        version or kernel build: None, and the file is left alone)."""
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("key") != key:
            _logger.info("ignoring tuning cache %s: measured for another machine, torch or kernel build", path)
            return None
        table = cls(key, data.get("machine"), path)
        table.fresh_ns = data.get("fresh_ns")
        try:
            for text, timing in data.get("layers", {}).items():
                table.layers[tuple(int(v) for v in text.split(","))] = LayerTiming.from_json(timing)
        except (KeyError, TypeError, ValueError):
            _logger.warning("ignoring tuning cache %s: it is damaged", path)
            return None
        return table

    def save(self) -> None:
        """Write the table (merged with what another process saved meanwhile) atomically."""
        if self.path is None:
            return
        with self._lock:
            other = TuningTable.read(self.path, self.key) if self.path.is_file() else None
            if other is not None:
                for k, t in other.layers.items():
                    self.layers.setdefault(k, t)
                if self.fresh_ns is None:
                    self.fresh_ns = other.fresh_ns
            text = json.dumps(self.to_json(), indent=1)
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-", suffix=".json")
                try:
                    with os.fdopen(fd, "w") as f:
                        f.write(text)
                    os.replace(tmp, self.path)
                except BaseException:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
                    raise
            except OSError as error:  # a read-only home still runs, it just re-measures next time
                _logger.warning("could not write the tuning cache %s: %s", self.path, error)


_tables: Dict[Tuple[str, str], TuningTable] = {}
_tables_lock = threading.Lock()
_warned = {"slower": False, "tuning": False}


_keys: Dict[Tuple[int, int], Tuple[str, dict]] = {}


def _current_key(ext) -> Tuple[str, dict]:
    """The machine key of this thread count and kernel build, and the machine's description
    (memoised: the engine asks on every masked conv)."""
    threads = torch.get_num_threads()
    memo = _keys.get((threads, id(ext)))
    if memo is None:
        from .. import _machine
        from . import _ext

        build = getattr(ext, "__name__", "none")
        key = f"{_machine.machine_key(threads)}-{build.rsplit('_', 1)[-1]}"
        memo = _keys[(threads, id(ext))] = (key, {**_machine.machine_info(), "kernels": build,
                                                  "flags": _ext.build_flags()[2:]})
    return memo


_dirs: Dict[Tuple[Optional[str], ...], str] = {}


def _cache_dir_text() -> str:
    """:func:`cache_dir` as text, memoised on the variables it reads (the engine asks on every
    masked conv; resolving a path each time costs more than a small conv)."""
    memo = (getenv("ANYTIMEIFY_CACHE_DIR"), getenv("XDG_CACHE_HOME"), getenv("HOME"))
    text = _dirs.get(memo)
    if text is None:
        text = _dirs[memo] = str(cache_dir())
    return text


def active_table() -> Optional[TuningTable]:
    """The tuning table of this machine and thread count (loaded from the cache, or empty), or
    None when tuning is off or the compiled kernels are not loaded."""
    if tune_mode() == "off":
        return None
    ext = _extension()
    if ext is None:
        return None
    key, machine = _current_key(ext)
    folder = _cache_dir_text()
    table = _tables.get((key, folder))
    if table is None:
        with _tables_lock:
            table = _tables.get((key, folder))
            if table is None:
                path = Path(folder) / "tuning" / f"{key}.json"
                table = TuningTable.read(path, key) if path.is_file() else None
                if table is None:
                    table = TuningTable(key, machine, path)
                _tables[(key, folder)] = table
    return table


# --------------------------------------------------------------------------------- measuring
def _timed(fn: Callable[[], object], reps: int = REPS) -> float:
    """Least wall-clock seconds of ``reps`` calls (after one untimed call)."""
    return _timed_rounds({"": fn}, reps)[""]


def _timed_rounds(calls: Dict[str, Callable[[], object]], reps: int = REPS) -> Dict[str, float]:
    """Least wall-clock seconds of each of ``calls`` over ``reps`` rounds that call each once in
    turn (after one untimed call each): a burst of load from elsewhere on the machine then falls on
    every candidate of a round, instead of on whichever one was being timed."""
    for fn in calls.values():
        fn()
    best = {name: math.inf for name in calls}
    for _ in range(reps):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _fresh_ns() -> float:
    """ns per float of writing a fresh 64 MiB allocation, beyond writing reused memory (page faults
    and zeroing by the kernel)."""
    count = 16 << 20
    reused = torch.empty(count)
    reused.fill_(1.0)
    warm = _timed(lambda: reused.fill_(2.0), 3)
    fresh = math.inf
    for _ in range(3):
        start = time.perf_counter()
        torch.empty(count).fill_(2.0)
        fresh = min(fresh, time.perf_counter() - start)
    return max(0.0, (fresh - warm) / count * 1e9)


def clustered_mask(height: int, width: int, keep: float, seed: int = 0) -> Tensor:
    """A ``(1, 1, h, w)`` bool mask keeping the ``keep`` fraction of positions where a smooth random
    field is lowest (confidence masks are clustered, not salt and pepper)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 1, height // 8 + 2, width // 8 + 2, generator=generator)
    field = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False).flatten()
    kept = int(round(keep * field.numel()))
    mask = torch.zeros(field.numel(), dtype=torch.bool)
    if kept:
        mask[torch.topk(-field, kept).indices] = True
    return mask.view(1, 1, height, width)


def _crop_rows(geometry, in_height: int, in_width: int) -> int:
    """Input rows of the crop a timed call runs on: all of them, or enough for :data:`CROP_MACS`."""
    out_height, out_width = geometry.output_size(in_height, in_width)
    per_row = max(1, out_width * geometry.macs_per_output())
    rows = max(8, int(CROP_MACS // per_row))
    if rows >= out_height:
        return in_height
    return min(in_height, rows * geometry.stride[0])


def measure_layer(geometry, weight: Tensor, bias: Optional[Tensor], in_height: int, in_width: int, *,
                  masked: bool, lam: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                  activation: Optional[str] = None, fresh_ns: float = 0.0,
                  keeps: Sequence[float] = TUNE_KEEPS, residual: bool = False) -> LayerTiming:
    """Time every candidate of one conv shape (see the module docstring) on a crop of its rows.

    Args:
        geometry: the conv (:class:`~anytimeify.masking.engine.ConvGeometry`).
        weight, bias: its parameters (float32 CPU); shift and activation: a masked conv's epilogue.
        in_height, in_width: the input size the layer runs at.
        masked: also time the masked candidates (a masked conv); lam: its interpolation lambda.
        residual: also time the candidates with a residual nothing reads afterwards
            (:data:`RESIDUAL_CANDIDATES`, with a ReLU).
        fresh_ns: page-fault cost per float of a fresh output (:func:`_fresh_ns`).

    Returns:
        The timings in ns per output position.
    """
    from .compiled import _extension
    from .kernels import dense_conv2d, sparse_masked_conv2d
    from .layout import rows_layout
    from .packing import LayerWeights
    from .plans import MaskPlan

    ext = _extension()
    crop = _crop_rows(geometry, in_height, in_width)
    out_height, out_width = geometry.output_size(in_height, in_width)
    crop_out_height, crop_out_width = geometry.output_size(crop, in_width)
    positions = crop_out_height * crop_out_width
    generator = torch.Generator().manual_seed(sum(shape_key(geometry, in_height, in_width)))
    x = torch.randn(1, geometry.in_channels, crop, in_width, generator=generator)
    x = x.contiguous(memory_format=torch.channels_last)
    weight = weight.detach().float().contiguous(memory_format=torch.channels_last)
    bias = None if bias is None else bias.detach().float()
    weights = LayerWeights(weight, bias, shift, geometry.groups)
    # PyTorch's outputs are fresh allocations; above the mmap threshold each costs its page faults
    fresh = fresh_ns * geometry.out_channels if out_height * out_width * geometry.out_channels * 4 >= FRESH_BYTES else 0.0
    timing = LayerTiming(keeps=list(keeps))
    candidates = ["onednn"]
    if ext is not None and geometry.groups == 1:
        candidates.append("implicit")
        if rows_layout(geometry) is not None:
            candidates.append("implicit_rows")
    def with_variant(fn: Callable[[], object], variant: int) -> Callable[[], object]:
        def call():
            with _forced_variant(variant):
                return fn()
        return call

    with torch.inference_mode():
        calls: Dict[str, Callable[[], object]] = {}
        for name in candidates:
            def dense(name=name):
                return dense_conv2d(x, weight, weights.full_bias, geometry, weights, kernel=name)
            if name == "implicit":  # both of its kernels; the faster one serves the masked calls too
                for variant in (1, 2):
                    calls[f"implicit{variant}"] = with_variant(dense, variant)
            else:
                calls[name] = dense
        seconds = _timed_rounds(calls)
        for name in candidates:
            if name == "implicit":
                timing.implicit_variant = 1 if seconds["implicit1"] <= seconds["implicit2"] else 2
                spent = seconds[f"implicit{timing.implicit_variant}"]
            else:
                spent = seconds[name]
            timing.dense[name] = spent / positions * 1e9 + (fresh if name == "onednn" else 0.0)
        if residual:
            timing.residual = _time_residual(x, weight, weights, geometry, timing.implicit_variant, with_variant,
                                             positions)
        if masked:
            lam = torch.tensor(3.0) if lam is None else lam.detach().float()
            strategies = ["pytorch", "dense", "gather"] + [c for c in candidates if c != "onednn"]
            for keep in keeps:
                mask = clustered_mask(crop_out_height, crop_out_width, keep)
                plan = MaskPlan(mask)
                masked_calls = {}
                for name in strategies:
                    def call(name=name):
                        return sparse_masked_conv2d(x, weight, bias, geometry, lam, plan, strategy=name,
                                                    use_extension=name != "pytorch", shift=shift,
                                                    activation=activation, weights=weights)
                    masked_calls[name] = with_variant(call, timing.implicit_variant)
                seconds = _timed_rounds(masked_calls)
                for name in strategies:
                    extra = fresh if name == "pytorch" else 0.0
                    timing.masked.setdefault(name, []).append(seconds[name] / positions * 1e9 + extra)
    return timing


def _time_residual(x: Tensor, weight: Tensor, weights, geometry, variant: int, with_variant, positions: int) -> Dict[str, float]:
    """ns per output position of each candidate of :data:`RESIDUAL_CANDIDATES` that can run
    ``act(conv(x) + residual)`` with a dead residual (each call adds into its own buffer, which is
    only ever timed, never read)."""
    from .dispatch import INTO_KERNELS, residual_candidates
    from .kernels import dense_conv2d

    out_height, out_width = geometry.output_size(x.shape[2], x.shape[3])
    names = residual_candidates(geometry)
    buffers = {n: torch.zeros(1, geometry.out_channels, out_height, out_width).contiguous(memory_format=torch.channels_last)
               for n in names}
    calls = {}
    for name in names:
        def call(name=name):
            return dense_conv2d(x, weight, weights.full_bias, geometry, weights, kernel=name, activation="relu",
                                residual=buffers[name], into_residual=name in INTO_KERNELS)
        calls[name] = with_variant(call, variant) if variant else call
    seconds = _timed_rounds(calls)
    return {name: seconds[name] / positions * 1e9 for name in names}


_forced = threading.local()


class _forced_variant:
    """Within the block, the implicit GEMM runs ``variant`` (measurements)."""

    def __init__(self, variant: int) -> None:
        self.variant = variant

    def __enter__(self) -> None:
        self.previous = getattr(_forced, "variant", None)
        _forced.variant = self.variant

    def __exit__(self, *exc) -> None:
        _forced.variant = self.previous


def implicit_variant(geometry, in_height: int, in_width: int) -> int:
    """The implicit GEMM kernel measured faster for a conv shape (0 where not measured: the
    kernel's own choice by shape)."""
    forced = getattr(_forced, "variant", None)
    if forced is not None:
        return forced
    table = active_table()
    if table is None:
        return 0
    timing = table.get(shape_key(geometry, in_height, in_width))
    return timing.implicit_variant if timing is not None else 0


def lookup(geometry, in_height: int, in_width: int, masked: bool, residual: bool = False) -> Optional[LayerTiming]:
    """The measured timing of a conv shape (with its masked candidates if ``masked``, its
    candidates with a dead residual if ``residual``), measuring it now where
    ``ANYTIMEIFY_TUNE=auto`` and it is new on this machine; None where tuning is off or impossible,
    or the shape is not cached in ``cache`` mode."""
    table = active_table()
    if table is None:
        return None
    key = shape_key(geometry, in_height, in_width)
    timing = table.get(key)
    if timing is not None and (timing.masked or not masked) and (not residual or _has_residual(timing, geometry)):
        return timing
    if tune_mode() != "auto":
        return timing if timing is not None and not masked else None
    return _measure_into(table, key, geometry, in_height, in_width, masked=masked or bool(timing and timing.masked),
                         residual=residual or bool(timing and timing.residual))


def _has_residual(timing: LayerTiming, geometry) -> bool:
    """Whether ``timing`` holds every candidate with a dead residual that can run ``geometry``."""
    from .dispatch import residual_candidates

    return bool(timing.residual) and set(residual_candidates(geometry)) <= set(timing.residual)


_measuring = threading.local()


def measuring_seconds() -> float:
    """Seconds this thread has spent measuring layer shapes so far (the first-use measuring of
    :func:`lookup` and the measuring of :func:`tune`).

    A timer that must not include first-use measuring reads this before and after its timed region
    and subtracts the difference: :func:`anytimeify.train.evaluate`, the demo and the benchmarks do.
    Per thread, so that measuring in one thread is never taken out of a timer in another.
    """
    return getattr(_measuring, "seconds", 0.0)


def _measure_into(table: TuningTable, key: ShapeKey, geometry, in_height: int, in_width: int,
                  module: Optional[torch.nn.Module] = None, masked: Optional[bool] = None,
                  residual: Optional[bool] = None) -> LayerTiming:
    """Measure one shape (with ``module``'s epilogue and lambda, where given) into ``table``; the
    time it takes is added to :func:`measuring_seconds`."""
    start = time.perf_counter()
    try:
        return _measure_shape(table, key, geometry, in_height, in_width, module, masked, residual)
    finally:
        _measuring.seconds = measuring_seconds() + (time.perf_counter() - start)


def _measure_shape(table: TuningTable, key: ShapeKey, geometry, in_height: int, in_width: int,
                   module: Optional[torch.nn.Module], masked: Optional[bool],
                   residual: Optional[bool] = None) -> LayerTiming:
    from .conv import MaskedConv2d

    if table.fresh_ns is None:
        table.fresh_ns = _fresh_ns()
    if not _warned["tuning"]:
        _warned["tuning"] = True
        _logger.warning("measuring the engine's kernels for each new layer shape on this CPU (%s, %d threads; "
                        "once, cached in %s; `anytimeify tune MODEL` does it ahead)",
                        table.machine.get("cpu", "?"), torch.get_num_threads(), table.path)
    # timings do not depend on the weights' values: random ones of the layer's shape serve
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(geometry.out_channels, geometry.in_channels // geometry.groups, *geometry.kernel_size,
                         generator=generator) / math.sqrt(geometry.in_channels * geometry.kernel_size[0])
    bias = 0.1 * torch.randn(geometry.out_channels, generator=generator)
    if masked is None:
        masked = isinstance(module, MaskedConv2d)
    if residual is None:
        residual = bool(getattr(module, "residual_dead", False))
    masked_module = module if isinstance(module, MaskedConv2d) else None
    timing = measure_layer(geometry, weight, bias, in_height, in_width, masked=masked, residual=residual,
                           lam=getattr(masked_module, "interp_lambda", None), shift=getattr(masked_module, "shift", None),
                           activation=getattr(masked_module, "activation", None), fresh_ns=table.fresh_ns or 0.0)
    table.put(key, timing)
    table.save()
    _check_compiled_pays(table)
    return timing


#: masked layer shapes measured before :func:`_check_compiled_pays` judges
CHECK_AFTER = 8


def _check_compiled_pays(table: TuningTable) -> None:
    """Tell the user once when PyTorch's ops beat the compiled kernels on most masked layers here.

    Only masked layer shapes count: an unmasked conv for which oneDNN is the fastest dense kernel
    simply runs oneDNN, which is what the engine expects of many shapes; it is the masked layers,
    where skipping needs the compiled kernels, that tell whether they pay on this CPU.
    """
    masked = [timing for timing in table.layers.values() if timing.masked]
    if _warned["slower"] or len(masked) < CHECK_AFTER:
        return
    losing = sum(all(timing.best_masked(keep) == "pytorch" for keep in timing.keeps) for timing in masked)
    if losing * 2 > len(masked):
        _warned["slower"] = True
        _logger.warning("on this CPU (%s) the compiled kernels were slower than PyTorch's on %d of %d masked layer "
                        "shapes; those layers run PyTorch's ops", table.machine.get("cpu", "?"), losing, len(masked))


# --------------------------------------------------------------------------------- a model
@dataclass
class TuneReport:
    """What :func:`tune` measured: per layer shape, the candidates' ns per output position and the
    choices (dense, and masked at each of :data:`TUNE_KEEPS`)."""

    machine: dict
    cache: Optional[str]
    seconds: float
    measured: int
    layers: List[dict]

    def to_json(self) -> dict:
        return {"machine": self.machine, "cache": self.cache, "seconds": round(self.seconds, 2),
                "measured": self.measured, "layers": self.layers}


def _engine_layers(model: torch.nn.Module, x: Tensor) -> Tuple[Dict[ShapeKey, Tuple[object, torch.nn.Module]], set]:
    """Every conv shape of ``model`` on ``x`` that the engine decides for (masked convs, engine
    convs), with one module of that shape, and the shapes some engine conv of which has a dead
    residual."""
    from .conv import EngineConv2d, MaskedConv2d

    found: Dict[ShapeKey, Tuple[object, torch.nn.Module]] = {}
    with_residual = set()
    hooks = []

    def record(module, args):
        inp = args[0]
        key = shape_key(module.geometry, inp.shape[2], inp.shape[3])
        found.setdefault(key, (module.geometry, module))
        if getattr(module, "residual_dead", False):
            with_residual.add(key)

    for module in model.modules():
        if isinstance(module, (MaskedConv2d, EngineConv2d)):
            hooks.append(module.register_forward_pre_hook(record))
    previous = os.environ.get("ANYTIMEIFY_TUNE")
    os.environ["ANYTIMEIFY_TUNE"] = "cache"  # collect shapes without measuring them one by one
    try:
        with torch.no_grad():
            out = model.anytime(x) if hasattr(model, "anytime") else None
            if out is not None:
                for _ in out:
                    pass
            else:
                model(x)
    finally:
        for hook in hooks:
            hook.remove()
        if previous is None:
            del os.environ["ANYTIMEIFY_TUNE"]
        else:
            os.environ["ANYTIMEIFY_TUNE"] = previous
    return found, with_residual


def tune(model, input_size: Sequence[int], *, force: bool = False,
         progress: bool = True) -> TuneReport:
    """Measure the engine's candidates for every conv shape of ``model`` at ``input_size`` on this
    machine (cached; shapes already measured are skipped unless ``force``).

    Args:
        model: a frozen or sparse anytime model, or a module with engine convs
            (:func:`anytimeify.bench.fold_for_inference`), or a sequence of them (their shapes
            are collected first, so a shape two models share is measured once, with every
            candidate either needs).
        input_size: ``(H, W)`` or ``(B, C, H, W)`` of the inputs it will run on.
        force: measure again what the cache holds.
        progress: show a progress bar on stderr.

    Returns:
        A :class:`TuneReport`.
    """
    from .compiled import _extension

    if _extension() is None:
        raise RuntimeError("the compiled kernels are not available (no compiler, or ANYTIMEIFY_NO_EXT=1): "
                           "there is nothing to tune; PyTorch's ops run every layer")
    size = tuple(int(s) for s in input_size)
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    previous = os.environ.get("ANYTIMEIFY_TUNE")
    if previous is not None and tune_mode() == "off":
        raise RuntimeError("ANYTIMEIFY_TUNE=off: unset it (or set it to auto) to tune")
    table = active_table()
    assert table is not None
    start = time.perf_counter()
    layers: Dict[ShapeKey, Tuple[object, torch.nn.Module]] = {}
    with_residual: set = set()
    for one in models:
        x = torch.randn((1, getattr(one, "in_channels", 3)) + size[-2:]).contiguous(memory_format=torch.channels_last)
        found, dead = _engine_layers(one, x)
        for key, entry in found.items():  # a masked conv of a shape is the one measured (more candidates)
            if key not in layers or (_is_masked(entry[1]) and not _is_masked(layers[key][1])):
                layers[key] = entry
        with_residual |= dead
    todo = [(k, g, m) for k, (g, m) in layers.items()
            if force or table.get(k) is None or (_is_masked(m) and not table.get(k).masked)
            or (k in with_residual and not _has_residual(table.get(k), g))]
    _warned["tuning"] = True  # the progress bar says it
    if progress and todo:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("tuning kernels"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("{task.description}"), console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("", total=len(todo))
            for key, geometry, module in todo:
                bar.update(task, description=_describe(key))
                _measure_into(table, key, geometry, key[-2], key[-1], module, residual=key in with_residual)
                bar.advance(task)
    else:
        for key, geometry, module in todo:
            _measure_into(table, key, geometry, key[-2], key[-1], module, residual=key in with_residual)
    rows = []
    for key in layers:
        timing = table.get(key)
        rows.append({"shape": _describe(key), "dense": timing.best_dense(),
                     "masked": {str(k): timing.best_masked(k) for k in timing.keeps} if timing.masked else None,
                     "dense_ns": {k: round(v, 3) for k, v in timing.dense.items()},
                     "masked_ns": {k: [round(x, 3) for x in v] for k, v in timing.masked.items()},
                     **({"residual": timing.best_residual(),
                         "residual_ns": {k: round(v, 3) for k, v in timing.residual.items()}} if timing.residual else {})})
    return TuneReport(machine=table.machine, cache=str(table.path) if table.path else None,
                      seconds=time.perf_counter() - start, measured=len(todo), layers=rows)


def _is_masked(module: torch.nn.Module) -> bool:
    from .conv import MaskedConv2d

    return isinstance(module, MaskedConv2d)


def _describe(key: ShapeKey) -> str:
    cin, cout, kh, kw, sh, sw, ph, pw, dh, dw, groups, h, w = key
    text = f"{kh}x{kw} {cin}->{cout} at {h}x{w}"
    if (sh, sw) != (1, 1):
        text += f" stride {sh}"
    if groups != 1:
        text += f" groups {groups}"
    return text
