"""Per-exit cumulative GFLOPs of popular segmenters converted with ``exits="stages"``.

Prints one JSON object per model (``anytimeify.FlopReport.to_dict()`` plus the exits' names and
the unconverted model's count), then a markdown table of the same numbers, as
docs/model-table.md shows them::

    HF_HUB_OFFLINE=1 python benchmarks/model_table.py            # every model
    HF_HUB_OFFLINE=1 python benchmarks/model_table.py --models unet_resnet34

Weights are random (FLOPs do not depend on them); exits are redesigned heads at the default width.
"""
from __future__ import annotations

import argparse
import json
import os
import warnings
from typing import Callable, Dict, List, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn as nn

import anytimeify
from anytimeify.flops import PAPER_UNIT, count_macs
from anytimeify.models import TimmSegmenter, hrnet_seg

CITYSCAPES_CLASSES = 19


def _smp(arch: str, encoder: str) -> nn.Module:
    import segmentation_models_pytorch as smp

    return getattr(smp, arch)(encoder_name=encoder, encoder_weights=None, classes=CITYSCAPES_CLASSES)


#: name -> (label, builder, input (H, W))
MODELS: Dict[str, Tuple[str, Callable[[], nn.Module], Tuple[int, int]]] = {
    "hrnet_w48": ("HRNetV2-W48", lambda: hrnet_seg("w48", CITYSCAPES_CLASSES), (1024, 2048)),
    "hrnet_w18_small_v2": ("HRNetV2-W18-Small-v2", lambda: hrnet_seg("w18_small_v2", CITYSCAPES_CLASSES),
                           (1024, 2048)),
    "unet_resnet34": ("smp Unet-resnet34", lambda: _smp("Unet", "resnet34"), (512, 1024)),
    "deeplabv3plus_resnet50": ("smp DeepLabV3+-resnet50", lambda: _smp("DeepLabV3Plus", "resnet50"),
                               (512, 1024)),
    "timm_convnext_tiny": ("TimmSegmenter convnext_tiny", lambda: TimmSegmenter("convnext_tiny", CITYSCAPES_CLASSES),
                           (512, 1024)),
}


def measure(name: str) -> dict:
    """Convert one model and count its per-exit cumulative MACs at its standard input size."""
    label, build, (h, w) = MODELS[name]
    torch.manual_seed(0)
    net = build().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = anytimeify.convert(net, exits="stages", head="redesigned").eval()
        x = torch.randn(1, 3, h, w)
        report = anytimeify.flops(model, x, name=label)
        with torch.no_grad():
            base_macs = count_macs(net, (x,))
    row = report.to_dict()
    row["key"] = name
    row["exit_names"] = [e["name"] for e in model.exit_info]
    row["base_gmacs"] = base_macs / 1e9
    row["base_paper_gflops"] = base_macs / PAPER_UNIT
    return row


def markdown(rows: List[dict]) -> str:
    """The table of docs/model-table.md: cumulative GMACs (paper GFLOPs = MACs / 2^30) per exit."""
    n = max(len(r["exits"]) for r in rows)
    head = ["model", "input", *[f"exit {i + 1}" for i in range(n)], "base model"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], f'{r["input"][2]}x{r["input"][3]}']
        cells += [f'{e["gmacs"]:.1f} ({e["paper_gflops"]:.1f})' for e in r["exits"]]
        cells += ["-"] * (n - len(r["exits"]))
        cells.append(f'{r["base_gmacs"]:.1f} ({r["base_paper_gflops"]:.1f})')
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS),
                        help="models to measure (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        row = measure(name)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print()
    print(markdown(rows))


if __name__ == "__main__":
    main()
