"""Density sweep of the masked-conv engine on representative HRNet-W48 layers (prints JSON).

For each layer (shapes of a 1024x2048 input) and keep fraction, times the dense conv (BN-free,
channels-last, oneDNN) against ``MaskedConv2d(execution="sparse")`` with the mask's index plan
built beforehand (a plan is built once per image and mask and shared by every conv of a segment;
its build time is reported separately). Masks are spatially clustered: a Gaussian-smoothed random
field thresholded to the keep fraction. Repetitions are interleaved (every layer and density once
per round); figures are medians.

    python benchmarks/density_sweep.py            # full sweep, about 2-3 minutes on 2 cores
    python benchmarks/density_sweep.py --quick    # 4 densities, fewer rounds, smaller layers
    python benchmarks/density_sweep.py --model w18_small_v2   # HRNet-W18-Small-v2's layers
    python benchmarks/density_sweep.py --clock thread   # 1 thread, CPU time of that thread

OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE``, set here unless the environment sets
it): on a machine where another job holds a core, spinning threads wait out whole time slices at
every barrier, which made both the dense conv and the engine 1.5-5x slower and measured the
scheduler instead of the kernels. The value used is reported in the JSON.

``--clock thread`` measures the calling thread's CPU time (``time.thread_time``) with one torch
thread: on a machine shared with other jobs, wall-clock times with 2 threads mostly measure the
scheduler (every OpenMP barrier can wait a whole time slice), CPU time of a single thread does not.

Per (layer, density): ``dense_ms``, ``masked_ms``, ``speedup`` (dense / masked), ``flop_ratio``
(dense MACs / the paper's masked MACs, REFERENCE.md §4), ``realisation`` (speedup / flop_ratio),
the strategy the cost model chose and ``plan_ms`` (index-list build time for that mask). The
engine's own dense conv of the layer (``EngineConv2d``: oneDNN or the compiled implicit GEMM over
every position, whichever the cost model picks; ``engine_kernel``) is timed in the same rounds:
``engine_dense_ms`` and ``speedup_vs_engine`` (engine_dense_ms / masked_ms) compare the masked
layer with the fastest dense execution the engine has.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see the docstring

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from anytimeify._machine import machine_info
from anytimeify.masking import _ext  # noqa: E402
from anytimeify.masking.conv import EngineConv2d, MaskedConv2d, conv_output_size  # noqa: E402
from anytimeify.masking.engine import STRATEGIES, MaskPlan  # noqa: E402

_logger = logging.getLogger(__name__)

#: (name, in channels, out channels, kernel, height, width, bias) at a 1024x2048 input: the block
#: convs of every branch and the head's first 1x1 conv, per model
MODEL_LAYERS: Dict[str, List[Tuple[str, int, int, int, int, int, bool]]] = {
    "w48": [
        ("3x3_48ch_256x512", 48, 48, 3, 256, 512, False),
        ("3x3_96ch_128x256", 96, 96, 3, 128, 256, False),
        ("3x3_192ch_64x128", 192, 192, 3, 64, 128, False),
        ("3x3_384ch_32x64", 384, 384, 3, 32, 64, False),
        ("1x1_720ch_256x512", 720, 720, 1, 256, 512, True),
    ],
    "w18_small_v2": [
        ("3x3_18ch_256x512", 18, 18, 3, 256, 512, False),
        ("3x3_36ch_128x256", 36, 36, 3, 128, 256, False),
        ("3x3_72ch_64x128", 72, 72, 3, 64, 128, False),
        ("3x3_144ch_32x64", 144, 144, 3, 32, 64, False),
        ("1x1_270ch_256x512", 270, 270, 1, 256, 512, True),
    ],
}
LAYERS = MODEL_LAYERS["w48"]


def clustered_mask(height: int, width: int, keep: float, generator: torch.Generator) -> torch.Tensor:
    """A ``(1, 1, H, W)`` bool mask: smoothed noise (sigma 8 px at width 512) above its quantile."""
    if keep <= 0:
        return torch.zeros(1, 1, height, width, dtype=torch.bool)
    if keep >= 1:
        return torch.ones(1, 1, height, width, dtype=torch.bool)
    sigma = max(1.0, 8.0 * width / 512)
    radius = int(math.ceil(3 * sigma))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    taps = taps / taps.sum()
    field = torch.randn(1, 1, height, width, generator=generator)
    field = F.conv2d(F.pad(field, (radius, radius, 0, 0), mode="circular"), taps.view(1, 1, 1, -1))
    field = F.conv2d(F.pad(field, (0, 0, radius, radius), mode="circular"), taps.view(1, 1, -1, 1))
    count = int(round(keep * height * width))
    threshold = torch.topk(field.flatten(), count).values[-1]
    return field >= threshold


CLOCKS: Dict[str, Callable[[], float]] = {"wall": time.perf_counter, "thread": time.thread_time}


def run(quick: bool, rounds: int, strategies: List[str], threads: int, clock: str = "wall",
        model: str = "w48") -> Dict[str, object]:
    """Run the sweep and return the JSON-able result."""
    if clock == "thread":
        threads = 1  # thread_time sees only the calling thread
    torch.set_num_threads(threads)
    now = CLOCKS[clock]

    def _time(fn: Callable[[], object]) -> float:
        start = now()
        fn()
        return (now() - start) * 1e3

    generator = torch.Generator().manual_seed(0)
    densities = [0.0, 0.3, 0.6, 1.0] if quick else [round(0.1 * i, 1) for i in range(11)]
    scale = 2 if quick else 1
    extension = _ext.available()
    setups = []
    for name, cin, cout, k, height, width, bias in MODEL_LAYERS[model]:
        height, width = height // scale, width // scale
        conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias).to(memory_format=torch.channels_last)
        masked = MaskedConv2d.from_conv(conv, execution="sparse")
        masked.engine_dense = True  # as in a frozen model: keep 1.0 runs the engine's dense kernel
        engine = EngineConv2d.from_conv(conv).eval()
        x = torch.randn(1, cin, height, width).contiguous(memory_format=torch.channels_last)
        out_h, out_w = conv_output_size(conv, height, width)
        masks = {p: clustered_mask(out_h, out_w, p, generator) for p in densities}
        plans = {}
        plan_ms = {}
        for p, mask in masks.items():
            start = time.perf_counter()
            plan = MaskPlan(mask)
            plan.gather_index(masked.geometry, height, width)
            plan.halo_index(1)
            plan_ms[p] = (time.perf_counter() - start) * 1e3
            plans[p] = plan
        setups.append((name, conv, engine, masked, x, masks, plans, plan_ms))

    dense_times: Dict[str, List[float]] = {s[0]: [] for s in setups}
    engine_times: Dict[str, List[float]] = {s[0]: [] for s in setups}
    masked_times: Dict[Tuple[str, str, float], List[float]] = {}
    with torch.inference_mode():
        for setup in setups:  # warm-up: oneDNN primitive creation, extension load, first-touch pages
            _, conv, engine, masked, x, masks, plans, _ = setup
            conv(x)
            engine(x)
            for p in densities:
                for strategy in strategies:
                    masked.strategy = strategy
                    masked(x, masks[p], plan=plans[p])
        for _ in range(rounds):
            for name, conv, engine, masked, x, masks, plans, _ in setups:
                dense_times[name].append(_time(lambda: conv(x)))
                engine_times[name].append(_time(lambda: engine(x)))
                for p in densities:
                    for strategy in strategies:
                        masked.strategy = strategy
                        masked_times.setdefault((name, strategy, p), []).append(
                            _time(lambda: masked(x, masks[p], plan=plans[p])))

    results = []
    for name, conv, engine, masked, x, masks, plans, plan_ms in setups:
        dense_ms = statistics.median(dense_times[name])
        engine_ms = statistics.median(engine_times[name])
        dense_macs = masked.dense_macs(x.shape)
        for p in densities:
            paper = masked.paper_macs(x.shape, masks[p])
            flop_ratio = dense_macs / paper if paper > 0 else None
            masked.strategy = "auto"
            row = {
                "layer": name, "density": p, "dense_ms": round(dense_ms, 3), "engine_dense_ms": round(engine_ms, 3),
                "engine_kernel": engine.kernel(x.shape) if extension else "onednn",
                "flop_ratio": round(flop_ratio, 3) if flop_ratio else None,
                "strategy": masked.chosen_strategy(x.shape, masks[p], plans[p]),
                "plan_ms": round(plan_ms[p], 3),
            }
            for strategy in strategies:
                ms = statistics.median(masked_times[(name, strategy, p)])
                speedup = dense_ms / ms
                suffix = "" if strategy == "auto" else f"_{strategy}"
                row[f"masked_ms{suffix}"] = round(ms, 3)
                row[f"speedup{suffix}"] = round(speedup, 3)
                row[f"realisation{suffix}"] = round(speedup / flop_ratio, 3) if flop_ratio else None
                row[f"speedup_vs_engine{suffix}"] = round(engine_ms / ms, 3)
            results.append(row)
    return {
        "model": model, "machine": machine_info(), "input": [1, 3, 1024 // scale, 2048 // scale], "threads": threads, "clock": clock, "rounds": rounds,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch": torch.__version__, "extension": extension, "results": results,
    }


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 densities, half-resolution layers, 3 rounds")
    parser.add_argument("--model", choices=sorted(MODEL_LAYERS), default="w48",
                        help="whose layers: HRNet-W48 (default) or HRNet-W18-Small-v2")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved repetitions (default 5, quick 3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: perf_counter with --threads threads; thread: CPU time of one thread")
    parser.add_argument("--strategies", default="auto",
                        help="comma-separated engine strategies to time: " + ", ".join(STRATEGIES) + " (default auto)")
    args = parser.parse_args(argv)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    for strategy in strategies:
        if strategy not in STRATEGIES:
            parser.error(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    rounds = args.rounds or (3 if args.quick else 5)
    json.dump(run(args.quick, rounds, strategies, args.threads, args.clock, args.model), sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
