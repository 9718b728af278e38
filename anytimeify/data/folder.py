"""Segmentation data on disk: a folder of images and a folder of label maps with matching names.

This is the layout most segmentation data sets reduce to (and what a later Cityscapes or
PASCAL-Context loader converts to): ``root/images/NAME.png|jpg`` and ``root/masks/NAME.png``
(one channel, one class index per pixel, ``ignore_index`` for unlabelled pixels). Files are
decoded with Pillow; a missing or unreadable file raises an error that names it.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import Dataset

_logger = logging.getLogger(__name__)

__all__ = ["ImageMaskFolder", "read_image", "read_mask", "DataFileError"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DataFileError(ValueError):
    """A data file exists but cannot be decoded (truncated, not an image, wrong channels)."""


def _open(path: Path, what: str):
    """Open and fully decode an image file with Pillow (truncated files fail here, not later)."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist")
    try:
        with Image.open(path) as opened:
            opened.load()
            return opened.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataFileError(f"cannot decode {what} file {str(path)!r}: {err}. Is it a complete PNG or JPEG?") from err


def read_image(path: Union[str, os.PathLike]) -> torch.Tensor:
    """Decode an RGB image ``(3, H, W)`` uint8 (greyscale and palette files are converted to RGB).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataFileError: the file cannot be decoded; the message names it.
    """
    import numpy as np

    picture = _open(Path(path), "image").convert("RGB")
    return torch.from_numpy(np.array(picture, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def read_mask(path: Union[str, os.PathLike]) -> torch.Tensor:
    """Decode a one-channel label map ``(H, W)`` int64 (greyscale, 16-bit or palette PNG: the
    palette index is the class).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataFileError: the file cannot be decoded or has more than one channel.
    """
    import numpy as np

    picture = _open(Path(path), "label")
    if picture.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
        raise DataFileError(f"label file {str(path)!r} is a {picture.mode} image; a label map has one channel "
                            "(a class index per pixel, saved as a greyscale or palette PNG)")
    return torch.from_numpy(np.array(picture).astype(np.int64))


class ImageMaskFolder(Dataset):
    """Pairs ``root/<images>/NAME.*`` with ``root/<masks>/NAME<mask_suffix>``.

    Args:
        root: the data set folder.
        images: sub-folder of the images.
        masks: sub-folder of the label maps.
        mask_suffix: file ending of a label map (``"_labelTrainIds.png"`` style endings work).
        transform: callable ``(image, mask) -> (image, target)``, e.g.
            :func:`anytimeify.data.segmentation_transforms`; without it items are
            ``(tv_tensors.Image uint8, tv_tensors.Mask int64)``.

    Raises:
        FileNotFoundError: ``root`` or its image folder is missing, the folder has no images, or
            an image has no label map (the message names the path it looked for).
    """

    def __init__(self, root: Union[str, os.PathLike], images: str = "images", masks: str = "masks",
                 mask_suffix: str = ".png", transform: Optional[Callable] = None,
                 suffixes: Sequence[str] = IMAGE_SUFFIXES):
        self.root = Path(root)
        image_dir, self.mask_dir = self.root / images, self.root / masks
        if not image_dir.is_dir():
            raise FileNotFoundError(f"image folder {str(image_dir)!r} does not exist (root={str(self.root)!r})")
        self.images: List[Path] = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in suffixes)
        if not self.images:
            raise FileNotFoundError(f"no images ({', '.join(suffixes)}) in {str(image_dir)!r}")
        self.mask_suffix = mask_suffix
        self.masks = [self.mask_dir / (p.stem + mask_suffix) for p in self.images]
        missing = [str(m) for m in self.masks if not m.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images have no label map, e.g. {missing[0]!r}; "
                                    f"every image needs {str(self.mask_dir)!r}/<name>{mask_suffix}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        from torchvision import tv_tensors

        image = tv_tensors.Image(read_image(self.images[index]))
        mask = tv_tensors.Mask(read_mask(self.masks[index]))
        if tuple(image.shape[-2:]) != tuple(mask.shape[-2:]):
            raise DataFileError(f"image {str(self.images[index])!r} is {tuple(image.shape[-2:])} but its label map "
                                f"{str(self.masks[index])!r} is {tuple(mask.shape[-2:])}")
        if self.transform is not None:
            return self.transform(image, mask)
        return image, mask

    def __repr__(self) -> str:
        return f"ImageMaskFolder(root={str(self.root)!r}, {len(self)} images)"
