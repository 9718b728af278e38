"""Throughput of the compiled implicit GEMM against oneDNN's conv over every output position (prints JSON).

For HRNet-W48's and W18-Small-v2's 3x3 branch convs (shapes of a 1024x2048 input) and the 1x1
convs that are widest (``layer1``'s 64->256 and the W48 head's 720->720, at a 512x1024 input),
with 1 and 2 threads: GMAC/s of PyTorch's channels-last conv (oneDNN; the last outputs are kept alive, as in a
model, so new outputs are not simply the freed ones) and of the engine's implicit GEMMs
(channel-blocked, and row-vectorised where it can run) writing into one preallocated output; the
channel-blocked one in both of its kernels (``implicit``, the engine's choice for 3x3 convs, and
``implicit_l1``, which keeps partial sums between kernel rows in memory and shares weights in L1).
``ratio`` is the implicit GEMM's throughput over oneDNN's: how much of the dense kernel's speed
the masked kernel keeps before any position is skipped. Repetitions are interleaved; medians.
The JSON names the CPU, its vector flags and the ISA the kernels were built for; ``--march``
measures kernels built for another target (``x86-64-v3``: the AVX2 kernels on an AVX-512 CPU).

    python benchmarks/kernel_throughput.py
    python benchmarks/kernel_throughput.py --reps 5 --threads 2
    python benchmarks/kernel_throughput.py --march x86-64-v3
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

from anytimeify._machine import machine_info
from anytimeify.masking import _ext
from anytimeify.masking.conv import conv_geometry
from anytimeify.masking.engine import _pack_implicit, _pack_rows, kernel_isa, rows_layout

#: (in channels, out channels, kernel, height, width): the 3x3 branch convs at a 1024x2048 input,
#: then layer1's widest 1x1 conv and the W48 head's 720->720 1x1 conv at a 512x1024 input
LAYERS = [(48, 48, 3, 256, 512), (96, 96, 3, 128, 256), (192, 192, 3, 64, 128), (384, 384, 3, 32, 64),
          (18, 18, 3, 256, 512), (36, 36, 3, 128, 256), (72, 72, 3, 64, 128),
          (64, 256, 1, 128, 256), (720, 720, 1, 128, 256)]


def measure(ext, in_channels: int, channels: int, k: int, height: int, width: int, threads: int,
            reps: int) -> Dict[str, object]:
    torch.set_num_threads(threads)
    isa = kernel_isa(ext)
    generator = torch.Generator().manual_seed(channels)
    x = torch.randn(1, in_channels, height, width, generator=generator).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(channels, in_channels, k, k, generator=generator).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(channels, generator=generator)
    x_nhwc = x.permute(0, 2, 3, 1).contiguous()
    rows = torch.arange(height * width)
    out = torch.empty(height * width, channels)
    none_i32, none_f32 = torch.empty(0, dtype=torch.int32), torch.empty(0)
    packed, padded_bias = _pack_implicit(weight.contiguous(), bias, isa["blocks"])
    pad = k // 2
    alive: List[torch.Tensor] = []

    def onednn() -> None:
        alive.append(F.conv2d(x, weight, bias, 1, pad))
        if len(alive) > 2:
            alive.pop(0)

    kernels = {
        "onednn": onednn,
        # the kernel the engine runs (3x3: accumulators in registers over the kernel rows; 1x1:
        # weights shared in L1 by groups of positions)
        "implicit": lambda: ext.implicit_conv(x_nhwc, packed, padded_bias, rows, out, height, width, k, k, 1, 1, pad,
                                              pad, 1, 1, False, none_i32, none_f32, none_f32, 0),
    }
    if k > 1:  # the other kernel (partial sums between kernel rows in memory, weights shared in L1)
        kernels["implicit_l1"] = lambda: ext.implicit_conv(x_nhwc, packed, padded_bias, rows, out, height, width, k, k,
                                                           1, 1, pad, pad, 1, 1, False, none_i32, none_f32, none_f32, 1)
    layout = rows_layout(conv_geometry(torch.nn.Conv2d(in_channels, channels, k, padding=pad)),
                         max(isa["row_chunks"]))
    if layout is not None:
        rows_packed, rows_bias = _pack_rows(weight.contiguous(), bias, *layout)
        kernels["implicit_rows"] = lambda: ext.implicit_rows(x_nhwc, rows_packed, rows_bias, rows, out, height, width,
                                                             1, pad, pad, layout[0], False, none_i32, none_f32,
                                                             none_f32)
    times: Dict[str, List[float]] = {name: [] for name in kernels}
    with torch.inference_mode():
        for fn in kernels.values():
            fn()
        for _ in range(reps):
            for name, fn in kernels.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    macs = height * width * channels * in_channels * k * k
    gmacs = {name: macs / statistics.median(t) / 1e9 for name, t in times.items()}
    name = f"{k}x{k}_{channels}ch" if in_channels == channels else f"{k}x{k}_{in_channels}to{channels}ch"
    row: Dict[str, object] = {"layer": f"{name}_{height}x{width}", "threads": threads, "block": packed.shape[-1]}
    for name, value in gmacs.items():
        row[f"{name}_gmacs"] = round(value, 1)
        if name != "onednn":
            row[f"{name}_ratio"] = round(value / gmacs["onednn"], 3)
    return row


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--march", default=None, help="measure kernels built with -march=MARCH (default: native)")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps must be at least 1, got {args.reps}")
    ext = _ext.build_variant(args.march) if args.march else _ext.load()
    if ext is None:
        print("the compiled kernels are not available (no compiler?); nothing to measure", file=sys.stderr)
        return 1
    results = [measure(ext, *layer, t, args.reps) for t in args.threads for layer in LAYERS]
    machine = machine_info()
    machine.update(kernel_isa=kernel_isa(ext)["isa"], kernel_lanes=kernel_isa(ext)["lanes"], march=args.march or "native")
    json.dump({"machine": machine, "reps": args.reps, "results": results}, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
