"""The MPII human-pose data set, prepared as the HRNet pose code prepares it.

On disk (HRNet pose's layout)::

    root/annot/train.json, valid.json, trainval.json, test.json, gt_valid.mat
    root/images/*.jpg

Each annotation file is a JSON list of person records ``{"image", "center": [x, y], "scale",
"joints": 16 x [x, y], "joints_vis": 16 x 0/1}`` (test records have no joints); coordinates are
MATLAB's, 1-based, and ``scale`` is the person's size in units of 200 pixels.

An item is the person-centred crop the network sees and its heatmap targets, made exactly as
the HRNet pose code makes them: the centre is moved down by ``15 * scale`` pixels and the scale
enlarged by 1.25 (so that limbs are not cut off), both converted to 0-based pixels; training
draws a scale factor ``clip(1 + 0.25 * N(0, 1), 0.75, 1.25)``, with probability 0.6 a rotation
``clip(30 * N(0, 1), -60, 60)`` degrees, and with probability 0.5 a horizontal flip that swaps
left and right joints; one affine transform maps the crop to 256 x 256 (bilinear, zero outside
the image) and the joints into it; each visible joint gets an unnormalised Gaussian (sigma 2
heatmap pixels, peak 1) on the 64 x 64 heatmap at its rounded position, and a target weight of
0 when it is not visible or its Gaussian lies entirely outside the heatmap.

Two things differ from the HRNet pose code by necessity:

* The crop is resampled with ``torch.nn.functional.grid_sample`` (bilinear, zero padding),
  not with OpenCV, which this package does not depend on. Output pixel ``(x, y)`` reads the
  input at the inverse transform of ``(x, y)``, pixel centres at integer coordinates, as
  ``cv2.warpAffine`` does; the result is rounded to whole grey levels as OpenCV's ``uint8``
  output is. OpenCV interpolates with weights quantised to 1/32 pixel, so a pixel may differ
  from OpenCV's by a grey level.
* Random numbers come from torch's global generator (HRNet pose draws from NumPy's and
  Python's), so that seeding a sample through torch fixes its augmentation
  (:class:`anytimeify.data.SeededSamples`). The draws happen in the HRNet pose order.

The half-body augmentation of the HRNet pose code is not implemented: its MPII recipe turns it
off (``PROB_HALF_BODY: -1``).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .folder import DataFileError, read_image
from .transforms import IMAGENET_MEAN, IMAGENET_STD, _size

__all__ = ["MPIIDataset", "MPII_JOINTS", "MPII_FLIP_PAIRS", "crop_affine"]

MPII_JOINTS: Tuple[str, ...] = (
    "rank", "rkne", "rhip", "lhip", "lkne", "lank", "pelv", "thrx", "upper_neck", "head_top",
    "rwri", "relb", "rsho", "lsho", "lelb", "lwri",
)
"""The 16 MPII joints, in the order of the annotations and of the network's heatmaps."""

MPII_FLIP_PAIRS: Tuple[Tuple[int, int], ...] = ((0, 5), (1, 4), (2, 3), (10, 15), (11, 14), (12, 13))
"""Left/right joint pairs that swap under a horizontal flip."""

PIXEL_STD = 200.0
"""MPII scales are person sizes in units of this many pixels."""

#: split name -> annotation file stem (``val`` is an alias of ``valid``)
SPLIT_FILES = {"train": "train", "valid": "valid", "val": "valid", "trainval": "trainval", "test": "test"}


def crop_affine(center: Sequence[float], scale: Union[float, Sequence[float]], rotation: float,
                output_size: Sequence[int], *, inverse: bool = False) -> np.ndarray:
    """The ``(2, 3)`` affine matrix that maps a person's box to the network's crop.

    The box is centred on ``center`` and ``scale[0] * 200`` pixels wide; it is rotated by
    ``rotation`` degrees and scaled uniformly so that its width fills the output width (HRNet
    pose's ``get_affine_transform``: three point pairs in float32, solved in float64 as OpenCV's
    ``getAffineTransform`` does).

    Args:
        center: ``(x, y)`` of the box centre, 0-based pixels.
        scale: box size in units of 200 pixels, a number or ``(sx, sy)`` (only ``sx`` is used).
        rotation: degrees.
        output_size: ``(H, W)`` of the crop.
        inverse: return the map from the crop back to the image instead.

    Returns:
        float64 ``(2, 3)`` matrix ``M``: a point ``p`` maps to ``M @ (x, y, 1)``.
    """
    out_h, out_w = (float(v) for v in output_size)
    scale_arr = np.asarray(scale, dtype=np.float64).reshape(-1)
    src_w = float(scale_arr[0]) * PIXEL_STD
    rot_rad = math.pi * float(rotation) / 180.0
    sn, cs = math.sin(rot_rad), math.cos(rot_rad)
    half = -0.5 * src_w  # the point (0, -src_w / 2) rotated by rot_rad
    src_dir = np.array([-half * sn, half * cs], dtype=np.float64)
    dst_dir = np.array([0.0, out_w * -0.5], dtype=np.float32)
    centre = np.asarray(center, dtype=np.float64).reshape(2)

    src = np.zeros((3, 2), dtype=np.float32)
    dst = np.zeros((3, 2), dtype=np.float32)
    src[0] = centre
    src[1] = centre + src_dir
    dst[0] = [out_w * 0.5, out_h * 0.5]
    dst[1] = np.array([out_w * 0.5, out_h * 0.5]) + dst_dir
    src[2] = _third_point(src[0], src[1])
    dst[2] = _third_point(dst[0], dst[1])
    if inverse:
        src, dst = dst, src
    # solve M @ (x, y, 1) = (x', y') for the three point pairs
    lhs = np.concatenate([src.astype(np.float64), np.ones((3, 1))], axis=1)
    return np.linalg.solve(lhs, dst.astype(np.float64)).T


