"""Confidence adaptivity speed-up against the dense model (see anytimeify/bench.py for the method).

Prints JSON, one object per model: eager_s, dense_s (BN folded, channels-last), the dense runtimes
users deploy (onnxruntime_s, openvino_s, torch_compile_s, where installed: ``pip install
"anytimeify[bench]"``), anytime_s (all exits, CA in sparse execution, index building included),
flops_speedup, speedup, speedup_vs_eager, realisation = speedup / flops_speedup, best_dense_s and
best_dense_runtime, speedup_vs_best_dense, realisation_vs_best_dense, and per exit the time to reach
it over best_dense_s next to its FLOP share.

    python benchmarks/ca_speedup.py                                   # W48 and W18-Small-v2 at 1024x2048
    python benchmarks/ca_speedup.py --models hrnet_w18_small_v2 --reps 3
    python benchmarks/ca_speedup.py --models hrnet_w18_small_v2 --input 512x1024 --peers onnxruntime
    python benchmarks/ca_speedup.py --models hrnet_w48 --profile     # self CPU time per operator
    python benchmarks/ca_speedup.py --models hrnet_w48 --layers      # time per stage: CA vs ONNX Runtime, OpenVINO
    python benchmarks/ca_speedup.py --models hrnet_w48 --convs       # conv time per stage, engine dense vs CA
"""
from __future__ import annotations

import argparse
import json

from anytimeify.bench import PAPER_SKIPS, ca_speedup, layer_profile, profile_ops, stage_profile
from anytimeify.cli import PEER_NAMES, parse_peers, parse_size, parse_skips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["hrnet_w48", "hrnet_w18_small_v2"])
    parser.add_argument("--input", type=parse_size, default=(1024, 2048))
    parser.add_argument("--skip", type=parse_skips, default=list(PAPER_SKIPS))
    parser.add_argument("--reps", type=int, default=None, help="default: 3 for W48, 5 otherwise")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peers", type=parse_peers, default=list(PEER_NAMES),
                        help="dense runtimes timed beside the anytime model, comma-separated, or 'none'")
    parser.add_argument("--profile", action="store_true", help="per-operator profile instead of timings")
    parser.add_argument("--layers", action="store_true",
                        help="time per stage, anytime with CA against the same stage in ONNX Runtime and OpenVINO")
    parser.add_argument("--convs", action="store_true", help="conv time per stage, engine dense vs anytime with CA")
    args = parser.parse_args()
    if args.layers:
        peers = [p for p in args.peers if p != "torch_compile"]
        print(json.dumps([stage_profile(name, args.input, args.skip, args.threads, reps=args.reps or 3, peers=peers)
                          for name in args.models], indent=2))
        return
    if args.convs:
        print(json.dumps([layer_profile(name, args.input, args.skip, args.threads, reps=args.reps or 3)
                          for name in args.models], indent=2))
        return
    if args.profile:
        print(json.dumps([profile_ops(name, args.input, args.skip, args.threads) for name in args.models], indent=2))
        return
    results = [ca_speedup(name, args.input, args.skip, reps=args.reps or (3 if "w48" in name else 5),
                          threads=args.threads, peers=args.peers) for name in args.models]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
