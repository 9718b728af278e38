"""Joint image/target augmentation for dense prediction, built on torchvision's ``transforms.v2``.

The geometry (resizing, cropping, flipping, affine warps of images, masks and keypoints) is
torchvision's: ``tv_tensors.Image``, ``tv_tensors.Mask`` and ``tv_tensors.KeyPoints`` travel through
one ``v2.Compose``, and each transform treats each type right (masks resized with nearest
neighbours, padded with the ignore label; keypoints moved with the image). What is added here is
only what v2 does not have: a random rescale by a factor of the image's own size (the recipes'
"random scale 0.5-2.0"), a horizontal flip that also swaps left and right joints, and the
Gaussian heatmap targets of pose estimation.

Every transform draws its randomness from torch's global generator, so a sample's augmentation
is fixed by seeding it (the trainer seeds each sample from the run's seed, the epoch and the
sample's position: see :class:`anytimeify.data.SeededSamples`).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

_logger = logging.getLogger(__name__)

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "RandomScale", "RandomHorizontalFlipJoints", "SegmentationTransform",
    "PoseTransform", "segmentation_transforms", "pose_transforms", "gaussian_heatmaps",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""Per-channel mean of the default normalisation (ImageNet's, RGB in [0, 1])."""
IMAGENET_STD = (0.229, 0.224, 0.225)
"""Per-channel standard deviation of the default normalisation (ImageNet's)."""


class RandomScale(v2.Transform):
    """Resize by a factor drawn uniformly from ``scale`` (of the input's own size).

    Images are resized bilinearly with antialiasing, masks with nearest neighbours, keypoints and
    boxes with the image (torchvision's ``v2.functional.resize`` dispatches by type).

    Args:
        scale: ``(min, max)`` factor, e.g. ``(0.5, 2.0)``.
        step: draw from ``min, min + step, ..., max`` instead of uniformly; the ADP-C reference
            (HRNet-Semantic-Segmentation) draws ``0.5 + k / 10`` for ``k = 0..16``: ``scale=(0.5, 2.1),
            step=0.1``.
    """

    def __init__(self, scale: Sequence[float], step: Optional[float] = None):
        super().__init__()
        low, high = (float(s) for s in scale)
        if not 0 < low <= high:
            raise ValueError(f"scale must be (min, max) with 0 < min <= max, got {tuple(scale)}")
        if step is not None and not float(step) > 0:
            raise ValueError(f"scale step must be > 0 or None, got {step!r}")
        self.scale = (low, high)
        self.step = float(step) if step is not None else None

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        if self.step is not None:
            count = int(round((self.scale[1] - self.scale[0]) / self.step)) + 1
            factor = self.scale[0] + self.step * int(torch.randint(count, ()))
        else:
            factor = self.scale[0] + float(torch.rand(())) * (self.scale[1] - self.scale[0])
        return {"size": [max(1, round(height * factor)), max(1, round(width * factor))]}

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        return self._call_kernel(TF.resize, inpt, size=params["size"], antialias=True)


class RandomHorizontalFlipJoints(v2.Transform):
    """Horizontal flip with probability ``p`` that also swaps left/right joints of keypoints.

    ``v2.RandomHorizontalFlip`` mirrors keypoint coordinates but keeps their order, so a left
    wrist would become a right wrist at the left wrist's index. Here the rows of every
    ``tv_tensors.KeyPoints`` (and of a ``visible`` tensor given under the ``"visible"`` key) are
    permuted by ``flip_pairs`` after mirroring.

    Args:
        flip_pairs: index pairs of joints that swap (e.g. MPII's ``[(0, 5), (1, 4), ...]``).
        p: flip probability.
    """

    def __init__(self, flip_pairs: Sequence[Sequence[int]] = (), p: float = 0.5):
        super().__init__()
        self.flip_pairs = [tuple(int(i) for i in pair) for pair in flip_pairs]
        self.p = float(p)

    def forward(self, *inputs: Any) -> Any:
        sample = inputs if len(inputs) > 1 else inputs[0]
        if float(torch.rand(())) >= self.p:
            return sample
        flipped = v2.RandomHorizontalFlip(p=1.0)(sample)
        return _permute_joints(flipped, self.flip_pairs)


def _joint_permutation(count: int, flip_pairs: Sequence[Tuple[int, int]]) -> torch.Tensor:
    order = torch.arange(count)
    for a, b in flip_pairs:
        if max(a, b) >= count:
            raise ValueError(f"flip pair {(a, b)} names a joint beyond the {count} keypoints")
        order[a], order[b] = b, a
    return order


