"""HRNet's branch fusion (bilinear resize of every branch to the first's size + concatenation):
the compiled one-pass kernel behind ``anytimeify.exits.fuse_branches`` against PyTorch's
``interpolate`` + ``cat``, side by side (interleaved repetitions, medians). Prints JSON.

    python benchmarks/branch_fusion.py                       # HRNet-W48 branches of a 1024x2048 input
    python benchmarks/branch_fusion.py --width 18 --reps 9   # HRNet-W18 widths
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from anytimeify._machine import machine_info
from anytimeify.exits import fuse_branches
from anytimeify.masking import _ext


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=48, help="channels of the first branch (W48: 48)")
    parser.add_argument("--height", type=int, default=256, help="first branch's height (1/4 of the input)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    h, w, c = args.height, 2 * args.height, args.width
    features = [torch.randn(1, c * 2 ** i, h // 2 ** i, w // 2 ** i).contiguous(memory_format=torch.channels_last)
                for i in range(4)]

    def torch_ops():
        return torch.cat([features[0]] + [F.interpolate(f, size=(h, w), mode="bilinear", align_corners=True)
                                          for f in features[1:]], dim=1)

    def kernel():
        return fuse_branches(features, align_corners=True)

    times = {"kernel": [], "torch": []}
    with torch.no_grad():
        error = (kernel() - torch_ops()).abs().max().item()
        for _ in range(args.reps):
            for name, fn in (("kernel", kernel), ("torch", torch_ops)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    kernel_s, torch_s = (statistics.median(times[k]) for k in ("kernel", "torch"))
    print(json.dumps({
        "machine": machine_info(),
        "branches": [list(f.shape) for f in features], "threads": args.threads, "reps": args.reps,
        "extension": _ext.available(), "kernel_ms": round(kernel_s * 1e3, 2), "torch_ms": round(torch_s * 1e3, 2),
        "speedup": round(torch_s / kernel_s, 2), "max_abs_difference": error,
    }, indent=2))


if __name__ == "__main__":
    main()
