"""Training throughput of anytime HRNets on the paper's Cityscapes crops, printed as JSON.

For each model and precision: HRNet converted with redesigned exits and confidence adaptivity
(dense execution, the differentiable blend, as in training), 19 classes, batch 2 of 512x1024
crops, SGD, the multi-exit cross-entropy; one warm-up step, then the median of ``--reps`` timed
optimiser steps. Prints ``{"device", "threads", "results": [{"model", "precision", "images_per_s",
"seconds_per_step", "cityscapes_epoch_hours"}]}``, where an epoch of the Cityscapes recipe is
2975 images (REFERENCE.md §6).

    python benchmarks/train_throughput.py                      # W18-Small-v2 and W48, fp32 and bf16, CPU
    python benchmarks/train_throughput.py --models hrnet_w18_small_v2 --precisions fp32 --reps 3
    python benchmarks/train_throughput.py --device cuda        # on a GPU (fp16 too: --precisions fp32,bf16,fp16)
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import anytimeify
from anytimeify.models import create_model
from anytimeify.train import MultiExitLoss, SegmentationLoss

CITYSCAPES_TRAIN_IMAGES = 2975


def measure(model_name: str, precision: str, device: torch.device, crop, batch: int, reps: int) -> dict:
    torch.manual_seed(0)
    net = create_model(model_name, 19)
    model = anytimeify.convert(net, head="redesigned", confidence=anytimeify.Confidence(threshold=0.998)).train()
    model = model.to(device, memory_format=torch.channels_last)
    loss = MultiExitLoss(SegmentationLoss(ignore_index=255))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    images = torch.randn(batch, 3, *crop, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 19, (batch, *crop), device=device)
    times = []
    for i in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            total, _ = loss(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step builds kernels and allocator pools
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    rate = batch / step
    return {"model": model_name, "precision": precision, "crop": list(crop), "batch": batch,
            "seconds_per_step": round(step, 3), "images_per_s": round(rate, 4),
            "cityscapes_epoch_hours": round(CITYSCAPES_TRAIN_IMAGES / rate / 3600, 2), "steps_timed": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="hrnet_w18_small_v2,hrnet_w48")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--crop", default="512x1024")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    crop = tuple(int(v) for v in args.crop.lower().split("x"))
    results = []
    for model_name in args.models.split(","):
        for precision in args.precisions.split(","):
            results.append(measure(model_name, precision, device, crop, args.batch, args.reps))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(json.dumps({"device": name, "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
