"""Training data: per-domain preprocessing, trainable slices, unpaired seeded sampling, the epoch sampler."""

from __future__ import annotations

import re

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle.data import (
    EpochSampler,
    UnpairedSliceDataset,
    cached_volumes,
    foreground_mask,
    slice_augmentation,
    volume_preprocessing,
)
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, Spacingd


def _head(shape=(40, 36, 20), value=100.0, background=0.0, seed=0) -> np.ndarray:
    """An ellipsoidal 'head' filling the middle slices, nothing in the first and last three slices."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = (x / 0.8) ** 2 + (y / 0.8) ** 2 + (z / 0.7) ** 2 <= 1.0
    volume = np.where(inside, value * (1 + 0.3 * x), background) + rng.normal(0, 1.0, shape)
    return volume.astype(np.float32)


def _save(path, array, affine=None) -> str:
    affine = np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


def test_mr_preprocessing_resamples_to_ras_and_zscores_the_foreground(tmp_path):
    # LPS-like storage (x and y flipped) must come out RAS
    affine = np.diag([-2.0, -2.0, 3.0, 1.0])
    path = _save(tmp_path / "mr.nii.gz", _head(), affine)
    out = volume_preprocessing("image", "MR", pixdim=(4.0, 4.0, 3.0), slice_keys="image")({"image": path})
    image = out["image"]
    assert image.shape == (1, 20, 18, 20)
    np.testing.assert_allclose(np.diag(image.affine.numpy())[:3], [4.0, 4.0, 3.0])  # RAS: positive diagonal
    raw = Compose(
        [
            LoadImaged("image"),
            EnsureChannelFirstd("image"),
            Orientationd("image", "RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        ]
    )
    raw = Spacingd("image", pixdim=(4.0, 4.0, 3.0))(raw({"image": path}))["image"]
    raw_mask = foreground_mask(raw, "MR")
    values = image[raw_mask]
    assert abs(float(values.mean())) < 1e-4 and abs(float(values.std()) - 1.0) < 1e-3
    assert image.meta["zscore_std"] > 1.0


def test_ct_preprocessing_maps_the_hu_window_to_unit_range(tmp_path):
    volume = np.full((8, 8, 6), -1000.0, dtype=np.float32)
    volume[2:6, 2:6, 1:5] = 500.0
    volume[3, 3, 2] = 3000.0  # above the window: clipped
    path = _save(tmp_path / "ct.nii.gz", volume, np.eye(4))
    image = volume_preprocessing("image", "CT", pixdim=(1.0, 1.0, 1.0), hu_window=(-1000, 2000))({"image": path})[
        "image"
    ]
    assert float(image.min()) == pytest.approx(-1.0)
    assert float(image.max()) == pytest.approx(1.0)
    assert float(image[0, 2, 2, 1]) == pytest.approx(0.0)  # 500 HU is the middle of [-1000, 2000]


def test_trainable_slices_are_those_with_enough_foreground(tmp_path):
    path = _save(tmp_path / "mr.nii.gz", _head(shape=(32, 32, 20)), np.eye(4))
    out = volume_preprocessing("image", "MR", pixdim=(1.0, 1.0, 1.0), slice_keys="image", min_foreground_ratio=0.5)(
        {"image": path}
    )
    slices = out["image_slices"].tolist()
    assert slices == list(range(slices[0], slices[-1] + 1))  # one contiguous block around the middle
    assert 0 < slices[0] and slices[-1] < 19 and 9 in slices


def _root_message(error: BaseException) -> str:
    """MONAI's Compose wraps a transform's error ("applying transform ..."); the transform's own is the cause."""
    while error.__cause__ is not None:
        error = error.__cause__
    return str(error)