def _third_point(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    direct = a - b
    return b + np.array([-direct[1], direct[0]], dtype=np.float32)


def _invert_affine(matrix: np.ndarray) -> np.ndarray:
    linear = np.linalg.inv(matrix[:, :2])
    return np.concatenate([linear, -linear @ matrix[:, 2:]], axis=1)


def warp_affine(image: torch.Tensor, matrix: np.ndarray, output_size: Sequence[int]) -> torch.Tensor:
    """``cv2.warpAffine(image, matrix, INTER_LINEAR, BORDER_CONSTANT 0)`` on a ``(C, H, W)`` tensor.

    Output pixel ``(x, y)`` is the input bilinearly interpolated at ``matrix^-1 @ (x, y, 1)``
    (pixel centres at integer coordinates; input pixels beyond the border count as 0).

    Returns:
        float32 ``(C, out_h, out_w)``, in the input's value range (not rounded).
    """
    out_h, out_w = (int(v) for v in output_size)
    in_h, in_w = image.shape[-2:]
    inv = torch.from_numpy(_invert_affine(np.asarray(matrix, dtype=np.float64)))
    ys, xs = torch.meshgrid(torch.arange(out_h, dtype=torch.float64), torch.arange(out_w, dtype=torch.float64),
                            indexing="ij")
    u = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    v = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    # align_corners=False: normalised -1/+1 are the outer edges of the border pixels
    grid = torch.stack([(2 * u + 1) / in_w - 1, (2 * v + 1) / in_h - 1], dim=-1).to(torch.float32)
    out = F.grid_sample(image.to(torch.float32)[None], grid[None], mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return out[0]


class MPIIDataset(Dataset):
    """MPII person crops with Gaussian heatmap targets (HRNet pose's MPII pipeline).

    Args:
        root: the data set folder (``annot/`` and ``images/``).
        split: ``"train"``, ``"valid"`` (or its alias ``"val"``), ``"trainval"`` or ``"test"``
            (no joints: all-zero heatmaps and weights).
        train: augment (random scale, rotation, flip); default: for the training splits
            (``"train"``, ``"trainval"``), not for ``"valid"`` and ``"test"``.
        image_size: ``(H, W)`` of the network input crop.
        heatmap_size: ``(h, w)`` of the heatmap targets.
        sigma: standard deviation of the target Gaussians, heatmap pixels.
        rotation: rotation factor, degrees (drawn as ``clip(rotation * N(0, 1), -2r, 2r)``).
        scale_factor: scale jitter (``clip(1 + scale_factor * N(0, 1), 1 - sf, 1 + sf)``).
        flip: random horizontal flip (probability 0.5) with left/right joints swapped.
        rotation_prob: probability that a training sample is rotated at all.
        mean: per-channel mean of the normalisation of the RGB image in [0, 1].
        std: per-channel standard deviation of that normalisation.

    An item is ``(image, target)``: the normalised float32 crop ``(3, H, W)`` and a dict of
    tensors: ``heatmaps (16, h, w)`` float32, ``weights (16,)`` float32 target weights (1 for a
    visible joint whose Gaussian reaches the heatmap, else 0), ``center (2,)`` and ``scale (2,)``
    float32 of the crop actually taken (0-based pixels and units of 200 pixels, after the 1.25
    enlargement, the random scale and the flip), ``rotation ()`` float32 degrees and ``index ()``
    int64, the record's position in the annotation file (what evaluation matches predictions to
    ground truth by).

    Raises:
        FileNotFoundError: ``root`` or the annotation file does not exist (when constructed), or
            an image does not exist (when its item is read); the message names the path.
        DataFileError: the annotation file is not a JSON list of valid records; the message names
            the file, the record and the field.
    """

    num_joints = len(MPII_JOINTS)
    flip_pairs = MPII_FLIP_PAIRS

    def __init__(self, root: Union[str, os.PathLike], split: str = "train", *, train: Union[bool, None] = None,
                 image_size: Sequence[int] = (256, 256), heatmap_size: Sequence[int] = (64, 64),
                 sigma: float = 2.0, rotation: float = 30.0, scale_factor: float = 0.25, flip: bool = True,
                 rotation_prob: float = 0.6, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD):
        if split not in SPLIT_FILES:
            raise ValueError(f"unknown MPII split {split!r}; choose one of {sorted(SPLIT_FILES)}")
        self.root = Path(root)
        self.split = SPLIT_FILES[split]
        self.train = self.split in ("train", "trainval") if train is None else bool(train)
        self.image_size = _size(image_size, "image_size")
        self.heatmap_size = _size(heatmap_size, "heatmap_size")
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        if not 0 <= scale_factor < 1:
            raise ValueError(f"scale_factor must lie in [0, 1), got {scale_factor}")
        self.sigma = float(sigma)
        self.rotation = float(rotation)
        self.scale_factor = float(scale_factor)
        self.flip = bool(flip)
        self.rotation_prob = float(rotation_prob)
        self.mean = torch.tensor([float(v) for v in mean], dtype=torch.float32).reshape(3, 1, 1)
        self.std = torch.tensor([float(v) for v in std], dtype=torch.float32).reshape(3, 1, 1)

        if not self.root.is_dir():
            raise FileNotFoundError(f"MPII root {str(self.root)!r} does not exist (it should hold annot/ and images/)")
        self.annotation_file = self.root / "annot" / f"{self.split}.json"
        if not self.annotation_file.is_file():
            raise FileNotFoundError(f"MPII annotation file {str(self.annotation_file)!r} does not exist")
        self.image_dir = self.root / "images"
        self._load(self.annotation_file)

    def _load(self, path: Path) -> None:
        try:
            with open(path, encoding="utf-8") as handle:
                records = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataFileError(f"MPII annotation file {str(path)!r} is not valid JSON: {err}") from err
        if not isinstance(records, list) or not records:
            raise DataFileError(f"MPII annotation file {str(path)!r} must hold a non-empty JSON list of records, "
                                f"got {type(records).__name__}" + (" (empty)" if records == [] else ""))
        with_joints = self.split != "test"
        count, nj = len(records), self.num_joints
        self.images: List[str] = []
        self.centers = np.zeros((count, 2), dtype=np.float64)
        self.scales = np.zeros((count, 2), dtype=np.float64)
        self.joints = np.zeros((count, nj, 2), dtype=np.float64)
        self.joints_vis = np.zeros((count, nj), dtype=np.float64)
        for i, rec in enumerate(records):
            def bad(field: str, why: str) -> DataFileError:
                return DataFileError(f"MPII annotation file {str(path)!r}, record {i}: field {field!r} {why}")

            if not isinstance(rec, dict):
                raise DataFileError(f"MPII annotation file {str(path)!r}, record {i}: a record must be a JSON "
                                    f"object, got {type(rec).__name__}")
            required = ("image", "center", "scale") + (("joints", "joints_vis") if with_joints else ())
            for field in required:
                if field not in rec:
                    raise bad(field, "is missing")
            if not isinstance(rec["image"], str) or not rec["image"]:
                raise bad("image", f"must be a file name, got {rec['image']!r}")
            center = _numbers(rec["center"], (2,), bad, "center", "[x, y]")
            scale = _numbers(rec["scale"], (), bad, "scale", "a number")
            if not scale > 0:
                raise bad("scale", f"must be positive, got {float(scale)}")
            c = center.copy()
            s = np.array([float(scale), float(scale)])
            if c[0] != -1:  # enlarge the box a little so that limbs are not cut off
                c[1] = c[1] + 15 * s[1]
                s = s * 1.25
            self.centers[i] = c - 1  # MATLAB's 1-based pixels to 0-based
            self.scales[i] = s
            if with_joints:
                self.joints[i] = _numbers(rec["joints"], (nj, 2), bad, "joints", f"{nj} [x, y] pairs") - 1
                self.joints_vis[i] = _numbers(rec["joints_vis"], (nj,), bad, "joints_vis", f"{nj} numbers (0 or 1)")
            self.images.append(rec["image"])

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, index: int) -> Path:
        """The image file of record ``index``."""
        return self.image_dir / self.images[index]

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        index = range(len(self))[index]  # IndexError beyond the end; negative indices from the end
        image = read_image(self.image_path(index))  # uint8 (3, H, W), RGB
        joints = self.joints[index].copy()
        vis = self.joints_vis[index].copy()
        c = self.centers[index].copy()
        s = self.scales[index].copy()
        r = 0.0
        if self.train:
            sf, rf = self.scale_factor, self.rotation
            s = s * float(np.clip(float(torch.randn((), dtype=torch.float64)) * sf + 1, 1 - sf, 1 + sf))
            if float(torch.rand((), dtype=torch.float64)) <= self.rotation_prob:
                r = float(np.clip(float(torch.randn((), dtype=torch.float64)) * rf, -rf * 2, rf * 2))
            if self.flip and float(torch.rand((), dtype=torch.float64)) <= 0.5:
                width = image.shape[-1]
                image = image.flip(-1)
                joints[:, 0] = width - joints[:, 0] - 1
                order = _flip_permutation(self.num_joints, self.flip_pairs)
                joints, vis = joints[order], vis[order]
                joints = joints * vis[:, None]
                c[0] = width - c[0] - 1

        trans = crop_affine(c, s, r, self.image_size)
        crop = warp_affine(image, trans, self.image_size).round_().clamp_(0, 255)  # OpenCV's uint8 output
        crop = (crop / 255.0 - self.mean) / self.std
        shown = vis > 0
        joints[shown] = joints[shown] @ trans[:, :2].T + trans[:, 2]
        heatmaps, weights = self._targets(joints, vis)
        target = {
            "heatmaps": heatmaps,
            "weights": weights,
            "center": torch.tensor(c, dtype=torch.float32),
            "scale": torch.tensor(s, dtype=torch.float32),
            "rotation": torch.tensor(r, dtype=torch.float32),
            "index": torch.tensor(index, dtype=torch.int64),
        }
        return crop, target

    def _targets(self, joints: np.ndarray, vis: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        """HRNet pose's ``generate_target``: Gaussians at the rounded heatmap positions.

        Positions are rounded with ``int(x + 0.5)`` (towards zero, as Python's ``int`` does), the
        Gaussian window is ``[mu - 3 sigma, mu + 3 sigma]``, and a joint whose window lies
        entirely outside the heatmap gets weight 0.
        """
        (in_h, in_w), (hm_h, hm_w) = self.image_size, self.heatmap_size
        stride = np.array([in_w / hm_w, in_h / hm_h])
        tmp_size = self.sigma * 3
        mu = np.trunc(joints / stride + 0.5)
        ul = np.trunc(mu - tmp_size)
        br = np.trunc(mu + tmp_size + 1)
        weights = vis.astype(np.float32).copy()
        outside = (ul[:, 0] >= hm_w) | (ul[:, 1] >= hm_h) | (br[:, 0] < 0) | (br[:, 1] < 0)
        weights[outside] = 0
        size = 2 * tmp_size + 1
        centre = size // 2  # the Gaussian's peak within its window
        extent = math.ceil(size)  # number of samples of the window (np.arange(0, size))
        ul_t, br_t = torch.from_numpy(ul), torch.from_numpy(br)
        xs = torch.arange(hm_w, dtype=torch.float64)[None, None, :]
        ys = torch.arange(hm_h, dtype=torch.float64)[None, :, None]
        gx, gy = xs - ul_t[:, 0, None, None], ys - ul_t[:, 1, None, None]  # position within the window
        inside = ((gx >= 0) & (gx < extent) & (xs < br_t[:, 0, None, None])
                  & (gy >= 0) & (gy < extent) & (ys < br_t[:, 1, None, None]))
        dx, dy = (gx - centre).to(torch.float32), (gy - centre).to(torch.float32)
        gauss = torch.exp(-(dx ** 2 + dy ** 2) / (2 * self.sigma ** 2))
        drawn = torch.from_numpy(weights > 0.5)[:, None, None]
        heatmaps = torch.where(inside & drawn, gauss, torch.zeros((), dtype=torch.float32))
        return heatmaps.to(torch.float32).contiguous(), torch.from_numpy(weights)

    def __repr__(self) -> str:
        return (f"MPIIDataset(root={str(self.root)!r}, split={self.split!r}, {len(self)} records, "
                f"train={self.train}, image_size={self.image_size}, heatmap_size={self.heatmap_size})")


def _flip_permutation(count: int, flip_pairs: Sequence[Tuple[int, int]]) -> np.ndarray:
    order = np.arange(count)
    for a, b in flip_pairs:
        order[a], order[b] = b, a
    return order


def _numbers(value: Any, shape: Tuple[int, ...], bad, field: str, what: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise bad(field, f"must be {what}, got {value!r}") from None
    if arr.shape != shape:
        raise bad(field, f"must be {what} (shape {shape}), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise bad(field, f"must be finite, got {value!r}")
    return arr
