"""The halo interpolation's last channels in masked vectors against one scalar sum per channel (prints JSON).

The halo stencil writes ``I(y*m)`` at the skipped positions near kept ones, one vector of
channels at a time. HRNet-W18's branches have 18, 36 and 72 channels: after the whole vectors
(16 floats with AVX-512, 8 with AVX2) 2, 4 or 8 channels remain. The kernels sum those in masked
vector loads and stores; a build with ``-DANYTIMEIFY_SCALAR_TAIL`` sums them one channel at a time
(the kernels before). This script builds that variant for this CPU (about a minute, once) and
times, with both builds interleaved in every round (medians):

1. ``halo_stencil`` alone on W18-Small-v2's branch maps at a 512x1024 input, under clustered
   masks at the paper's kept fractions (0.81, 0.62, 0.37), a folded BN's shift and a ReLU, at the
   interpolation's initial lambda (3.0) and at lambda 1 (a wider support);
2. the frozen anytime W18-Small-v2 (confidence adaptivity, masks at the paper's skip fractions,
   every exit) at ``--input``.

    python benchmarks/halo_stencil.py
    python benchmarks/halo_stencil.py --input 1024x2048 --reps 5
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
from anytimeify.bench import PAPER_SKIPS, FixedMasks, clustered_field, tune_for
from anytimeify.masking import _ext
from anytimeify.masking.plans import MaskPlan
from anytimeify.masking.stencil import _stencil_taps
from anytimeify.masking.tune import measuring_seconds
from anytimeify.models import create_model

#: (channels, height, width) of W18-Small-v2's branches at a 512x1024 input
LAYERS = [(18, 128, 256), (36, 64, 128), (72, 32, 64)]
KEEPS = (0.81, 0.62, 0.37)


def _interleaved(runs: Dict[str, "callable"], reps: int) -> Dict[str, float]:
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for fn in runs.values():
        fn()
    for _ in range(reps):
        for name, fn in runs.items():
            measured = measuring_seconds()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start - (measuring_seconds() - measured))
    return {name: statistics.median(t) for name, t in times.items()}


def stencil_rows(builds: Dict[str, object], reps: int) -> List[dict]:
    rows = []
    for channels, height, width in LAYERS:
        field = clustered_field((height, width))
        for keep in KEEPS:
            plan = MaskPlan(field >= torch.quantile(field.flatten(), 1.0 - keep))
            generator = torch.Generator().manual_seed(channels)
            out = torch.randn(plan.positions, channels, generator=generator)
            out.index_fill_(0, plan.skipped_index, 0)
            shift = torch.randn(channels, generator=generator)
            keep_flat = plan.keep.reshape(-1).contiguous()
            none_i32, none_f32 = torch.empty(0, dtype=torch.int32), torch.empty(0)
            for lam in (3.0, 1.0):
                radius, taps = _stencil_taps(lam)
                halo, neighbours = plan.halo_index(radius)
                outs = {name: out.clone() for name in builds}
                runs = {name: (lambda ext=ext, o=outs[name]: ext.halo_stencil(
                    o, halo, neighbours, taps, keep_flat, shift, True, none_i32, none_f32, none_f32))
                    for name, ext in builds.items()}
                seconds = _interleaved(runs, reps)
                same = torch.allclose(outs["masked_vectors"], outs["scalar_tail"], rtol=1e-5, atol=1e-6)
                rows.append({"layer": f"{channels}ch_{height}x{width}", "keep": keep, "lambda": lam,
                             "halo_rows": int(halo.numel()),
                             **{f"{name}_ms": round(s * 1e3, 3) for name, s in seconds.items()},
                             "speedup": round(seconds["scalar_tail"] / seconds["masked_vectors"], 2),
                             "same_values": bool(same)})
    return rows


def whole_model(builds: Dict[str, object], size, reps: int) -> dict:
    torch.manual_seed(0)
    base = create_model("hrnet_w18_small_v2").eval()
    model = anytimeify.convert(base, confidence=anytimeify.Confidence(criterion=FixedMasks(PAPER_SKIPS, seed=0),
                                                                      execution="sparse")).eval().freeze()
    x = torch.randn(1, 3, *size).contiguous(memory_format=torch.channels_last)
    tune_for(size, model)

    def run(ext):
        saved = dict(_ext._state)
        _ext._state.update(tried=True, module=ext)
        try:
            return list(model.anytime(x))
        finally:
            _ext._state.clear()
            _ext._state.update(saved)

    with torch.no_grad():
        a, b = run(builds["masked_vectors"]), run(builds["scalar_tail"])
        diff = max((p.logits - q.logits).abs().max().item() / max(1.0, q.logits.abs().max().item())
                   for p, q in zip(a, b))
        seconds = _interleaved({name: (lambda ext=ext: run(ext)) for name, ext in builds.items()}, reps)
    return {"model": "hrnet_w18_small_v2", "input": list(size),
            **{f"{name}_s": round(s, 4) for name, s in seconds.items()},
            "speedup": round(seconds["scalar_tail"] / seconds["masked_vectors"], 3),
            "max_difference_relative_to_largest_logit": diff}


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default="512x1024", help="HxW of the whole-model run")
    parser.add_argument("--reps", type=int, default=9, help="interleaved rounds of the whole model")
    parser.add_argument("--stencil-reps", type=int, default=51, help="interleaved rounds of each stencil call")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    native = _ext.load()
    if native is None:
        raise SystemExit("the compiled kernels are not available: nothing to compare")
    scalar = _ext.build_variant("native", ("ANYTIMEIFY_SCALAR_TAIL",))
    if scalar is None:
        raise SystemExit("the ANYTIMEIFY_SCALAR_TAIL build failed (see the log)")
    builds = {"masked_vectors": native, "scalar_tail": scalar}
    size = tuple(int(v) for v in args.input.lower().split("x"))
    print(json.dumps({"machine": machine_info(), "threads": args.threads,
                      "stencil": stencil_rows(builds, args.stencil_reps),
                      "whole_model": whole_model(builds, size, args.reps)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
