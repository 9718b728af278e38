"""MPII data set and PCKh evaluation (the HRNet pose code's conventions), on a tiny MPII tree."""
import json
import math
import random
import re
import warnings

import numpy as np
import pytest
import scipy.io
import scipy.ndimage
import torch
from PIL import Image
from torch.utils.data import default_collate

from anytimeify.data import DataFileError, IMAGENET_MEAN, IMAGENET_STD
from anytimeify.data.mpii import MPII_FLIP_PAIRS, MPII_JOINTS, MPIIDataset, crop_affine
from anytimeify.metrics import MPIIPCKh, final_predictions, flip_back, flip_test_average, mpii_pckh
from anytimeify.train.losses import HeatmapMSELoss

# the joint names of the MPII ground truth file (annot/gt_valid.mat)
MAT_NAMES = ["rank", "rkne", "rhip", "lhip", "lkne", "lank", "pelv", "thrx", "neck", "head", "rwri", "relb",
             "rsho", "lsho", "lelb", "lwri"]
KEYS = {"heatmaps", "weights", "center", "scale", "rotation", "index"}

BODY = [(120, 200), (125, 170), (130, 140), (170, 140), (175, 170), (180, 200), (150, 140), (150, 90), (150, 75),
        (150, 50), (100, 130), (110, 110), (130, 85), (170, 85), (190, 110), (210, 130)]


def _record(image, center, scale, joints, vis):
    return {"image": image, "center": list(center), "scale": scale, "joints": [list(j) for j in joints],
            "joints_vis": list(vis)}


VALID = [
    # 320 x 240, crop of 250 px (1.024 crop pixels per image pixel); lank invisible, lwri out of the crop
    _record("v0.jpg", (160, 100), 1.0, BODY[:15] + [(-20, 130)], [1] * 5 + [0] + [1] * 10),
    # 300 x 260, crop of exactly 256 px: the crop is a pure translation by (149 - 128, 125 - 128); relb invisible
    _record("v1.jpg", (150, 110.64), 1.024, [(x - 10, y + 20) for x, y in BODY], [1] * 11 + [0] + [1] * 4),
    # 360 x 300, crop of 225 px; pelvis invisible
    _record("v2.jpg", (200, 140), 0.9, [(x + 40, y + 30) for x, y in BODY], [1] * 6 + [0] + [1] * 9),
]
SIZES = {"v0.jpg": (320, 240), "v1.jpg": (300, 260), "v2.jpg": (360, 300), "t0.jpg": (280, 240), "t1.jpg": (300, 250)}
TRAIN = [
    _record("t0.jpg", (140, 100), 0.95, [(x - 10, y) for x, y in BODY], [1] * 16),
    _record("t1.jpg", (150, 110), 1.05, BODY, [1] * 14 + [0, 1]),
]


