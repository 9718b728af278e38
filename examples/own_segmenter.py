"""Convert your own segmenter: a timm backbone, an smp Unet and a hand-written network, made anytime.

Each network is converted with ``exits="stages"``, trained for a few steps on random images with
random labels (the point is the API, not the accuracy), and run as an anytime model. Every number
that docs/tutorials/own-segmenter.md quotes is printed here::

    HF_HUB_OFFLINE=1 python examples/own_segmenter.py
"""
from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn as nn
import torch.nn.functional as F

import anytimeify
from anytimeify.models import TimmSegmenter

CLASSES = 5
SIZE = (64, 96)
STEPS = 3


class TinySegmenter(nn.Module):
    """A hand-written encoder-decoder: three strided stages and a 1x1 head at stride 4."""

    def __init__(self, num_classes: int):
        super().__init__()

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.stem = nn.Sequential(stage(3, 16), stage(16, 32))   # stride 4
        self.stage1 = stage(32, 48)                              # stride 8
        self.stage2 = stage(48, 64)                              # stride 16
        self.head = nn.Conv2d(32 + 64, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.stem(x)
        high = self.stage2(self.stage1(low))
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(torch.cat([low, high], dim=1))


def train_a_few_steps(model: anytimeify.AnytimeModel, steps: int) -> list:
    """Deep supervision: the loss is the mean over every exit's cross-entropy."""
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    losses = []
    for _ in range(steps):
        images = torch.randn(2, 3, *SIZE, generator=generator)
        outputs = model(images)
        labels = torch.randint(0, CLASSES, (2, *outputs[-1].shape[-2:]), generator=generator)
        loss = sum(F.cross_entropy(o, labels) for o in outputs) / len(outputs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def run(label: str, net: nn.Module, exits="stages") -> None:
    """Show the exits ``exits`` picks, convert, train a few steps, run as anytime."""
    print(f"== {label}")
    for candidate in anytimeify.inspect(net, input_size=SIZE):
        if candidate.picked or exits != "stages":
            print(f"   {candidate}")
    torch.manual_seed(0)
    model = anytimeify.convert(net, exits=exits, input_size=SIZE)
    print(f"   exits: {model.num_exits}, input sizes must be multiples of {model.input_divisor}")
    losses = train_a_few_steps(model, STEPS)
    print(f"   training losses: {', '.join(f'{v:.3f}' for v in losses)}")
    model.eval()
    image = torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for out in model.anytime(image):
            print(f"   exit {out.index}: logits {tuple(out.logits.shape)}, cumulative {out.gmacs:.4f} GMACs")


def main() -> None:
    import segmentation_models_pytorch as smp

    torch.set_num_threads(min(2, torch.get_num_threads()))
    warnings.filterwarnings("ignore", module="timm")
    torch.manual_seed(0)
    run("timm backbone (resnet18) + small head", TimmSegmenter("resnet18", CLASSES, width=32))
    torch.manual_seed(0)
    run("smp Unet (resnet18 encoder)", smp.Unet("resnet18", encoder_weights=None, classes=CLASSES))
    # no adapter knows a hand-written network: name its stages from anytimeify.inspect's list
    torch.manual_seed(0)
    run("hand-written segmenter, exits named", TinySegmenter(CLASSES), exits=["stem", "stage1"])


if __name__ == "__main__":
    main()
