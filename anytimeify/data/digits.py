"""Digit scenes: real handwritten digits composed into small segmentation scenes (the demo's data).

The digits are scikit-learn's 1,797 handwritten digits (``sklearn.datasets.load_digits``, 8x8
grey levels 0-16, shipped with the package, so nothing is downloaded). A scene is a textured,
coloured background with a few digits pasted on it at several sizes and positions; every pixel
of a digit's stroke is labelled with the digit's class (1 + digit), everything else is background
(0): 11 classes.

The digit *instances* are split once, per class, into a training and a held-out set
(:func:`digit_split`); the held-out split never depends on the seed of a run, so evaluation always
sees handwriting the model was never trained on. Every scene is a pure function of
``(seed, split, index)``: the same index gives the same scene in any process, worker or run.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

_logger = logging.getLogger(__name__)

__all__ = ["DigitScenes", "digit_split", "digit_images", "DIGIT_CLASSES", "SPLIT_SEED"]

DIGIT_CLASSES: Tuple[str, ...] = ("background",) + tuple(str(d) for d in range(10))
"""Class names of the digit scenes: background, then the digits (11 classes)."""
#: seed of the instance split (fixed: the held-out digits must not change with a run's seed)
SPLIT_SEED = 20220425
#: share of each class's instances held out
HELD_OUT = 0.25
#: a pixel belongs to a digit where the upsampled glyph's grey level (0-1) is above this: the
#: stroke and its immediate rim, so that the label is a solid shape a stride-4 network can resolve
STROKE_LEVEL = 0.2


@functools.lru_cache(maxsize=1)
def _digits() -> Tuple[torch.Tensor, torch.Tensor]:
    """(images (1797, 8, 8) float in [0, 1], targets (1797,) int64), loaded once per process."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # a declared dependency; this only fires in a broken environment
        raise ImportError("the digit scenes need scikit-learn (pip install scikit-learn)") from err
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32) / 16.0
    return images, torch.as_tensor(bunch.target, dtype=torch.int64)


