"""Per-exit latency of the anytime model against the unconverted (dense) model, side by side.

For each model: the base HRNet, the same model under the dense runtimes users deploy (ONNX Runtime,
OpenVINO, torch.compile where installed: ``pip install "anytimeify[bench]"``; see
anytimeify/peers.py) and its converted anytime version (exits with redesigned heads, no confidence
adaptivity) run interleaved, repetition after repetition, on one 1024x2048 image; medians are
reported. Prints JSON: per-exit elapsed time as a fraction of the eager model's latency
(``fraction_of_dense``) and of the fastest dense runtime's (``fraction_of_best_dense``) next to that
exit's FLOP share, the time to the first prediction, and the overhead of running every exit.

    python benchmarks/anytime_latency.py                 # W48 (3 reps) and W18-Small-v2 (7 reps)
    python benchmarks/anytime_latency.py --models hrnet_w18_small_v2 --input 512x1024 --reps 5
    python benchmarks/anytime_latency.py --peers none     # eager only
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from anytimeify._machine import machine_info
import anytimeify
from anytimeify.bench import _interleaved
from anytimeify.cli import PEER_NAMES, parse_peers, parse_size
from anytimeify.peers import prepare_peers
from anytimeify.models import create_model


def measure(name: str, size, reps: int, head: str, peers=PEER_NAMES) -> dict:
    torch.manual_seed(0)
    base = create_model(name).eval()
    start = time.perf_counter()
    model = anytimeify.convert(base, head=head).eval()
    convert_s = time.perf_counter() - start
    x = torch.randn(1, 3, *size)
    exit_times = []
    with torch.no_grad():
        ref = base(x)  # warm-up both (oneDNN primitive creation)
        outs = list(model.anytime(x))
        base_macs = anytimeify.flops(base, x).exits[-1].macs
        prepared = prepare_peers(base, x, torch.get_num_threads(), peers, reference=ref)
        runs = {"dense": lambda: base(x)}
        for peer in prepared:
            if peer.ok:
                runs[peer.name] = (lambda run: lambda: run(x))(peer.run)
                runs[peer.name]()  # warm-up
        runs["anytime"] = lambda: exit_times.append([o.elapsed for o in model.anytime(x)])
        times = _interleaved(runs, reps)
    med = {key: statistics.median(t) for key, t in times.items() if key != "anytime"}
    dense = med["dense"]
    best_runtime = min(med, key=med.get)
    best = med[best_runtime]
    per_exit = [statistics.median(t[i] for t in exit_times) for i in range(len(outs))]
    result = {
        "model": name,
        "machine": machine_info(),
        "head": head,
        "input": [1, 3, *size],
        "threads": torch.get_num_threads(),
        "reps": reps,
        "convert_s": round(convert_s, 3),
        "dense_s": round(dense, 4),
    }
    for peer in prepared:
        result[f"{peer.name}_s"] = round(med[peer.name], 4) if peer.ok else None
    result.update({
        "peers": {peer.name: peer.summary() for peer in prepared},
        "best_dense_s": round(best, 4),
        "best_dense_runtime": "eager" if best_runtime == "dense" else best_runtime,
        "exits": [
            {"exit": o.index, "elapsed_s": round(t, 4), "fraction_of_dense": round(t / dense, 4),
             "fraction_of_best_dense": round(t / best, 4), "flop_share": round(o.macs / base_macs, 4)}
            for o, t in zip(outs, per_exit)
        ],
        "first_exit_fraction": round(per_exit[0] / dense, 4),
        "first_exit_fraction_of_best_dense": round(per_exit[0] / best, 4),
        "all_exits_overhead": round(per_exit[-1] / dense - 1.0, 4),
        "all_exits_overhead_vs_best_dense": round(per_exit[-1] / best - 1.0, 4),
        "all_exits_flop_overhead": round(outs[-1].macs / base_macs - 1.0, 4),
    })
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["hrnet_w48", "hrnet_w18_small_v2"])
    parser.add_argument("--input", type=parse_size, default=(1024, 2048))
    parser.add_argument("--reps", type=int, default=None, help="default: 3 for W48, 7 otherwise")
    parser.add_argument("--head", default="redesigned", choices=["redesigned", "original"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peers", type=parse_peers, default=list(PEER_NAMES),
                        help="dense runtimes to time beside the model, comma-separated, or 'none'")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for name in args.models:
        reps = args.reps or (3 if "w48" in name else 7)
        results.append(measure(name, args.input, reps, args.head, args.peers))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
