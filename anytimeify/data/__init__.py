"""Data for training and evaluating anytime models: data sets, joint transforms, data order.

* :class:`DigitScenes`: real handwritten digits (scikit-learn's) composed into segmentation
  scenes; the demo's data, offline.
* :class:`ImageMaskFolder`: images and label maps on disk.
* :class:`CityscapesSegmentation`: Cityscapes in the layout it ships in (``leftImg8bit/``,
  ``gtFine/``), label ids mapped to the 19 train ids by the official table.
* :class:`MPIIDataset`: MPII human pose in the layout of the HRNet pose code (``annot/*.json``,
  ``images/``), with that code's affine crops and heatmap targets.
* :func:`segmentation_transforms`, :func:`pose_transforms`: the paper's augmentation, on
  torchvision's ``transforms.v2``.
* :class:`EpochSampler`, :class:`SeededSamples`: a data order that survives resuming and DDP.

Data sets are created by name from a training config through a small registry
(:func:`register_dataset`, :func:`create_dataset`); ``"module.path:callable"`` names any factory.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, List, Optional

from torch.utils.data import Dataset

from .digits import DIGIT_CLASSES, DigitScenes, digit_images, digit_split
from .cityscapes import (CITYSCAPES_CLASS_WEIGHTS, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, CityscapesSegmentation,
                         cityscapes_label_table)
from .folder import DataFileError, ImageMaskFolder, read_image, read_mask
from .mpii import MPII_FLIP_PAIRS, MPII_JOINTS, MPIIDataset
from .sampling import EpochSampler, SeededSamples, sample_seed
from .transforms import (
    IMAGENET_MEAN, IMAGENET_STD, PoseTransform, RandomHorizontalFlipJoints, RandomScale, SegmentationTransform,
    gaussian_heatmaps, pose_transforms, segmentation_transforms,
)

__all__ = [
    "DigitScenes", "digit_split", "digit_images", "DIGIT_CLASSES", "ImageMaskFolder", "read_image", "read_mask", "DataFileError",
    "EpochSampler", "SeededSamples", "sample_seed", "segmentation_transforms", "pose_transforms",
    "SegmentationTransform", "PoseTransform", "RandomScale", "RandomHorizontalFlipJoints", "gaussian_heatmaps",
    "IMAGENET_MEAN", "IMAGENET_STD", "register_dataset", "create_dataset", "list_datasets",
    "CityscapesSegmentation", "CITYSCAPES_CLASSES", "CITYSCAPES_PALETTE", "CITYSCAPES_CLASS_WEIGHTS",
    "cityscapes_label_table", "MPIIDataset", "MPII_JOINTS", "MPII_FLIP_PAIRS", "OWN_GEOMETRY",
]

# Data sets that crop and augment themselves (their transform options are their own keyword
# arguments, with ``train=`` saying whether to augment) instead of taking a joint transform.
OWN_GEOMETRY = {"mpii"}

_DATASETS: Dict[str, Callable[..., Dataset]] = {}


def register_dataset(name: str) -> Callable[[Callable[..., Dataset]], Callable[..., Dataset]]:
    """Decorator: make a data set factory ``fn(split=..., transform=..., **kwargs)`` creatable by name."""
    def add(fn: Callable[..., Dataset]) -> Callable[..., Dataset]:
        if name in _DATASETS and _DATASETS[name] is not fn:
            raise ValueError(f"a data set named {name!r} is already registered")
        _DATASETS[name] = fn
        return fn
    return add


def list_datasets() -> List[str]:
    """Names :func:`create_dataset` accepts (besides ``"module.path:callable"``)."""
    return sorted(_DATASETS)


def _resolve(name: str) -> Callable[..., Dataset]:
    if name in _DATASETS:
        return _DATASETS[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"cannot import data set factory {name!r}: {err}") from err
    raise ValueError(f"unknown data set {name!r}; choose one of {list_datasets()} or give 'module.path:callable'")


def create_dataset(name: str, *, split: str, transform: Optional[Callable] = None, **kwargs: Any) -> Dataset:
    """Create a registered data set (or ``"module.path:callable"``) for ``split``.

    Args:
        name: a registered name (:func:`list_datasets`) or ``"module.path:callable"``.
        split: ``"train"`` or ``"val"``, passed to the factory.
        transform: the joint transform, passed to the factory.
        **kwargs: the factory's own options.
    """
    factory = _resolve(name)
    try:
        return factory(split=split, transform=transform, **kwargs)
    except TypeError as err:
        raise ValueError(f"data set {name!r} does not take these options {sorted(kwargs)}: {err}") from err


@register_dataset("digits")
def _digits(split: str, transform: Optional[Callable] = None, **kwargs: Any) -> Dataset:
    return DigitScenes(split=split, transform=transform, **kwargs)


@register_dataset("folder")
def _folder(split: str, transform: Optional[Callable] = None, root: str = "", **kwargs: Any) -> Dataset:
    """``root/<split>/images`` + ``root/<split>/masks`` when ``root/<split>`` exists, else ``root``."""
    import os

    if not root:
        raise ValueError("data set 'folder' needs root: the folder that holds images/ and masks/")
    split_root = os.path.join(root, split)
    return ImageMaskFolder(split_root if os.path.isdir(split_root) else root, transform=transform, **kwargs)


@register_dataset("cityscapes")
def _cityscapes(split: str, transform: Optional[Callable] = None, root: str = "", **kwargs: Any) -> Dataset:
    """Cityscapes fine annotations under ``root`` (``leftImg8bit/``, ``gtFine/``)."""
    if not root:
        raise ValueError("data set 'cityscapes' needs root: the folder that holds leftImg8bit/ and gtFine/ "
                         "(--data-root)")
    return CityscapesSegmentation(root, split=split, transform=transform, **kwargs)


@register_dataset("mpii")
def _mpii(split: str, transform: Optional[Callable] = None, root: str = "", **kwargs: Any) -> Dataset:
    """MPII under ``root`` (``annot/{split}.json``, ``images/``); crops and heatmaps are its own."""
    if transform is not None:
        raise ValueError("data set 'mpii' makes its own crops and heatmaps; give its options (image_size, sigma, "
                         "rotation, scale_factor, flip) instead of a transform")
    if not root:
        raise ValueError("data set 'mpii' needs root: the folder that holds annot/ and images/ (--data-root)")
    return MPIIDataset(root, split=split, **kwargs)
