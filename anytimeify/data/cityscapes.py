"""Cityscapes semantic segmentation, read from the layout the data set ships in.

::

    root/leftImg8bit/{train,val,test}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
    root/gtFine/{train,val,test}/{city}/{city}_{seq}_{frame}_gtFine_labelIds.png

The label maps hold Cityscapes' 34 label ids; they are mapped to the 19 training ids (every other
id to the ignore label 255) through the official label table as torchvision's
``datasets.Cityscapes`` carries it, not a hand-copied one. ``CITYSCAPES_CLASS_WEIGHTS`` are the
per-class cross-entropy weights the paper's reference training uses.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

import torch
from torch.utils.data import Dataset

from .folder import DataFileError, read_image, read_mask

__all__ = ["CityscapesSegmentation", "CITYSCAPES_CLASSES", "CITYSCAPES_PALETTE", "CITYSCAPES_CLASS_WEIGHTS",
           "cityscapes_label_table"]

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
SPLITS = ("train", "val", "test", "train_extra")

# Per-class weights of the cross-entropy in the ADP-C reference training (HRNet-Semantic-Segmentation's).
CITYSCAPES_CLASS_WEIGHTS = (0.8373, 0.918, 0.866, 1.0345, 1.0166, 0.9969, 0.9754, 1.0489, 0.8786, 1.0023, 0.9539,
                            0.9843, 1.1116, 0.9037, 1.0865, 1.0955, 1.0865, 1.1529, 1.0507)
"""Per-class weights of the cross-entropy in the ADP-C reference training, by train id."""


def _train_classes():
    from torchvision.datasets import Cityscapes

    return sorted((c for c in Cityscapes.classes if 0 <= c.train_id < 255), key=lambda c: c.train_id)


CITYSCAPES_CLASSES: Tuple[str, ...] = tuple(c.name for c in _train_classes())
"""The 19 class names, by train id (``road``, ``sidewalk``, ..., ``bicycle``)."""
CITYSCAPES_PALETTE: Tuple[Tuple[int, int, int], ...] = tuple(tuple(c.color) for c in _train_classes())
"""The official RGB colour of each of the 19 classes, by train id."""


def cityscapes_label_table(ignore_index: int = 255) -> torch.Tensor:
    """A 256-entry lookup ``label id -> train id`` (``ignore_index`` for ids not trained on).

    From torchvision's ``datasets.Cityscapes.classes``, the official table of ``cityscapesscripts``.
    """
    from torchvision.datasets import Cityscapes

    table = torch.full((256,), int(ignore_index), dtype=torch.int64)
    for c in Cityscapes.classes:
        if c.id >= 0:
            table[c.id] = c.train_id if 0 <= c.train_id < 255 else int(ignore_index)
    return table


class CityscapesSegmentation(Dataset):
    """Cityscapes images with their fine labels as 19-class train-id maps.

    Args:
        root: the Cityscapes folder (holding ``leftImg8bit/`` and ``gtFine/``).
        split: ``train``, ``val`` or ``test`` (test labels are all "unlabelled" on the public set).
        transform: joint transform ``(image uint8 (3, H, W), labels int64 (H, W)) -> (image, labels)``,
            e.g. :func:`anytimeify.data.segmentation_transforms`; None returns the raw tensors.
        ignore_index: train id of the pixels not evaluated.

    Every image must have its label file (checked when the set is built); a label map whose size
    differs from its image fails when read, naming both files.

    Raises:
        FileNotFoundError: ``root`` or the split's folders do not exist, or an image lacks its label.
        ValueError: an unknown split, or a split without images.
    """

    def __init__(self, root: Union[str, os.PathLike], split: str = "train", transform: Optional[Callable] = None,
                 ignore_index: int = 255):
        if split not in SPLITS:
            raise ValueError(f"Cityscapes split must be one of {list(SPLITS)}, got {split!r}")
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.ignore_index = int(ignore_index)
        self.table = cityscapes_label_table(self.ignore_index)
        images_dir = self.root / "leftImg8bit" / split
        labels_dir = self.root / "gtFine" / split
        for folder in (images_dir, labels_dir):
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"Cityscapes folder {str(folder)!r} does not exist; --data-root must be the folder that holds "
                    "leftImg8bit/ and gtFine/ (as the data set unpacks from leftImg8bit_trainvaltest.zip and "
                    "gtFine_trainvaltest.zip)")
        self.samples: List[Tuple[Path, Path]] = []
        for image in sorted(images_dir.glob(f"*/*{IMAGE_SUFFIX}")):
            name = image.name[: -len(IMAGE_SUFFIX)]
            label = labels_dir / image.parent.name / f"{name}{LABEL_SUFFIX}"
            if not label.is_file():
                raise FileNotFoundError(f"Cityscapes label {str(label)!r} of image {str(image)!r} does not exist")
            self.samples.append((image, label))
        if not self.samples:
            raise ValueError(f"no Cityscapes images (*{IMAGE_SUFFIX}) under {str(images_dir)!r}/<city>/")

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return f"CityscapesSegmentation(root={str(self.root)!r}, split={self.split!r}, images={len(self)})"

    def __getitem__(self, index: int):
        image_path, label_path = self.samples[index]
        image = read_image(image_path)
        ids = read_mask(label_path)
        if tuple(ids.shape) != tuple(image.shape[-2:]):
            raise DataFileError(f"Cityscapes label {str(label_path)!r} is {ids.shape[1]}x{ids.shape[0]}, its image "
                                f"{str(image_path)!r} {image.shape[2]}x{image.shape[1]}; they must be the same size")
        if int(ids.max()) > 255 or int(ids.min()) < 0:
            raise DataFileError(f"Cityscapes label {str(label_path)!r} holds ids outside 0-255; expected a "
                                "*_gtFine_labelIds.png")
        labels = self.table[ids]
        if self.transform is not None:
            return self.transform(image, labels)
        return image, labels