def _permute_joints(sample: Any, flip_pairs: Sequence[Tuple[int, int]]) -> Any:
    if isinstance(sample, tv_tensors.KeyPoints):
        order = _joint_permutation(sample.shape[-2], flip_pairs)
        return tv_tensors.wrap(sample[..., order, :], like=sample)
    if isinstance(sample, dict):
        out = {k: _permute_joints(v, flip_pairs) for k, v in sample.items()}
        if "visible" in sample and isinstance(sample["visible"], torch.Tensor):
            order = _joint_permutation(sample["visible"].shape[-1], flip_pairs)
            out["visible"] = sample["visible"][..., order]
        return out
    if isinstance(sample, (tuple, list)):
        return type(sample)(_permute_joints(v, flip_pairs) for v in sample)
    return sample


def _to_float_image(image: torch.Tensor) -> torch.Tensor:
    return TF.to_dtype(image, torch.float32, scale=True) if not image.is_floating_point() else image


class SegmentationTransform:
    """Callable ``(image, mask) -> (image, mask)`` for semantic segmentation.

    Returns a normalised float image ``(3, H, W)`` (plain tensor) and an int64 label map ``(H, W)``.
    Build it with :func:`segmentation_transforms`.
    """

    def __init__(self, geometry: v2.Transform, mean: Sequence[float], std: Sequence[float]):
        self.geometry = geometry
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    def __call__(self, image: Any, mask: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        image = image if isinstance(image, tv_tensors.Image) else tv_tensors.Image(image)
        mask = mask if isinstance(mask, tv_tensors.Mask) else tv_tensors.Mask(mask)
        if mask.dim() == 3 and mask.shape[0] == 1:
            mask = tv_tensors.Mask(mask[0])
        image, mask = self.geometry(image, mask)
        image = TF.normalize(_to_float_image(image), self.mean, self.std)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).to(torch.int64)

    def __repr__(self) -> str:
        return f"SegmentationTransform({self.geometry}, mean={self.mean}, std={self.std})"


def segmentation_transforms(train: bool = True, *, crop_size: Optional[Sequence[int]] = None,
                            scale: Optional[Sequence[float]] = (0.5, 2.0), scale_step: Optional[float] = None,
                            flip: bool = True,
                            ignore_index: int = 255, mean: Sequence[float] = IMAGENET_MEAN,
                            std: Sequence[float] = IMAGENET_STD) -> SegmentationTransform:
    """The segmentation pipeline of the paper's recipes (HRNet-Semantic-Segmentation's).

    Training: random rescale by ``scale``, random crop of ``crop_size`` (padded where the image
    is smaller: the image with 0, the labels with ``ignore_index``), horizontal flip, normalise.
    Evaluation (``train=False``): only normalisation (the whole image is evaluated).

    Args:
        train: augment (True) or only normalise (False).
        crop_size: ``(H, W)`` of training crops; None: no crop.
        scale: ``(min, max)`` random rescale factor; None: none.
        scale_step: draw the factor on a grid of this step (see :class:`RandomScale`); None: uniformly.
        flip: random horizontal flip (not for data whose classes are not mirror-symmetric, such
            as digits).
        ignore_index: label of padded pixels.
        mean: per-channel mean of the normalisation of the float image in [0, 1].
        std: per-channel standard deviation of that normalisation.

    Returns:
        A :class:`SegmentationTransform`.
    """
    steps: List[v2.Transform] = []
    if train:
        if scale is not None:
            steps.append(RandomScale(scale, scale_step))
        if crop_size is not None:
            size = _size(crop_size, "crop_size")
            steps.append(v2.RandomCrop(size, pad_if_needed=True,
                                       fill={tv_tensors.Mask: ignore_index, "others": 0}))
        if flip:
            steps.append(v2.RandomHorizontalFlip())
    return SegmentationTransform(v2.Compose(steps) if steps else v2.Identity(), mean, std)


