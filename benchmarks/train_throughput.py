"""Training throughput of anytime HRNets on the paper's crops, printed as JSON, with the cost of
a whole recipe run estimated from it.

For each model and precision: HRNet converted with redesigned exits and confidence adaptivity
(dense execution, the differentiable blend, as in training); segmentation models: 19 classes,
batch 2 of 512x1024 crops, SGD, the multi-exit cross-entropy; pose models (``*_pose``): 16 joints,
256x256 crops, 64x64 heatmaps, Adam, the multi-exit heatmap MSE. One warm-up step, then the median
of ``--reps`` timed optimiser steps. Prints ``{"device", "threads", "results": [{"model",
"precision", "images_per_s", "seconds_per_step", "epoch_hours", "run_hours"}]}``: an epoch is
the recipe's training set (Cityscapes 2975 images, MPII 22246 person crops), a run its epochs
(484, 210; REFERENCE.md §6), both on this one device.

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
from anytimeify._machine import cpu_model, machine_info
from anytimeify.train import HeatmapMSELoss, MultiExitLoss, SegmentationLoss

# (training images per epoch, epochs) of the recipes
RECIPE_SIZE = {"cityscapes": (2975, 484), "mpii": (22246, 210)}


def measure(model_name: str, precision: str, device: torch.device, crop, batch: int, reps: int) -> dict:
    torch.manual_seed(0)
    pose = model_name.endswith("_pose")
    if pose:
        crop = crop or (256, 256)
        net = create_model(model_name, 16)
        confidence = anytimeify.Confidence(criterion="heatmap", threshold=0.002)
    else:
        crop = crop or (512, 1024)
        net = create_model(model_name, 19)
        confidence = anytimeify.Confidence(threshold=0.998)
    model = anytimeify.convert(net, head="redesigned", confidence=confidence).train()
    model = model.to(device, memory_format=torch.channels_last)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    images = torch.randn(batch, 3, *crop, device=device).contiguous(memory_format=torch.channels_last)
    if pose:
        loss = MultiExitLoss(HeatmapMSELoss())
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
        labels = {"heatmaps": torch.rand(batch, 16, crop[0] // 4, crop[1] // 4, device=device),
                  "weights": torch.ones(batch, 16, device=device)}
    else:
        loss = MultiExitLoss(SegmentationLoss(ignore_index=255))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
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
    recipe = "mpii" if pose else "cityscapes"
    images_per_epoch, epochs = RECIPE_SIZE[recipe]
    epoch_hours = images_per_epoch / rate / 3600
    return {"model": model_name, "recipe": recipe, "precision": precision, "crop": list(crop), "batch": batch,
            "seconds_per_step": round(step, 3), "images_per_s": round(rate, 4), "epoch_hours": round(epoch_hours, 2),
            "run_hours": round(epoch_hours * epochs, 1), "steps_timed": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="hrnet_w18_small_v2,hrnet_w48,hrnet_w32_pose")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--crop", default=None, help="HxW (default: 512x1024 segmentation, 256x256 pose)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    crop = tuple(int(v) for v in args.crop.lower().split("x")) if args.crop else None
    results = []
    for model_name in args.models.split(","):
        for precision in args.precisions.split(","):
            results.append(measure(model_name, precision, device, crop, args.batch, args.reps))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    print(json.dumps({"device": name, "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "machine": machine_info() if device.type == "cpu" else None, "results": results}))


if __name__ == "__main__":
    main()