@pytest.mark.parametrize(
    "name,array,expected",
    [
        ("flat.nii.gz", np.ones((16, 16), dtype=np.float32), r"flat\.nii\.gz: expected a 3-D volume"),
        ("two.nii.gz", np.stack([_head(), _head()], axis=-1), r"two\.nii\.gz: has 2 channels, the networks expect 1"),
        ("empty.nii.gz", np.zeros((16, 16, 8), dtype=np.float32), r"empty\.nii\.gz: no foreground voxels"),
    ],
)
def test_unusable_volumes_are_named_with_their_problem(tmp_path, name, array, expected):
    path = _save(tmp_path / name, array, np.eye(4))
    with pytest.raises(RuntimeError) as caught:
        volume_preprocessing("image", "MR", pixdim=(1.0, 1.0, 1.0), slice_keys="image")({"image": path})
    assert re.search(expected, _root_message(caught.value))


def _volumes(values: list[float]) -> list[dict]:
    return [{"image": torch.full((1, 8, 8, 5), value), "image_slices": torch.tensor([1, 2, 3])} for value in values]


def test_samples_are_a_function_of_the_id_and_domains_are_drawn_independently():
    dataset = UnpairedSliceDataset(
        _volumes([0.0, 1.0, 2.0]), _volumes([10.0, 11.0, 12.0]), Compose([]), Compose([]), samples_per_epoch=7, seed=3
    )
    first, again = dataset[123], dataset[123]
    torch.testing.assert_close(first["A"], again["A"])
    torch.testing.assert_close(first["B"], again["B"])
    pairs = [(int(dataset[i]["A"][0, 0, 0]), int(dataset[i]["B"][0, 0, 0]) - 10) for i in range(300)]
    same = sum(a == b for a, b in pairs) / len(pairs)
    assert 0.2 < same < 0.5  # independent choice among 3 volumes: 1/3 of the pairs coincide
    assert {a for a, _ in pairs} == {0, 1, 2} and {b for _, b in pairs} == {0, 1, 2}


def test_augmented_samples_have_the_training_size_and_differ_by_id(tmp_path):
    paths = [{"image": _save(tmp_path / f"mr{i}.nii.gz", _head(seed=i))} for i in range(2)]
    volumes = cached_volumes(paths, volume_preprocessing("image", "MR", slice_keys="image"), progress=False)
    dataset = UnpairedSliceDataset(
        volumes, volumes, slice_augmentation(spatial_size=(48, 40)), slice_augmentation(spatial_size=(48, 40))
    )
    sample = dataset[0]
    assert sample["A"].shape == sample["B"].shape == (1, 48, 40)
    assert sample["A"].dtype == torch.float32
    assert not torch.equal(dataset[0]["A"], dataset[1]["A"])
    torch.testing.assert_close(dataset[5]["A"], dataset[5]["A"])


def test_an_empty_domain_list_is_refused():
    with pytest.raises(ValueError, match="training list of domain B is empty"):
        UnpairedSliceDataset(_volumes([0.0]), [], Compose([]), Compose([]))


def test_epoch_sampler_gives_each_epoch_its_own_ids_and_splits_them_across_ranks():
    dataset = UnpairedSliceDataset(_volumes([0.0]), _volumes([1.0]), Compose([]), Compose([]), samples_per_epoch=6)
    sampler = EpochSampler(dataset)
    assert list(sampler) == [0, 1, 2, 3, 4, 5]
    sampler.set_epoch(3)
    assert list(sampler) == [18, 19, 20, 21, 22, 23]
    ranks = [EpochSampler(dataset, num_replicas=2, rank=r) for r in (0, 1)]
    for rank_sampler in ranks:
        rank_sampler.set_epoch(1)
    assert sorted(list(ranks[0]) + list(ranks[1])) == list(range(6, 12))
    assert not set(ranks[0]) & set(ranks[1])


def test_samples_are_plain_tensors_without_metadata(tmp_path):
    paths = [{"image": _save(tmp_path / "mr.nii.gz", _head())}]
    volumes = cached_volumes(paths, volume_preprocessing("image", "MR", slice_keys="image"), progress=False)
    sample = UnpairedSliceDataset(volumes, volumes, slice_augmentation(), slice_augmentation())[0]
    assert type(sample["A"]) is torch.Tensor and type(sample["B"]) is torch.Tensor