def gaussian_heatmaps(keypoints: torch.Tensor, visible: torch.Tensor, input_size: Sequence[int],
                      heatmap_size: Sequence[int], sigma: float = 2.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gaussian heatmap targets and per-joint target weights (HRNet pose's ``generate_target``).

    Args:
        keypoints: ``(J, 2)`` x, y in input pixels.
        visible: ``(J,)`` 0/1 (or bool) visibility.
        input_size: ``(H, W)`` of the network input.
        heatmap_size: ``(h, w)`` of the heatmaps (a quarter of the input for HRNet).
        sigma: standard deviation in heatmap pixels (2 in the paper's MPII recipe).

    Returns:
        ``heatmaps (J, h, w)`` with peak 1 at each joint, and ``weights (J,)``: 0 for joints that
            are invisible or whose Gaussian lies outside the heatmap, else 1.
    """
    (in_h, in_w), (hm_h, hm_w) = _size(input_size, "input_size"), _size(heatmap_size, "heatmap_size")
    joints = keypoints.to(torch.float32).reshape(-1, 2)
    centres = joints * torch.tensor([hm_w / in_w, hm_h / in_h])
    weights = visible.reshape(-1).to(torch.float32).clone()
    radius = 3 * sigma
    outside = ((centres[:, 0] + radius < 0) | (centres[:, 1] + radius < 0)
               | (centres[:, 0] - radius >= hm_w) | (centres[:, 1] - radius >= hm_h))
    weights[outside] = 0.0
    ys = torch.arange(hm_h, dtype=torch.float32)[None, :, None]
    xs = torch.arange(hm_w, dtype=torch.float32)[None, None, :]
    # HRNet pose rounds the centre to the heatmap grid (``int(x + 0.5)``) before drawing the Gaussian
    cx = torch.floor(centres[:, 0] + 0.5)[:, None, None]
    cy = torch.floor(centres[:, 1] + 0.5)[:, None, None]
    heatmaps = torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma ** 2))
    heatmaps = heatmaps * (weights > 0)[:, None, None]
    return heatmaps, weights


class PoseTransform:
    """Callable ``(image, keypoints, visible) -> (image, {"heatmaps", "weights"})`` for pose.

    Build it with :func:`pose_transforms`.
    """

    def __init__(self, geometry: v2.Transform, input_size: Tuple[int, int], heatmap_size: Tuple[int, int],
                 sigma: float, mean: Sequence[float], std: Sequence[float]):
        self.geometry = geometry
        self.input_size = input_size
        self.heatmap_size = heatmap_size
        self.sigma = float(sigma)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    def __call__(self, image: Any, keypoints: Any, visible: Any) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        image = image if isinstance(image, tv_tensors.Image) else tv_tensors.Image(image)
        if not isinstance(keypoints, tv_tensors.KeyPoints):
            keypoints = tv_tensors.KeyPoints(torch.as_tensor(keypoints, dtype=torch.float32),
                                             canvas_size=tuple(image.shape[-2:]))
        visible = torch.as_tensor(visible, dtype=torch.float32).reshape(-1)
        image, sample = self.geometry(image, {"keypoints": keypoints, "visible": visible})
        image = TF.normalize(_to_float_image(image), self.mean, self.std)
        points = sample["keypoints"].as_subclass(torch.Tensor)
        heatmaps, weights = gaussian_heatmaps(points, sample["visible"], self.input_size, self.heatmap_size,
                                              self.sigma)
        return image.as_subclass(torch.Tensor), {"heatmaps": heatmaps, "weights": weights}


def pose_transforms(train: bool = True, *, input_size: Sequence[int] = (256, 256),
                    heatmap_size: Optional[Sequence[int]] = None, sigma: float = 2.0, rotation: float = 30.0,
                    scale: float = 0.25, flip_pairs: Sequence[Sequence[int]] = (), flip: bool = True,
                    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> PoseTransform:
    """The pose pipeline of the paper's MPII recipe (HRNet pose's), for person-centred crops.

    Training: random rotation within +-``rotation`` degrees and scale within 1 +- ``scale``
    (one ``v2.RandomAffine`` for image and keypoints), horizontal flip with left/right joints
    swapped, resize to ``input_size``; then Gaussian heatmaps at ``heatmap_size`` (default a
    quarter of ``input_size``) and per-joint target weights. Evaluation: resize and heatmaps only.

    Returns:
        A :class:`PoseTransform`.
    """
    size = _size(input_size, "input_size")
    hm_size = _size(heatmap_size, "heatmap_size") if heatmap_size is not None else (size[0] // 4, size[1] // 4)
    steps: List[v2.Transform] = []
    if train:
        steps.append(v2.RandomAffine(degrees=float(rotation), scale=(1 - float(scale), 1 + float(scale))))
        if flip:
            steps.append(RandomHorizontalFlipJoints(flip_pairs))
    steps.append(v2.Resize(list(size), antialias=True))
    return PoseTransform(v2.Compose(steps), size, hm_size, sigma, mean, std)


def _size(value: Any, name: str) -> Tuple[int, int]:
    if isinstance(value, int):
        return value, value
    try:
        height, width = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or (H, W), got {value!r}") from None
    if height <= 0 or width <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return height, width
