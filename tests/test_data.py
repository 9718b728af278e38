"""Data: digit scenes, image/mask folders, transforms.v2 pipelines, the seeded resumable data order."""
import torch
import pytest
from torchvision import tv_tensors

from anytimeify.data import (DataFileError, DigitScenes, EpochSampler, ImageMaskFolder, SeededSamples, create_dataset,
                             digit_split, gaussian_heatmaps, pose_transforms, segmentation_transforms)


def test_digit_split_holds_out_a_quarter_of_each_class_and_never_overlaps():
    from sklearn.datasets import load_digits

    train, val = digit_split("train"), digit_split("val")
    assert len(train) + len(val) == 1797
    assert not set(train.tolist()) & set(val.tolist())
    targets = torch.as_tensor(load_digits().target)
    for digit in range(10):
        members = int((targets == digit).sum())
        assert int((targets[val] == digit).sum()) == round(0.25 * members)
    with pytest.raises(ValueError, match="'train' or 'val'"):
        digit_split("test")


def test_digit_scenes_are_deterministic_labelled_and_use_only_their_split():
    val = DigitScenes("val", length=6, size=(64, 64), seed=3)
    image, mask, used = val.scene(2)
    again, mask_again, _ = DigitScenes("val", length=6, size=(64, 64), seed=3).scene(2)
    assert torch.equal(image, again) and torch.equal(mask, mask_again)
    assert image.shape == (3, 64, 64) and 0 <= image.min() and image.max() <= 1
    assert set(used) <= set(digit_split("val").tolist())
    from sklearn.datasets import load_digits

    targets = load_digits().target
    labels = set(mask.unique().tolist())
    assert labels == {0} | {1 + int(targets[i]) for i in used}  # every pasted digit is labelled with its class
    item_image, item_mask = val[2]
    assert isinstance(item_image, tv_tensors.Image) and isinstance(item_mask, tv_tensors.Mask)
    other_seed, _, _ = DigitScenes("val", length=6, size=(64, 64), seed=4).scene(2)
    assert not torch.equal(image, other_seed)


def test_digit_scenes_reject_impossible_settings():
    with pytest.raises(ValueError, match="digit_size"):
        DigitScenes(size=(32, 32), digit_size=(20, 40))
    with pytest.raises(ValueError, match="length"):
        DigitScenes(length=0)
    with pytest.raises(IndexError):
        DigitScenes(length=2).scene(2)


def test_segmentation_transform_moves_labels_with_the_image_and_pads_with_ignore():
    torch.manual_seed(0)
    image = tv_tensors.Image(torch.rand(3, 20, 30))
    mask = tv_tensors.Mask(torch.zeros(20, 30, dtype=torch.int64))
    mask[:, :10] = 3  # left third is class 3
    transform = segmentation_transforms(True, crop_size=(48, 48), scale=(1.0, 1.0), flip=False, ignore_index=255)
    out_image, out_mask = transform(image, mask)
    assert out_image.shape == (3, 48, 48) and out_mask.shape == (48, 48) and out_mask.dtype == torch.int64
    assert type(out_image) is torch.Tensor and type(out_mask) is torch.Tensor
    assert set(out_mask.unique().tolist()) == {0, 3, 255}  # nearest resampling: no invented classes
    assert int((out_mask == 255).sum()) == 48 * 48 - 20 * 30  # padding of the 20x30 image to 48x48
    # normalised with ImageNet statistics
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    inside = out_mask != 255
    rebuilt = (out_image * std + mean)[:, inside]
    assert rebuilt.min() >= -1e-5 and rebuilt.max() <= 1 + 1e-5


def test_random_scale_resizes_image_and_mask_together():
    torch.manual_seed(1)
    transform = segmentation_transforms(True, scale=(2.0, 2.0), flip=False)
    image, mask = transform(tv_tensors.Image(torch.rand(3, 8, 12)), tv_tensors.Mask(torch.ones(8, 12, dtype=torch.int64)))
    assert image.shape == (3, 16, 24) and mask.shape == (16, 24) and set(mask.unique().tolist()) == {1}


