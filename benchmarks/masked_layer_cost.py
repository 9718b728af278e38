"""What one masked conv costs against the plain dense conv of the same shape (prints JSON).

HRNet-W18-Small-v2's branch convs (3x3, 18/36/72 channels at the 128x256 / 64x128 / 32x64 maps of a
512x1024 input) under a clustered mask (the benchmarks' ``clustered_field``) at several kept
fractions: the engine's masked conv in each strategy (``implicit``, ``implicit_rows``, ``dense``:
the full conv then the blend), the time of PyTorch's plain conv of every position
(``F.conv2d`` + ReLU, channels-last), and where a masked conv's time goes (the compiled kernels'
share from torch.profiler: the GEMM, the output fill, the halo interpolation). A masked conv
only pays where its time is below the plain conv's; ``ratio`` is the best masked time over it.

    python benchmarks/masked_layer_cost.py
    python benchmarks/masked_layer_cost.py --reps 50 --lam 2.0
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from anytimeify._machine import machine_info
from anytimeify.bench import clustered_field
from anytimeify.masking.conv import MaskedConv2d
from anytimeify.masking.kernels import sparse_masked_conv2d
from anytimeify.masking.plans import MaskPlan

#: (channels, height, width): W18-Small-v2's branch convs at a 512x1024 input
LAYERS = [(18, 128, 256), (36, 64, 128), (72, 32, 64)]
KEEPS = (1.0, 0.81, 0.62, 0.37)
STRATEGIES = ("implicit", "implicit_rows", "dense")


def _median_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(channels: int, height: int, width: int, keep: float, lam: float, reps: int) -> Dict[str, object]:
    torch.manual_seed(channels)
    conv = MaskedConv2d(channels, channels, 3, padding=1, execution="sparse").eval()
    x = torch.randn(1, channels, height, width).contiguous(memory_format=torch.channels_last)
    field = clustered_field((height, width))
    if keep < 1.0:
        mask = field >= torch.quantile(field.flatten(), 1.0 - keep)
    else:
        mask = torch.ones_like(field, dtype=torch.bool)
    plan = MaskPlan(mask)
    weights = conv._layer_weights()
    lam_t = torch.tensor(lam)
    row: Dict[str, object] = {"layer": f"3x3_{channels}ch_{height}x{width}", "keep": round(plan.density, 3)}
    with torch.no_grad():
        def masked(strategy: str):
            return lambda: sparse_masked_conv2d(x, conv.weight, conv.bias, conv.geometry, lam_t, plan,
                                                strategy=strategy, weights=weights, activation="relu")

        for strategy in STRATEGIES:
            row[f"{strategy}_ms"] = round(_median_ms(masked(strategy), reps), 3)
        row["plain_conv_ms"] = round(_median_ms(lambda: F.conv2d(x, conv.weight, conv.bias, 1, 1).relu_(), reps), 3)
        best = min(STRATEGIES, key=lambda s: row[f"{s}_ms"])
        row["best"] = best
        row["ratio"] = round(row[f"{best}_ms"] / row["plain_conv_ms"], 3)
        if 0.0 < keep < 1.0:  # where the best masked conv's time goes
            run = masked(best)
            run()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(10):
                    run()
            events = [e for e in prof.key_averages() if e.key.startswith("anytimeify::")]
            total = sum(e.self_cpu_time_total for e in prof.key_averages()) or 1.0
            row["kernels_share"] = {e.key.split("::")[1]: round(e.self_cpu_time_total / total, 3) for e in events}
    return row


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lam", type=float, default=1.0, help="the interpolation's lambda (its support radius)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(c, h, w, keep, args.lam, args.reps) for c, h, w in LAYERS for keep in KEEPS]
    print(json.dumps({"machine": machine_info(), "threads": args.threads, "lam": args.lam, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
