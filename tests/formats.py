"""Small data sets written in the exact on-disk formats of the real ones (Cityscapes, MPII).

The Cityscapes label PNGs hold *label ids* (0-33, as ``*_gtFine_labelIds.png`` do), drawn from
every id of the official table, so the mapping to train ids and to the ignore label is exercised.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

CITIES = {"train": ("aachen", "bochum"), "val": ("frankfurt",)}


def write_cityscapes(root: Path, size: Tuple[int, int] = (64, 128), per_city: int = 1,
                     splits: Sequence[str] = ("train", "val"), seed: int = 0) -> Dict[str, List[Path]]:
    """Write ``root/leftImg8bit/<split>/<city>/*_leftImg8bit.png`` and the matching
    ``root/gtFine/<split>/<city>/*_gtFine_labelIds.png`` (plus the color and instance files the
    real set has next to them). Returns the label paths per split."""
    rng = np.random.default_rng(seed)
    height, width = size
    labels: Dict[str, List[Path]] = {}
    for split in splits:
        labels[split] = []
        for city in CITIES.get(split, ("berlin",)):
            for k in range(per_city):
                stem = f"{city}_{k:06d}_{19 + k:06d}"
                image_dir = root / "leftImg8bit" / split / city
                label_dir = root / "gtFine" / split / city
                image_dir.mkdir(parents=True, exist_ok=True)
                label_dir.mkdir(parents=True, exist_ok=True)
                image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
                Image.fromarray(image).save(image_dir / f"{stem}_leftImg8bit.png")
                # blocks of label ids 0..33 so that every id of the table occurs
                ids = (np.arange(height)[:, None] // 8 * 7 + np.arange(width)[None, :] // 8 + k) % 34
                label = label_dir / f"{stem}_gtFine_labelIds.png"
                Image.fromarray(ids.astype(np.uint8), mode="L").save(label)
                Image.fromarray(image).save(label_dir / f"{stem}_gtFine_color.png")
                Image.fromarray((ids * 1000).astype(np.uint16)).save(label_dir / f"{stem}_gtFine_instanceIds.png")
                labels[split].append(label)
    return labels


MPII_NAMES = ("rank", "rkne", "rhip", "lhip", "lkne", "lank", "pelv", "thrx", "neck", "head", "rwri", "relb",
              "rsho", "lsho", "lelb", "lwri")


def _person(rng: np.random.Generator, width: int, height: int) -> Dict[str, object]:
    centre = np.array([width / 2 + rng.uniform(-8, 8), height / 2 + rng.uniform(-8, 8)])
    joints = centre + rng.uniform(-30, 30, size=(16, 2))
    visible = (rng.uniform(size=16) > 0.15).astype(int)
    joints[visible == 0] = 0.0  # MPII writes missing joints as 0 (and the HRNet json keeps them)
    return {"center": centre.round(1).tolist(), "scale": float(round(rng.uniform(0.35, 0.5), 3)),
            "joints": joints.round(1).tolist(), "joints_vis": visible.tolist()}


def write_mpii(root: Path, counts: Dict[str, int] = None, size: Tuple[int, int] = (120, 160),
               seed: int = 0) -> Path:
    """Write the HRNet pose code's MPII layout: ``annot/{train,valid}.json``, ``images/*.jpg`` and
    ``annot/gt_valid.mat`` (``dataset_joints``, ``jnt_missing``, ``pos_gt_src``, ``headboxes_src``)."""
    from scipy.io import savemat

    counts = counts or {"train": 4, "valid": 3}
    rng = np.random.default_rng(seed)
    height, width = size
    (root / "annot").mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, count in counts.items():
        records = []
        for i in range(count):
            name = f"{split}_{i:05d}.jpg"
            Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(root / "images" / name)
            record = {"image": name, **_person(rng, width, height)}
            records.append(record)
        (root / "annot" / f"{split}.json").write_text(json.dumps(records))
        if split == "valid":
            joints = np.array([r["joints"] for r in records], dtype=np.float64)  # (N, 16, 2), 1-based like MPII
            visible = np.array([r["joints_vis"] for r in records])
            heads = np.array([[[r["center"][0] - 10, r["center"][1] - 40], [r["center"][0] + 10, r["center"][1] - 15]]
                              for r in records], dtype=np.float64)  # (N, 2 corners, 2)
            names = np.empty((1, 16), dtype=object)
            for j, n in enumerate(MPII_NAMES):
                names[0, j] = n
            savemat(root / "annot" / "gt_valid.mat", {
                "dataset_joints": names,
                "jnt_missing": (1 - visible).T.astype(np.uint8),     # (16, N)
                "pos_gt_src": joints.transpose(1, 2, 0),               # (16, 2, N)
                "headboxes_src": heads.transpose(1, 2, 0),             # (2, 2, N)
            })
    return root
