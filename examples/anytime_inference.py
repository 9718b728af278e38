"""Anytime inference with confidence adaptivity: HRNetV2-W18-Small-v2, exit after exit, under a deadline.

Builds the network (random weights), converts it with redesigned exits and confidence adaptivity
(sparse execution), measures each segment's time on this machine (``model.profile_latency``), then
streams the exits of one image with ``model.anytime(image, deadline=...)``: the library never starts
a segment whose measured time exceeds what is left of the deadline, so the later stages are never
computed. Prints, per exit, the cumulative GFLOPs (MACs / 2^30) in the paper's convention with and
without confidence adaptivity and as really executed by the sparse engine, the fraction of positions
the exit marks confident, the expected and the elapsed compute time.

    python examples/anytime_inference.py
    python examples/anytime_inference.py --input 1024x2048 --deadline 2.0
    python examples/anytime_inference.py --threshold 0.998   # max-prob criterion, the paper's threshold

A randomly initialised network is almost never 99.8% sure of anything, so by default the example
uses the paper's top-k criterion: after exits 1, 2, 3 it marks the 19.3%, 38.4% and 63.0% most
confident positions (the paper's average skip fractions on Cityscapes) as confident. With trained
weights, pass ``--threshold 0.998``. The first run on a machine compiles the masked-conv CPU
kernel (set ``ANYTIMEIFY_NO_EXT=1`` to use the pure-PyTorch path instead) and measures the engine's
kernels for the model's layer shapes (cached); both happen before anything is timed.
"""
from __future__ import annotations

import argparse
import math
import time

import torch

import anytimeify
from anytimeify import Confidence
from anytimeify.bench import tune_for
from anytimeify.cli import parse_size
from anytimeify.models import hrnet_seg


#: fraction of positions skipped after exits 1, 2, 3 on average on Cityscapes (ADP-C, W48)
PAPER_SKIPS = [0.193, 0.384, 0.630]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=parse_size, default=(256, 512), help="HxW, multiples of 32 (default 256x512)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="use the max-prob criterion with this threshold (default: top-k at the paper's skip fractions)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds (default: half of a full pass as profile_latency measured it)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.deadline is not None and not (math.isfinite(args.deadline) and args.deadline > 0):
        parser.error(f"--deadline must be a positive number of seconds, got {args.deadline}")

    torch.manual_seed(args.seed)
    net = hrnet_seg("w18_small_v2", num_classes=19).eval()
    if args.threshold is None:
        confidence = Confidence(criterion="topk", fraction=PAPER_SKIPS, execution="sparse")
        how = f"top-k, skipping {', '.join(f'{f:.1%}' for f in PAPER_SKIPS)} after exits 1-3"
    else:
        confidence = Confidence(criterion="max_prob", threshold=args.threshold, execution="sparse")
        how = f"max softmax probability > {args.threshold} is confident"
    model = anytimeify.convert(net, head="redesigned", confidence=confidence).eval()
    model = model.freeze()  # inference copy: batch norms folded into the convs, channels-last
    image = torch.randn(1, 3, *args.input, generator=torch.Generator().manual_seed(args.seed))
    image = image.contiguous(memory_format=torch.channels_last)
    print(f"HRNetV2-W18-Small-v2, {model.num_exits} exits (redesigned heads), input {args.input[0]}x{args.input[1]}, "
          f"{torch.get_num_threads()} threads")
    print(f"confidence adaptivity: {how}; sparse execution")

    with torch.no_grad():
        # untimed: the engine's kernel choices for every layer shape of the model (measured once on
        # this machine and cached; nothing is measured while a time is taken)
        tune_for(tuple(args.input), model)
        # the cost of every exit without confidence adaptivity, for comparison (same weights)
        model.set_confidence(False)
        plain = [out.paper_macs / 2 ** 30 for out in model.anytime(image)]
        model.set_confidence(True)
        # each segment's time on this machine (median of 3 runs after an untimed warm-up run):
        # what anytime(deadline=...) decides with
        profile = model.profile_latency(tuple(image.shape), reps=3, warmup=1)
        expected = [sum(profile["seconds"][:k + 1]) for k in range(model.num_exits)]
        deadline = args.deadline if args.deadline is not None else expected[-1] / 2
        print(f"deadline: {deadline:.3f} s; a full pass is expected to take {expected[-1]:.3f} s\n")

        print("cumulative GFLOPs (MACs / 2^30): paper convention with CA | without CA | executed by the sparse engine")
        print(f"{'exit':>4}  {'paper':>8}  {'no CA':>8}  {'executed':>8}  {'skipped':>7}  {'expected s':>10}  "
              f"{'elapsed s':>9}  logits")
        outputs = []
        start = time.perf_counter()
        for out in model.anytime(image, deadline=deadline):
            outputs.append(out)
            shape = "x".join(map(str, out.logits.shape[1:]))
            skipped = f"{out.skipped:7.1%}" if out.index < model.num_exits else f"{'-':>7}"
            print(f"{out.index:>4}  {out.paper_macs / 2 ** 30:8.2f}  {plain[out.index - 1]:8.2f}  "
                  f"{out.macs / 2 ** 30:8.2f}  {skipped}  {expected[out.index - 1]:10.3f}  {out.elapsed:9.3f}  {shape}")
        left = deadline - (time.perf_counter() - start)
    if len(outputs) == model.num_exits:
        print(f"\nevery exit fitted the deadline ({max(left, 0.0):.3f} s left)")
    else:
        reached = len(outputs)
        step = profile["seconds"][reached]
        never = [str(i) for i in range(reached + 1, model.num_exits + 1)]
        print(f"\nexit {reached + 1} was not started: its segment is expected to take {step:.3f} s and "
              f"{max(left, 0.0):.3f} s of the deadline were left; exit{'s' if len(never) > 1 else ''} "
              f"{', '.join(never)} never computed")
    if not outputs:
        print("no prediction: not even the first exit fits the deadline")
        return
    last = outputs[-1]
    labels = last.logits.argmax(dim=1)
    print(f"prediction: exit {last.index}, label map {tuple(labels.shape)} at 1/4 of the input, "
          f"{len(labels.unique())} distinct classes")
    assert math.isfinite(last.logits.abs().max().item())


if __name__ == "__main__":
    main()