def digit_split(split: str) -> torch.Tensor:
    """Indices of the digit instances of ``split``: ``"train"`` (75% of each class) or ``"val"``
    (the other 25%, never seen in training).

    Raises:
        ValueError: ``split`` is neither.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    _, targets = _digits()
    g = torch.Generator().manual_seed(SPLIT_SEED)
    chosen: List[torch.Tensor] = []
    for digit in range(10):
        members = torch.nonzero(targets == digit).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        n_val = int(round(HELD_OUT * len(members)))
        chosen.append(members[:n_val] if split == "val" else members[n_val:])
    return torch.sort(torch.cat(chosen)).values


#: share of each class's training instances held out for calibration (``digit_images("calib")``)
CALIBRATION = 0.2


def digit_images(split: str, size: int = 32, channels: int = 3) -> Tuple[torch.Tensor, torch.Tensor]:
    """The digits as a classification set: images resized to ``size`` x ``size`` and labels.

    Splits: ``"test"`` is :func:`digit_split`'s held-out 25%; ``"calib"`` is a fixed fifth of each
    class's remaining instances (a validation split for choosing thresholds, never trained on);
    ``"train"`` the rest. Images are bilinearly resized grey levels in [0, 1], repeated over
    ``channels``, then normalised to zero mean and unit variance over the whole data set.

    Returns:
        ``(images (N, channels, size, size) float32, labels (N,) int64)``.
    """
    if split not in ("train", "calib", "test"):
        raise ValueError(f"split must be 'train', 'calib' or 'test', got {split!r}")
    images, targets = _digits()
    if split == "test":
        chosen = digit_split("val")
    else:
        pool = digit_split("train")
        g = torch.Generator().manual_seed(SPLIT_SEED + 1)
        parts = []
        for digit in range(10):
            members = pool[targets[pool] == digit]
            members = members[torch.randperm(len(members), generator=g)]
            n_calib = int(round(CALIBRATION * len(members)))
            parts.append(members[:n_calib] if split == "calib" else members[n_calib:])
        chosen = torch.sort(torch.cat(parts)).values
    mean, std = float(images.mean()), float(images.std())
    x = F.interpolate(images[chosen, None], size=(size, size), mode="bilinear", align_corners=False)
    x = ((x - mean) / std).repeat(1, channels, 1, 1).contiguous()
    return x, targets[chosen].clone()


@dataclass(frozen=True)
class _Placement:
    top: int
    left: int
    size: int


def _overlaps(a: _Placement, b: _Placement, gap: int = 2) -> bool:
    return not (a.top + a.size + gap <= b.top or b.top + b.size + gap <= a.top
                or a.left + a.size + gap <= b.left or b.left + b.size + gap <= a.left)


def _luma(colour: torch.Tensor) -> torch.Tensor:
    return (colour * torch.tensor([0.299, 0.587, 0.114])).sum(-1)


class DigitScenes(Dataset):
    """Scenes of handwritten digits on textured backgrounds, with per-pixel labels.

    Args:
        split: ``"train"`` or ``"val"`` (digit instances never seen in training).
        length: number of scenes (each index is a different scene).
        size: ``(H, W)`` of a scene.
        digits: ``(min, max)`` digits per scene (fewer when they do not fit without overlap).
        digit_size: ``(min, max)`` side of a pasted digit in pixels.
        seed: seed of the scenes (the instance split does not depend on it).
        transform (Callable | None): optional callable ``(image, mask) -> (image, target)`` (e.g.
            :func:`anytimeify.data.segmentation_transforms`).

    Items are ``(image, mask)``: a ``tv_tensors.Image`` float ``(3, H, W)`` in [0, 1] and a
    ``tv_tensors.Mask`` int64 ``(H, W)`` with values 0 (background) to 10 (digit 9), unless
    ``transform`` changes them.
    """

    classes = DIGIT_CLASSES
    num_classes = len(DIGIT_CLASSES)

    def __init__(self, split: str = "train", length: int = 1000, size: Sequence[int] = (64, 64),
                 digits: Sequence[int] = (1, 3), digit_size: Sequence[int] = (20, 36), seed: int = 0,
                 transform=None):
        self.instances = digit_split(split)
        self.split = split
        if int(length) <= 0:
            raise ValueError(f"length must be a positive number of scenes, got {length!r}")
        self.length = int(length)
        self.size = _pair(size, "size")
        self.digits = _pair(digits, "digits")
        self.digit_size = _pair(digit_size, "digit_size")
        if not 1 <= self.digits[0] <= self.digits[1]:
            raise ValueError(f"digits must be (min, max) with 1 <= min <= max, got {tuple(digits)}")
        if not 8 <= self.digit_size[0] <= self.digit_size[1] <= min(self.size):
            raise ValueError(f"digit_size must be (min, max) with 8 <= min <= max <= the scene's side "
                             f"{min(self.size)}, got {tuple(digit_size)}")
        self.seed = int(seed)
        self.transform = transform

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return (f"DigitScenes(split={self.split!r}, length={self.length}, size={self.size}, "
                f"digits={self.digits}, digit_size={self.digit_size}, seed={self.seed})")

    def _generator(self, index: int) -> torch.Generator:
        # distinct streams per (seed, split, index), stable across processes and platforms
        split_code = 0 if self.split == "train" else 1
        return torch.Generator().manual_seed(((self.seed * 1_000_003 + split_code) * 10_000_019 + index) % (2 ** 63))

    def scene(self, index: int) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
        """The raw scene ``index``: image ``(3, H, W)`` in [0, 1], mask ``(H, W)`` int64 and the
        dataset indices (in ``sklearn.datasets.load_digits``) of the digits in it."""
        if not 0 <= index < self.length:
            raise IndexError(f"scene index {index} out of range for {self.length} scenes")
        g = self._generator(index)
        images, targets = _digits()
        h, w = self.size
        image = _background(h, w, g)
        mask = torch.zeros(h, w, dtype=torch.int64)
        placed: List[_Placement] = []
        used: List[int] = []
        wanted = int(torch.randint(self.digits[0], self.digits[1] + 1, (1,), generator=g))
        for _ in range(wanted):
            size = int(torch.randint(self.digit_size[0], self.digit_size[1] + 1, (1,), generator=g))
            for _attempt in range(20):
                spot = _Placement(int(torch.randint(0, h - size + 1, (1,), generator=g)),
                                  int(torch.randint(0, w - size + 1, (1,), generator=g)), size)
                if not any(_overlaps(spot, other) for other in placed):
                    break
            else:
                continue  # no room left for a digit this size
            instance = int(self.instances[int(torch.randint(0, len(self.instances), (1,), generator=g))])
            glyph = F.interpolate(images[instance][None, None], size=(size, size), mode="bicubic",
                                  align_corners=False)[0, 0].clamp(0, 1)
            region = (slice(None), slice(spot.top, spot.top + size), slice(spot.left, spot.left + size))
            colour = _contrasting_colour(image[region].mean(dim=(1, 2)), g)
            alpha = (glyph * 1.6).clamp(0, 1)
            image[region] = image[region] * (1 - alpha) + colour[:, None, None] * alpha
            mask[region[1:]][glyph > STROKE_LEVEL] = 1 + int(targets[instance])
            placed.append(spot)
            used.append(instance)
        image = (image + 0.02 * torch.randn(image.shape, generator=g)).clamp(0, 1)
        return image, mask, used

    def __getitem__(self, index: int):
        from torchvision import tv_tensors

        image, mask, _ = self.scene(int(index))
        image, mask = tv_tensors.Image(image), tv_tensors.Mask(mask)
        if self.transform is not None:
            return self.transform(image, mask)
        return image, mask


def _pair(value: Sequence[int], name: str) -> Tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    values = tuple(int(v) for v in value)
    if len(values) != 2:
        raise ValueError(f"{name} must be two integers, got {value!r}")
    return values  # type: ignore[return-value]


def _background(h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """A textured background: two colours mixed by an oriented grating and smooth noise."""
    colours = torch.rand(2, 3, generator=g)
    ys = torch.arange(h, dtype=torch.float32)[:, None]
    xs = torch.arange(w, dtype=torch.float32)[None, :]
    angle = float(torch.rand(1, generator=g)) * torch.pi
    period = 4.0 + 12.0 * float(torch.rand(1, generator=g))
    phase = 2 * torch.pi * float(torch.rand(1, generator=g))
    grating = 0.5 + 0.5 * torch.sin(2 * torch.pi * (xs * torch.cos(torch.tensor(angle))
                                                    + ys * torch.sin(torch.tensor(angle))) / period + phase)
    blobs = F.interpolate(torch.rand(1, 1, 4, 4, generator=g), size=(h, w), mode="bicubic",
                          align_corners=False)[0, 0].clamp(0, 1)
    weight = float(torch.rand(1, generator=g))
    mix = weight * grating + (1 - weight) * blobs
    return colours[0][:, None, None] * (1 - mix) + colours[1][:, None, None] * mix


def _contrasting_colour(around: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random colour whose luminance differs from ``around``'s by at least 0.3 where possible."""
    for _ in range(10):
        colour = torch.rand(3, generator=g)
        if abs(float(_luma(colour) - _luma(around))) >= 0.3:
            return colour
    return torch.zeros(3) if float(_luma(around)) > 0.5 else torch.ones(3)
