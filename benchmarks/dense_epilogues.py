"""What two output-pass choices of the engine's unmasked convs save on a whole model (prints JSON).

1. **Into dead residuals**: a conv whose residual addition moved into it (``fuse_residuals``) and
   whose residual nothing reads afterwards (``mark_dead_residuals``) writes ``act(conv + residual)``
   into the residual's memory (oneDNN's convolution with a sum post-op, or the implicit GEMMs), the
   kernel measured fastest by the tuner; ``off`` runs the same model with those convs writing a
   fresh output (``EngineConv2d.residual_dead = False``).
2. **Streaming stores**: the implicit GEMMs write outputs of 32 MiB and more with non-temporal
   stores (no read of each written cache line); ``off`` sets the threshold out of reach.

Both are timed on the frozen anytime model with confidence adaptivity (every exit, masks at the
paper's skip fractions) and on the engine's dense execution of the base model, all four variants
interleaved in each round, medians.

    python benchmarks/dense_epilogues.py
    python benchmarks/dense_epilogues.py --model hrnet_w48 --input 1024x2048 --reps 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Dict, List

import torch

import anytimeify
from anytimeify._machine import machine_info
from anytimeify.bench import PAPER_SKIPS, FixedMasks, fold_for_inference, tune_for
from anytimeify.masking.compiled import _extension
from anytimeify.masking.conv import EngineConv2d
from anytimeify.masking.tune import measuring_seconds
from anytimeify.models import create_model

OFF = 1 << 62      # no output is that large: plain stores everywhere
STREAM = 32 << 20  # the kernels' default threshold


def _set_dead(model: torch.nn.Module, value: Dict[str, bool]) -> None:
    for name, module in model.named_modules():
        if isinstance(module, EngineConv2d):
            module.residual_dead = value.get(name, False)


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="hrnet_w18_small_v2")
    parser.add_argument("--input", default="512x1024", help="HxW")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    ext = _extension()
    if ext is None:
        raise SystemExit("the compiled kernels are not available: nothing to compare")
    height, width = (int(v) for v in args.input.lower().split("x"))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = create_model(args.model).eval()
    model = anytimeify.convert(base, confidence=anytimeify.Confidence(criterion=FixedMasks(PAPER_SKIPS, seed=0),
                                                                      execution="sparse")).eval().freeze()
    dense = fold_for_inference(base)
    dead = {m: {n: mod.residual_dead for n, mod in m.named_modules() if isinstance(mod, EngineConv2d)}
            for m in (model, dense)}
    x = torch.randn(1, 3, height, width).contiguous(memory_format=torch.channels_last)
    tune_for((height, width), model, dense)

    def variant(module, run, into: bool, stream: bool):
        def call():
            _set_dead(module, dead[module] if into else {})
            ext.set_stream_min_bytes(STREAM if stream else OFF)
            return run()
        return call

    runs = {}
    for label, module, run in (("anytime", model, lambda: list(model.anytime(x))), ("dense", dense, lambda: dense(x))):
        for into in (False, True):
            for stream in (False, True):
                runs[f"{label}_into_{'on' if into else 'off'}_stream_{'on' if stream else 'off'}"] = \
                    variant(module, run, into, stream)
    times: Dict[str, List[float]] = {k: [] for k in runs}
    with torch.no_grad():
        for call in runs.values():
            call()  # warm-up (and any first-use measuring)
        for _ in range(args.reps):
            for name, call in runs.items():
                measured = measuring_seconds()
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start - (measuring_seconds() - measured))
    ext.set_stream_min_bytes(STREAM)
    _set_dead(model, dead[model])
    _set_dead(dense, dead[dense])
    median = {k: round(statistics.median(v), 4) for k, v in times.items()}
    ratios = {}
    for label in ("anytime", "dense"):
        base_s = median[f"{label}_into_off_stream_off"]
        ratios[label] = {k[len(label) + 1:]: round(v / base_s, 3) for k, v in median.items() if k.startswith(label)}
    print(json.dumps({
        "model": args.model, "input": [1, 3, height, width], "threads": args.threads, "reps": args.reps,
        "machine": machine_info(),
        "convs_into_dead_residual": {"anytime": sum(dead[model].values()), "dense": sum(dead[dense].values())},
        "seconds": median,
        "time_over_both_off": ratios,
    }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