def _write_image(path, width, height, seed):
    rng = np.random.default_rng(seed)
    pixels = (rng.random((height // 8 + 1, width // 8 + 1, 3)) * 255).astype(np.uint8)
    pixels = np.kron(pixels, np.ones((8, 8, 1), dtype=np.uint8))[:height, :width]  # 8x8 blocks + noise
    noise = rng.integers(0, 40, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels // 2 + noise).save(path, quality=95)


def _mat_names(names=MAT_NAMES):
    cells = np.empty((1, len(names)), dtype=object)
    for i, name in enumerate(names):
        cells[0, i] = name
    return cells


def _write_gt(path, pos_gt_src, jnt_missing, headboxes_src, drop=()):
    content = {"dataset_joints": _mat_names(), "jnt_missing": np.asarray(jnt_missing, dtype=np.float64),
               "pos_gt_src": np.asarray(pos_gt_src, dtype=np.float64),
               "headboxes_src": np.asarray(headboxes_src, dtype=np.float64)}
    scipy.io.savemat(str(path), {k: v for k, v in content.items() if k not in drop})
    return path


@pytest.fixture(scope="module")
def mpii_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mpii")
    (root / "annot").mkdir()
    (root / "images").mkdir()
    for seed, (name, (width, height)) in enumerate(SIZES.items()):
        _write_image(root / "images" / name, width, height, seed)
    (root / "annot" / "valid.json").write_text(json.dumps(VALID))
    (root / "annot" / "train.json").write_text(json.dumps(TRAIN))
    (root / "annot" / "test.json").write_text(json.dumps([{k: r[k] for k in ("image", "center", "scale")}
                                                          for r in VALID]))
    joints = np.array([r["joints"] for r in VALID], dtype=np.float64)  # (N, 16, 2), 1-based
    vis = np.array([r["joints_vis"] for r in VALID], dtype=np.float64)
    head = joints[:, 9]
    boxes = np.stack([head - [15, 20], head + [15, 20]])  # (2, N, 2): head size 0.6 * 50 = 30 px
    _write_gt(root / "annot" / "gt_valid.mat", joints.transpose(1, 2, 0), (1 - vis).T, boxes.transpose(0, 2, 1))
    return root


def _crop_geometry(record):
    """Centre (0-based), scale and crop pixels per image pixel of a record, evaluation mode, by hand."""
    cx, cy = record["center"]
    s = record["scale"]
    centre = np.array([cx - 1, cy + 15 * s - 1])
    return centre, 1.25 * s, 256 / (1.25 * s * 200)


def _to_crop(record, point0):
    """A 0-based image point in crop pixels (no rotation, no flip)."""
    centre, _, k = _crop_geometry(record)
    return (np.asarray(point0, dtype=np.float64) - centre) * k + 128


def _denormalise(image):
    mean = torch.tensor(IMAGENET_MEAN).reshape(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).reshape(3, 1, 1)
    return ((image * std + mean) * 255).round().numpy()


def _decoded(root, name):
    return np.asarray(Image.open(root / "images" / name).convert("RGB"), dtype=np.float64).transpose(2, 0, 1)


# ----------------------------------------------------------------------------------------------
# data set


def test_items_have_the_documented_shapes_and_keys(mpii_root):
    ds = MPIIDataset(mpii_root, "valid")
    assert len(ds) == 3 and not ds.train and "3 records" in repr(ds)
    assert MPIIDataset(mpii_root, "train").train and len(MPIIDataset(mpii_root, "val")) == 3
    assert len(MPII_JOINTS) == 16 and MPII_JOINTS[9] == "head_top"
    image, target = ds[2]
    assert image.shape == (3, 256, 256) and image.dtype == torch.float32
    assert set(target) == KEYS
    assert target["heatmaps"].shape == (16, 64, 64) and target["heatmaps"].dtype == torch.float32
    assert target["weights"].shape == (16,) and target["weights"].dtype == torch.float32
    assert target["center"].shape == (2,) and target["scale"].shape == (2,) and target["rotation"].shape == ()
    assert target["index"].dtype == torch.int64 and int(target["index"]) == 2
    assert int(ds[-1][1]["index"]) == 2
    centre, scale, _ = _crop_geometry(VALID[2])
    assert torch.allclose(target["center"], torch.tensor(centre, dtype=torch.float32))
    assert torch.allclose(target["scale"], torch.tensor([scale, scale], dtype=torch.float32))
    assert float(target["rotation"]) == 0.0
    # the loss consumes the targets: zero for perfect predictions, positive otherwise
    images, targets = default_collate([ds[0], ds[1]])
    loss = HeatmapMSELoss()
    assert float(loss(targets["heatmaps"], targets)) == 0.0
    assert float(loss(torch.zeros_like(targets["heatmaps"]), targets)) > 0


def test_heatmap_peaks_sit_at_the_mapped_joints(mpii_root):
    ds = MPIIDataset(mpii_root, "valid")
    for i, record in enumerate(VALID):
        _, target = ds[i]
        for j, (joint, visible) in enumerate(zip(record["joints"], record["joints_vis"])):
            heatmap, weight = target["heatmaps"][j], float(target["weights"][j])
            x, y = _to_crop(record, np.asarray(joint) - 1) / 4
            if not visible or x < -3 or y < -3:  # invisible, or (lwri of record 0) far outside the crop
                assert weight == 0.0 and float(heatmap.abs().sum()) == 0.0, (i, j)
                continue
            peak = int(heatmap.argmax())
            assert weight == 1.0 and float(heatmap.max()) == 1.0
            assert (peak // 64, peak % 64) == (math.floor(y + 0.5), math.floor(x + 0.5)), (i, j)
            # sigma 2: one heatmap pixel off the peak the Gaussian is exp(-1 / 8)
            assert float(heatmap[peak // 64, peak % 64 + 1]) == pytest.approx(math.exp(-1 / 8), rel=1e-6)
    assert float(ds[0][1]["weights"][15]) == 0.0  # visible but mapped off the heatmap: weight 0


def test_crop_is_the_bilinear_warp_of_the_image(mpii_root):
    ds = MPIIDataset(mpii_root, "valid")
    # record 1: a crop of exactly 256 px is a translation, so the crop equals the decoded pixels
    crop = _denormalise(ds[1][0])
    pixels = _decoded(mpii_root, "v1.jpg")
    centre, _, k = _crop_geometry(VALID[1])
    assert k == pytest.approx(1.0)
    ox, oy = int(round(centre[0])) - 128, int(round(centre[1])) - 128  # crop (0, 0) in the image
    assert (ox, oy) == (21, -3)
    np.testing.assert_array_equal(crop[:, 3:, :256], pixels[:, :253, ox:ox + 256])
    assert (crop[:, :3] == 0).all()  # above the image: zero (black), as cv2.warpAffine pads
    # records 0 and 2: non-integer scales, against an independent bilinear resampling
    for i, name in ((0, "v0.jpg"), (2, "v2.jpg")):
        centre, _, k = _crop_geometry(VALID[i])
        ys, xs = np.mgrid[0:256, 0:256].astype(np.float64)
        coords = [(ys - 128) / k + centre[1], (xs - 128) / k + centre[0]]
        pixels = _decoded(mpii_root, name)
        expected = np.stack([scipy.ndimage.map_coordinates(ch, coords, order=1, mode="grid-constant", cval=0.0)
                             for ch in pixels]).round()
        crop = _denormalise(ds[i][0])
        assert np.abs(crop - expected).max() <= 1.0, name
        assert (np.abs(crop - expected) > 0).mean() < 0.01, name


def test_augmentation_is_seeded_by_torch_only(mpii_root):
    ds = MPIIDataset(mpii_root, "train")
    python_state, numpy_state = random.getstate(), np.random.get_state()
    torch.manual_seed(3)
    first = ds[0]
    torch.manual_seed(3)
    again = ds[0]
    assert torch.equal(first[0], again[0])
    assert all(torch.equal(first[1][k], again[1][k]) for k in KEYS)
    assert random.getstate() == python_state and np.array_equal(np.random.get_state()[1], numpy_state[1])
    torch.manual_seed(4)
    other = ds[0]
    assert not torch.equal(first[0], other[0])
    base = 1.25 * TRAIN[0]["scale"]
    rotations, scales = [], []
    for seed in range(20):
        torch.manual_seed(seed)
        _, target = ds[0]
        rotations.append(float(target["rotation"]))
        scales.append(float(target["scale"][0]) / base)
    assert any(r == 0 for r in rotations) and any(r != 0 for r in rotations)  # rotated with probability 0.6
    assert all(abs(r) <= 60 for r in rotations)
    assert all(0.75 - 1e-6 <= s <= 1.25 + 1e-6 for s in scales) and len(set(scales)) > 10


def test_flip_mirrors_the_crop_and_swaps_left_and_right(mpii_root):
    ds = MPIIDataset(mpii_root, "valid", train=True, rotation=0.0, scale_factor=0.0)
    record, width = VALID[1], SIZES["v1.jpg"][0]
    centre, _, _ = _crop_geometry(record)
    samples = {}
    for seed in range(30):
        torch.manual_seed(seed)
        image, target = ds[1]
        flipped = float(target["center"][0]) != pytest.approx(float(centre[0]))
        samples.setdefault(flipped, (image, target))
    plain, mirrored = samples[False], samples[True]
    assert float(mirrored[1]["center"][0]) == pytest.approx(width - centre[0] - 1)
    # crop of 256 px: the flipped crop's column x is the plain crop's column 256 - x
    np.testing.assert_allclose(mirrored[0][:, :, 1:].numpy(), plain[0][:, :, 1:].flip(-1).numpy(), atol=1e-6)
    # relb (11) is invisible: after the flip its weight belongs to lelb (14)
    assert float(plain[1]["weights"][11]) == 0 and float(plain[1]["weights"][14]) == 1
    assert float(mirrored[1]["weights"][14]) == 0 and float(mirrored[1]["weights"][11]) == 1
    flipped_centre_x = width - centre[0] - 1
    for a, b in MPII_FLIP_PAIRS + ((6, 6), (9, 9)):
        for j, other in ((a, b), (b, a)):
            if not record["joints_vis"][other]:
                continue
            jx, jy = np.asarray(record["joints"][other], dtype=np.float64) - 1
            x = (width - jx - 1 - flipped_centre_x) + 128  # scale 1 crop
            y = (jy - centre[1]) + 128
            peak = int(mirrored[1]["heatmaps"][j].argmax())
            assert (peak // 64, peak % 64) == (math.floor(y / 4 + 0.5), math.floor(x / 4 + 0.5)), (j, other)


def test_test_split_has_no_joints(mpii_root):
    image, target = MPIIDataset(mpii_root, "test")[0]
    assert image.shape == (3, 256, 256)
    assert float(target["weights"].sum()) == 0 and float(target["heatmaps"].sum()) == 0


def test_crop_affine_rotates_about_the_centre():
    centre, scale = np.array([300.0, 200.0]), np.array([1.5, 1.5])
    forward = crop_affine(centre, scale, 30.0, (256, 256))
    inverse = crop_affine(centre, scale, 30.0, (256, 256), inverse=True)
    np.testing.assert_allclose(forward @ [300, 200, 1], [128, 128], atol=1e-3)
    point = forward @ [300, 100, 1]  # 100 px above the centre, scaled by 256 / 300, turned 30 degrees
    k = 256 / 300
    assert np.linalg.norm(point - 128) == pytest.approx(100 * k, rel=1e-5)
    assert abs(point[0] - 128) == pytest.approx(100 * k * math.sin(math.radians(30)), rel=1e-4)
    np.testing.assert_allclose(inverse @ np.append(point, 1), [300, 100], atol=1e-3)


# ----------------------------------------------------------------------------------------------
# predictions back in image coordinates


def _gaussians(points, size=64, sigma=2.0):
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                            indexing="ij")
    maps = [torch.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma ** 2)) for x, y in points]
    return torch.stack(maps).to(torch.float32)


def test_final_predictions_map_heatmap_peaks_back_to_the_joints(mpii_root):
    ds = MPIIDataset(mpii_root, "valid")
    record = VALID[2]
    _, target = ds[2]
    centre, _, k = _crop_geometry(record)
    # heatmap positions a quarter pixel off the grid: argmax + quarter step lands on them exactly
    rng = np.random.default_rng(0)
    points = np.stack([rng.integers(5, 59, 16) + rng.choice([-0.25, 0.25], 16),
                       rng.integers(5, 59, 16) + rng.choice([-0.25, 0.25], 16)], axis=1)
    expected = centre + (points * 4 - 128) / k  # by hand: crop pixels back to 0-based image pixels
    heatmaps = _gaussians(points)[None]
    preds, maxvals = final_predictions(heatmaps, target["center"][None], target["scale"][None])
    assert preds.shape == (1, 16, 2) and preds.dtype == torch.float64 and maxvals.shape == (1, 16)
    assert np.abs(preds[0].numpy() - expected).max() < 0.5
    assert np.abs(preds[0].numpy() - expected).max() < 1e-3  # exact up to float32 centre/scale

    # round trip: the data set's own targets give the joints back to within half a heatmap pixel
    preds, _ = final_predictions(target["heatmaps"][None], target["center"][None], target["scale"][None])
    joints = np.asarray(record["joints"], dtype=np.float64) - 1
    shown = np.asarray(record["joints_vis"]) > 0
    err = np.abs(preds[0].numpy() - joints)[shown]
    assert err.max() <= 2 / k + 1e-3

    # no quarter step next to the border; a heatmap without a positive peak gives the crop's corner
    edge = torch.zeros(2, 1, 64, 64)
    edge[0, 0, 30, 1], edge[0, 0, 30, 2] = 1.0, 0.9
    edge[1, 0] = -1.0
    preds, maxvals = final_predictions(edge, target["center"][None].repeat(2, 1), target["scale"][None].repeat(2, 1))
    np.testing.assert_allclose(preds[0, 0].numpy(), centre + (np.array([1.0, 30.0]) * 4 - 128) / k, atol=1e-3)
    np.testing.assert_allclose(preds[1, 0].numpy(), centre + (np.zeros(2) - 128) / k, atol=1e-3)
    assert float(maxvals[1, 0]) == -1.0


def test_flip_back_and_flip_test_average():
    hm = torch.arange(1.0, 13.0).reshape(1, 2, 2, 3)  # joint 0: 1..6, joint 1: 7..12
    flipped = hm[:, [1, 0]].flip(-1)  # what a network would give for the mirrored input
    assert torch.equal(flip_back(flipped, [(0, 1)]), hm)
    expected = torch.tensor([[[[1.0, 1.5, 2.5], [4.0, 4.5, 5.5]], [[7.0, 7.5, 8.5], [10.0, 10.5, 11.5]]]])
    assert torch.equal(flip_test_average(hm, flipped, [(0, 1)]), expected)
    assert torch.equal(flip_test_average(hm, flipped, [(0, 1)], shift=False), hm)
    x = torch.randn(2, 16, 4, 5)
    back = flip_back(x, MPII_FLIP_PAIRS)
    for a, b in MPII_FLIP_PAIRS:
        assert torch.equal(back[:, a], x[:, b].flip(-1)) and torch.equal(back[:, b], x[:, a].flip(-1))
    assert torch.equal(back[:, 6], x[:, 6].flip(-1)) and torch.equal(back[:, 9], x[:, 9].flip(-1))


# ----------------------------------------------------------------------------------------------
# PCKh


def _pckh_case(tmp_path):
    """Four records with hand-placed errors (in head sizes); returns (predictions, .mat path)."""
    rng = np.random.default_rng(1)
    n = 4
    gt = rng.uniform(100, 500, (16, 2, n))  # 1-based
    diag = np.array([50.0, 100.0, 25.0, 75.0])
    top_left = rng.uniform(50, 400, (2, n))
    boxes = np.stack([top_left, top_left + np.stack([0.6 * diag, 0.8 * diag])])  # (2, 2, N)
    missing = np.zeros((16, n))
    missing[9, 3] = missing[11, 1] = missing[14, 1] = 1
    d = np.zeros((16, n))
    d[9] = [0.499, 0.499, 0.501, 5.0]  # head: rec 3 is far off but missing
    d[13, 0] = 0.501  # lsho
    d[11, 0], d[11, 1] = 0.501, 5.0  # relb: rec 1 missing
    d[10] = 0.2  # rwri: correct at 0.5, wrong at 0.11
    d[15, 0] = 0.105  # lwri: correct at 0.11 (HRNet's "Mean@0.1" threshold), wrong at 0.1
    d[6] = d[7] = 0.8  # pelvis and thorax: all wrong, and not part of the mean
    d[0, 3] = 0.501  # rank
    offset = d[:, None, :] * (0.6 * diag)[None, None, :] * np.array([0.6, 0.8])[None, :, None]
    preds = (gt + offset - 1).transpose(2, 0, 1)  # (N, 16, 2), 0-based
    path = _write_gt(tmp_path / "gt_case.mat", gt, missing, boxes)
    return preds, path, (gt, missing, boxes)


def test_mpii_pckh_hand_computed(tmp_path):
    preds, path, (gt, missing, boxes) = _pckh_case(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = mpii_pckh(preds, path)
    assert set(result) == {"Head", "Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle", "Mean", "Mean@0.1"}
    expected = {"Head": 200 / 3, "Shoulder": (100 + 75) / 2, "Elbow": (200 / 3 + 100) / 2, "Wrist": 100.0,
                "Hip": 100.0, "Knee": 100.0, "Ankle": (75 + 100) / 2,
                "Mean": 100 * 49 / 53,  # 53 counted joints without pelvis/thorax, 4 wrong (with them: 49 / 61)
                "Mean@0.1": 100 * 43 / 53}  # + 2 heads at 0.499 and 4 rwri at 0.2 wrong; lwri at 0.105 right
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-9), key
    # torch input, and a subset of the records (in any order) equals the file holding only them
    sub = mpii_pckh(torch.from_numpy(preds[[2, 0]]), path, indices=[2, 0])
    assert sub["Head"] == pytest.approx(50.0) and sub["Shoulder"] == pytest.approx(75.0)
    only = _write_gt(tmp_path / "gt_sub.mat", gt[..., [2, 0]], missing[:, [2, 0]], boxes[..., [2, 0]])
    assert sub == pytest.approx(mpii_pckh(preds[[2, 0]], only))


def test_mpii_pckh_joint_never_visible(tmp_path):
    preds, _, (gt, missing, boxes) = _pckh_case(tmp_path)
    no_pelvis = missing.copy()
    no_pelvis[6] = 1
    no_head = missing.copy()
    no_head[9] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = mpii_pckh(preds, _write_gt(tmp_path / "a.mat", gt, no_pelvis, boxes))
        headless = mpii_pckh(preds, _write_gt(tmp_path / "b.mat", gt, no_head, boxes))
    assert result["Mean"] == pytest.approx(100 * 49 / 53)  # the pelvis is left out of the mean anyway
    assert math.isnan(headless["Head"]) and math.isnan(headless["Mean"])  # as NumPy gives it, silently
    assert headless["Shoulder"] == pytest.approx(87.5)


def test_mpii_pckh_errors(tmp_path):
    preds, path, (gt, missing, boxes) = _pckh_case(tmp_path)
    no_boxes = _write_gt(tmp_path / "nobox.mat", gt, missing, boxes, drop=("headboxes_src",))
    with pytest.raises(ValueError, match=re.escape(str(no_boxes)) + ".*headboxes_src"):
        mpii_pckh(preds, no_boxes)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "none.mat"))):
        mpii_pckh(preds, tmp_path / "none.mat")
    with pytest.raises(FileNotFoundError, match="none.mat"):
        MPIIPCKh(tmp_path / "none.mat")
    with pytest.raises(ValueError, match=r"\(N, 16, 2\)"):
        mpii_pckh(preds[:3], path)
    with pytest.raises(ValueError, match="indices"):
        mpii_pckh(preds[:1], path, indices=[7])


def test_mpii_pckh_metric_matches_the_function(mpii_root):
    ds = MPIIDataset(mpii_root, "valid")
    gt_path = mpii_root / "annot" / "gt_valid.mat"
    items = [ds[i] for i in range(3)]
    heatmaps = torch.stack([target["heatmaps"] for _, target in items])
    heatmaps[:, [0, 9, 12]] = heatmaps[:, [0, 9, 12]].roll(15, dims=-1)  # 60 crop px off: wrong
    heatmaps[1, 3] = heatmaps[1, 3].roll(1, dims=-1)  # 4 crop px off: still right
    centers = torch.stack([t["center"] for _, t in items])
    scales = torch.stack([t["scale"] for _, t in items])
    expected = mpii_pckh(final_predictions(heatmaps, centers, scales)[0], gt_path)
    assert 0 < expected["Mean"] < 100

    metric = MPIIPCKh(gt_path)
    for batch in ([2, 0], [1, 2]):  # shuffled, record 2 twice (as a DistributedSampler pads)
        metric.update(heatmaps[batch], {"center": centers[batch], "scale": scales[batch],
                                        "index": torch.tensor(batch)})
    result = metric.compute()
    assert result["pckh"] == result["Mean"]
    assert {k: v for k, v in result.items() if k != "pckh"} == pytest.approx(expected)

    metric.reset()
    metric.update(heatmaps[[1]], {"center": centers[[1]], "scale": scales[[1]], "index": torch.tensor([1])})
    part = mpii_pckh(final_predictions(heatmaps[[1]], centers[[1]], scales[[1]])[0], gt_path, indices=[1])
    result = metric.compute()
    assert {k: v for k, v in result.items() if k != "pckh"} == pytest.approx(part, nan_ok=True)


# ----------------------------------------------------------------------------------------------
# errors that name what is wrong


def test_dataset_errors_name_the_file(mpii_root, tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        MPIIDataset(tmp_path / "nowhere")
    (tmp_path / "annot").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "annot" / "valid.json"))):
        MPIIDataset(tmp_path, "valid")
    annot = tmp_path / "annot" / "train.json"
    broken = [dict(TRAIN[0]), {k: v for k, v in TRAIN[1].items() if k != "joints"}]
    annot.write_text(json.dumps(broken))
    with pytest.raises(DataFileError, match=re.escape(str(annot)) + ".*record 1.*'joints'.*missing"):
        MPIIDataset(tmp_path, "train")
    annot.write_text(json.dumps([dict(TRAIN[0], joints=TRAIN[0]["joints"][:15])]))
    with pytest.raises(DataFileError, match=r"record 0.*'joints'.*\(15, 2\)"):
        MPIIDataset(tmp_path, "train")
    annot.write_text(json.dumps([dict(TRAIN[0], image="gone.jpg")]))
    ds = MPIIDataset(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "images" / "gone.jpg"))):
        ds[0]