def test_pose_flip_mirrors_keypoints_and_swaps_left_and_right():
    image = torch.rand(3, 64, 64)
    keypoints = torch.tensor([[10.0, 20.0], [50.0, 20.0], [32.0, 40.0]])  # left, right, centre
    visible = torch.tensor([1.0, 1.0, 0.0])
    transform = pose_transforms(True, input_size=(64, 64), rotation=0.0, scale=0.0, flip_pairs=[(0, 1)])
    transform.geometry.transforms[1].p = 1.0  # always flip
    _, target = transform(image, keypoints, visible)
    heatmaps, weights = target["heatmaps"], target["weights"]
    assert heatmaps.shape == (3, 16, 16)
    assert weights.tolist() == [1.0, 1.0, 0.0]
    # joint 0 (left) now sits where the mirrored right joint is: x = 63 - 50 = 13 px -> 3.25 -> cell 3
    peak0 = divmod(int(heatmaps[0].argmax()), 16)
    peak1 = divmod(int(heatmaps[1].argmax()), 16)
    assert peak0 == (5, 3)   # (row, column): y 20 px -> 5
    assert peak1 == (5, 13)  # x = 63 - 10 = 53 px -> 13.25 -> 13
    assert heatmaps[2].abs().sum() == 0  # invisible joint: no target


def test_gaussian_heatmaps_peak_and_drop_joints_outside():
    heatmaps, weights = gaussian_heatmaps(torch.tensor([[8.0, 4.0], [-100.0, 0.0]]), torch.ones(2), (32, 32), (8, 8),
                                          sigma=1.0)
    assert weights.tolist() == [1.0, 0.0]
    assert heatmaps[0, 1, 2] == 1.0  # x 8/4 = 2, y 4/4 = 1
    assert heatmaps[0, 1, 3] == pytest.approx(torch.exp(torch.tensor(-0.5)).item())
    assert heatmaps[1].sum() == 0


def _write_png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)


def test_image_mask_folder_reads_pairs_and_names_missing_or_corrupt_files(tmp_path):
    import numpy as np

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    _write_png(tmp_path / "images" / "a.png", np.full((8, 8, 3), 200, dtype=np.uint8))
    _write_png(tmp_path / "masks" / "a.png", np.full((8, 8), 7, dtype=np.uint8))
    data = ImageMaskFolder(tmp_path)
    image, mask = data[0]
    assert image.shape == (3, 8, 8) and mask.shape == (8, 8) and int(mask[0, 0]) == 7

    (tmp_path / "images" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "masks" / "b.png")):
        ImageMaskFolder(tmp_path)  # an image without its label map
    (tmp_path / "masks" / "b.png").write_bytes(b"not a png at all")
    data = ImageMaskFolder(tmp_path)
    with pytest.raises(DataFileError, match=str(tmp_path / "images" / "b.png")):
        data[1]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageMaskFolder(tmp_path / "nowhere")
    via_registry = create_dataset("folder", split="train", root=str(tmp_path))
    assert len(via_registry) == 2
    with pytest.raises(ValueError, match="unknown data set"):
        create_dataset("cityscapez", split="train")


def test_epoch_sampler_splits_the_global_order_across_ranks_and_resumes():
    data = list(range(10))
    single = list(EpochSampler(data, seed=5, drop_last=True))
    ranks = [list(EpochSampler(data, num_replicas=2, rank=r, seed=5, drop_last=True)) for r in range(2)]
    # the two ranks together see the single process's order, interleaved, with the same sample seeds
    interleaved = [pair for step in zip(*ranks) for pair in step]
    assert interleaved == single
    sampler = EpochSampler(data, seed=5, drop_last=True)
    sampler.set_epoch(1, start=4)
    full = EpochSampler(data, seed=5, drop_last=True)
    full.set_epoch(1)
    assert list(sampler) == list(full)[4:]
    assert [i for i, _ in list(full)] != [i for i, _ in single]  # a new permutation per epoch


def test_seeded_samples_make_augmentation_a_function_of_the_seed():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.rand(2) + i

    data = SeededSamples(Noisy())
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = data[(1, 123)]
    assert torch.equal(torch.get_rng_state(), before)  # the global generator is left as it was
    assert torch.equal(first, data[(1, 123)])
    assert not torch.equal(first, data[(1, 124)])
