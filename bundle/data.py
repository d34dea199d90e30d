"""Training data of DicycleGAN: per-domain volume preprocessing and independent random axial slices per domain.

Volumes are preprocessed once (load, channel first, RAS orientation, resampling, intensity normalisation) and
cached; every training sample then draws, independently for domain A and domain B, a random volume and a random
axial slice with enough foreground, crops or pads it to the training size and augments it (flips, rotation,
shear, translation). The two domains are never paired.

The misaligned-pairs mode (beyond the paper, opt-in) adds to each sample the slice of a paired target volume
(:class:`PairedSliceDataset`): same subject, same slice index and the same augmentation as the domain-A slice, but
not necessarily aligned with it (other bed position, other day).

Every sample is a deterministic function of ``(seed, sample id)``, and :class:`EpochSampler` gives epoch ``e`` the
ids ``e * N .. e * N + N - 1``. So the data of an epoch is the same whether training ran straight through or was
resumed, whatever the number of loader workers or distributed ranks.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import CacheDataset
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandAffined,
    RandFlipd,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    Spacingd,
)
from monai.utils import convert_to_tensor
from torch.utils.data import Dataset, DistributedSampler

__all__ = [
    "DOMAIN_KINDS",
    "AxialForegroundSlicesd",
    "EpochSampler",
    "ForegroundZScored",
    "PairedSliceDataset",
    "UnpairedSliceDataset",
    "cached_volumes",
    "foreground_mask",
    "slice_augmentation",
    "volume_preprocessing",
]

DOMAIN_KINDS = ("MR", "CT")
CT_FOREGROUND_HU = -500.0  # above air and lung, below fat: the head (and bed) in CT
MR_FOREGROUND_FRACTION = 0.1  # of the 99th percentile: above background noise, below CSF on every contrast


def _check_kind(kind: str) -> str:
    if kind not in DOMAIN_KINDS:
        raise ValueError(f"domain kind must be one of {DOMAIN_KINDS}, got {kind!r}.")
    return kind


def foreground_mask(image: torch.Tensor, kind: str) -> torch.Tensor:
    """Foreground (head) voxels of an image in its own units.

    Args:
        image: MR signal (arbitrary units) or CT in HU.
        kind: ``"MR"`` (above 10% of the 99th percentile) or ``"CT"`` (above -500 HU).

    Returns:
        Boolean tensor of the image's shape.
    """
    image = torch.as_tensor(image)
    if _check_kind(kind) == "CT":
        return image > CT_FOREGROUND_HU
    high = torch.quantile(image.float().flatten()[:: max(1, image.numel() // 1_000_000)], 0.99)
    return image > MR_FOREGROUND_FRACTION * high


class ForegroundZScored(MapTransform):
    """z-score an MR volume with the mean and standard deviation of its foreground (:func:`foreground_mask`).

    The statistics are recorded in the image's metadata (``zscore_mean``, ``zscore_std``) when it is a MetaTensor.

    Args:
        keys: keys of the images to normalise.
        allow_missing_keys: skip missing keys instead of raising.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            values = torch.as_tensor(image)[foreground_mask(image, "MR")].float()
            if values.numel() < 2:
                raise ValueError(f"{_name(image, key)}: no foreground to normalise (empty or constant volume).")
            mean, std = values.mean(), values.std().clamp_min(1e-6)
            d[key] = (image - mean) / std
            if hasattr(d[key], "meta"):
                d[key].meta["zscore_mean"], d[key].meta["zscore_std"] = float(mean), float(std)
        return d


def _name(image: Any, key: Hashable) -> str:
    meta = getattr(image, "meta", {})
    return str(meta.get("filename_or_obj", key))


class AxialForegroundSlicesd(MapTransform):
    """Record which axial slices (last spatial axis, RAS) hold enough foreground to train on.

    Adds ``"<key>_slices"``: the indices of slices whose foreground area is at least ``min_ratio`` times the largest
    foreground area of the volume. Runs before intensity normalisation, on the image's own units.

    Args:
        keys: keys of the volumes (channel first).
        kind: ``"MR"`` or ``"CT"`` (see :func:`foreground_mask`).
        min_ratio: fraction of the largest slice's foreground area a slice needs.
        expected_channels: number of channels every volume must have.
        allow_missing_keys: skip missing keys instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection,
        kind: str,
        min_ratio: float = 0.25,
        expected_channels: int = 1,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.kind = _check_kind(kind)
        self.min_ratio = min_ratio
        self.expected_channels = expected_channels

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if image.ndim != 4:
                raise ValueError(f"{_name(image, key)}: expected a 3-D volume, got shape {tuple(image.shape[1:])}.")
            if image.shape[0] != self.expected_channels:
                raise ValueError(
                    f"{_name(image, key)}: has {image.shape[0]} channels, the networks expect {self.expected_channels}."
                )
            area = foreground_mask(image, self.kind).any(dim=0).sum(dim=(0, 1))  # per axial slice
            if int(area.max()) == 0:
                raise ValueError(f"{_name(image, key)}: no foreground voxels (empty volume).")
            d[f"{key}_slices"] = torch.nonzero(area >= self.min_ratio * area.max()).flatten()
        return d


def volume_preprocessing(
    keys: KeysCollection,
    kind: str,
    pixdim: Sequence[float] = (1.8, 1.8, 1.8),
    hu_window: Sequence[float] = (-1000.0, 2000.0),
    slice_keys: KeysCollection | None = None,
    min_foreground_ratio: float = 0.25,
    in_channels: int = 1,
) -> Compose:
    """Deterministic preprocessing of one domain's volumes, cached before training.

    ``LoadImaged`` (NIfTI, NRRD, MHA, DICOM series), ``EnsureChannelFirstd``, ``Orientationd`` (RAS), ``Spacingd``
    (bilinear), then the intensity normalisation of the domain: z-score over the foreground for MR
    (:class:`ForegroundZScored`), the HU window linearly mapped to [-1, 1] (clipped) for CT.

    Args:
        keys: keys of the volumes of this domain.
        kind: ``"MR"`` or ``"CT"``.
        pixdim: voxel size in mm after resampling (paper: 1.8 mm isotropic for brain, 1.56 x 1.56 x 5 for abdomen).
        hu_window: CT intensities (HU) mapped to -1 and 1.
        slice_keys: keys for which :class:`AxialForegroundSlicesd` records the trainable slices (training only).
        min_foreground_ratio: see :class:`AxialForegroundSlicesd`.
        in_channels: channels every volume must have.

    Returns:
        The composed transform.
    """
    kind = _check_kind(kind)
    transforms: list = [
        LoadImaged(keys, image_only=True),
        EnsureChannelFirstd(keys),
        Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys, pixdim=pixdim, mode="bilinear"),
    ]
    if slice_keys is not None:
        transforms.append(AxialForegroundSlicesd(slice_keys, kind, min_foreground_ratio, in_channels))
    if kind == "MR":
        transforms.append(ForegroundZScored(keys))
    else:
        low, high = hu_window
        transforms.append(ScaleIntensityRanged(keys, a_min=low, a_max=high, b_min=-1.0, b_max=1.0, clip=True))
    return Compose(transforms)


def slice_augmentation(
    keys: KeysCollection = "image",
    spatial_size: Sequence[int] = (128, 128),
    prob: float = 0.5,
    rotate_degrees: float = 15.0,
    shear: float = 0.1,
    translate: float = 10.0,
) -> Compose:
    """Random augmentation of one axial slice: crop or pad to ``spatial_size``, flips, rotation, shear and
    translation ("aggressive flips, rotations, shearing and translations", paper, Experiments Setup).

    Padding and resampling repeat the border, so the background keeps its intensity in every domain.

    Args:
        keys: keys of the slices (channel first, 2-D).
        spatial_size: training size (paper: 128 x 128 brain, 192 x 192 abdomen).
        prob: probability of each flip and of the affine augmentation.
        rotate_degrees: largest rotation.
        shear: largest shear factor.
        translate: largest translation in pixels.

    Returns:
        The composed random transform.
    """
    return Compose(
        [
            ResizeWithPadOrCropd(keys, spatial_size=spatial_size, mode="edge"),
            RandFlipd(keys, prob=prob, spatial_axis=0),
            RandFlipd(keys, prob=prob, spatial_axis=1),
            RandAffined(
                keys,
                prob=prob,
                rotate_range=(np.deg2rad(rotate_degrees),),
                shear_range=(shear, shear),
                translate_range=(translate, translate),
                mode="bilinear",
                padding_mode="border",
            ),
        ]
    )


class UnpairedSliceDataset(Dataset):
    """Unpaired training samples ``{"A": slice of domain A, "B": slice of domain B}``, drawn independently.

    Sample ``sample_id`` (any non-negative integer; :class:`EpochSampler` supplies them) picks, with a generator
    seeded by ``(seed, sample_id)``, a volume and one of its trainable axial slices in each domain and augments each
    slice with a random state from the same generator: the same id always gives the same sample.

    Args:
        volumes_a: preprocessed volumes of domain A (e.g. a ``CacheDataset`` of :func:`volume_preprocessing` with
            ``slice_keys="image"``), items ``{"image": (C, X, Y, Z), "image_slices": indices}``.
        volumes_b: the same for domain B.
        augmentation_a: random transform of an A slice ``{"image": (C, X, Y)}``.
        augmentation_b: the same for B.
        samples_per_epoch: number of samples in an epoch (the dataset's length).
        seed: seed of the sampling.
    """

    def __init__(
        self,
        volumes_a: Sequence[Mapping[str, Any]],
        volumes_b: Sequence[Mapping[str, Any]],
        augmentation_a: Compose,
        augmentation_b: Compose,
        samples_per_epoch: int = 1000,
        seed: int = 0,
    ) -> None:
        for name, volumes in (("A", volumes_a), ("B", volumes_b)):
            if len(volumes) == 0:
                raise ValueError(f"the training list of domain {name} is empty: nothing to train on.")
        if samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {samples_per_epoch}.")
        self.domains = {"A": (volumes_a, augmentation_a), "B": (volumes_b, augmentation_b)}
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed

    def __len__(self) -> int:
        return self.samples_per_epoch

    def _choose(self, rng: np.random.Generator, domain: str) -> tuple[int, int, int]:
        """(volume index, axial slice index, augmentation seed) of one draw of ``domain``."""
        volumes = self.domains[domain][0]
        index = int(rng.integers(len(volumes)))
        slices = volumes[index]["image_slices"]
        z = int(slices[int(rng.integers(len(slices)))])
        return index, z, int(rng.integers(2**31))

    @staticmethod
    def _slice(volume: Mapping[str, Any], z: int, augmentation: Compose, seed: int) -> torch.Tensor:
        image = torch.as_tensor(volume["image"])
        image = image.as_tensor() if hasattr(image, "as_tensor") else image
        augmentation.set_random_state(seed=seed)
        return augmentation({"image": image[..., z]})["image"]

    def _draw(self, rng: np.random.Generator, domain: str) -> torch.Tensor:
        volumes, augmentation = self.domains[domain]
        index, z, seed = self._choose(rng, domain)
        return self._slice(volumes[index], z, augmentation, seed)

    def __getitem__(self, sample_id: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng((self.seed, int(sample_id)))
        # plain tensors: metadata of augmented slices has no use in training and must not reach checkpoints
        return {domain: convert_to_tensor(self._draw(rng, domain), torch.float32, track_meta=False) for domain in "AB"}


class PairedSliceDataset(UnpairedSliceDataset):
    """Training samples of the misaligned-pairs mode: ``{"A": x_A, "B": x_B, "B_paired": y_B}``.

    ``A`` is drawn from the domain-A volumes of the pairs and ``B`` independently from the (unpaired) domain-B
    volumes, exactly as :class:`UnpairedSliceDataset` draws them (the same ids give the same ``A`` and ``B``);
    ``B_paired`` is the same axial slice index of the pair's domain-B volume, augmented with the same random state
    as ``A`` (``augmentation_b`` must draw its random parameters like ``augmentation_a``, e.g. be the same
    transform), so it differs from ``A``'s geometry only by the pair's own misregistration.

    Both volumes of a pair must share the voxel grid after preprocessing (same shape; e.g. the CT resampled onto the
    MR's grid): the slice index is what pairs them, no registration is done.

    Args:
        pairs_a: preprocessed domain-A volumes of the pairs, items ``{"image": (C, X, Y, Z), "image_slices": ...}``.
        pairs_b: the preprocessed domain-B volumes of the same pairs, in the same order, items ``{"image": ...}``.
        volumes_b: preprocessed domain-B volumes for the unpaired ``B`` draws (as in :class:`UnpairedSliceDataset`).
        augmentation_a: random transform of an A slice ``{"image": (C, X, Y)}``.
        augmentation_b: the same for B slices (the unpaired ones and the paired ones).
        samples_per_epoch: number of samples in an epoch (the dataset's length).
        seed: seed of the sampling.

    Example::

        dataset = PairedSliceDataset(pairs_a, pairs_b, volumes_b, augmentation, augmentation)
        sample = dataset[0]  # {"A": (1, 128, 128), "B": (1, 128, 128), "B_paired": (1, 128, 128)}
    """

    def __init__(
        self,
        pairs_a: Sequence[Mapping[str, Any]],
        pairs_b: Sequence[Mapping[str, Any]],
        volumes_b: Sequence[Mapping[str, Any]],
        augmentation_a: Compose,
        augmentation_b: Compose,
        samples_per_epoch: int = 1000,
        seed: int = 0,
    ) -> None:
        super().__init__(pairs_a, volumes_b, augmentation_a, augmentation_b, samples_per_epoch, seed)
        if len(pairs_b) != len(pairs_a):
            raise ValueError(f"{len(pairs_a)} domain-A volumes of pairs but {len(pairs_b)} domain-B volumes.")
        for index, (item_a, item_b) in enumerate(zip(pairs_a, pairs_b, strict=True)):
            shape_a, shape_b = tuple(item_a["image"].shape[1:]), tuple(item_b["image"].shape[1:])
            if shape_a != shape_b:
                raise ValueError(
                    f"pair {index} ({_name(item_a['image'], 'A')}, {_name(item_b['image'], 'B')}): the volumes have "
                    f"shapes {shape_a} and {shape_b} after preprocessing; a pair must share the voxel grid (resample "
                    "the target onto the source's grid first)."
                )
        self.pairs_b = pairs_b

    def __getitem__(self, sample_id: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng((self.seed, int(sample_id)))
        (pairs_a, augmentation_a), augmentation_b = self.domains["A"], self.domains["B"][1]
        index, z, seed = self._choose(rng, "A")
        slices = {
            "A": self._slice(pairs_a[index], z, augmentation_a, seed),
            "B": self._draw(rng, "B"),
            "B_paired": self._slice(self.pairs_b[index], z, augmentation_b, seed),
        }
        return {key: convert_to_tensor(value, torch.float32, track_meta=False) for key, value in slices.items()}


class EpochSampler(DistributedSampler):
    """Sample ids ``epoch * N .. epoch * N + N - 1`` for :class:`UnpairedSliceDataset`, split across ranks.

    A ``DistributedSampler``, so MONAI workflows call :meth:`set_epoch` at the start of every epoch (also the first
    epoch of a resumed run). Without ``torch.distributed`` it is a single rank.

    Args:
        dataset: the dataset (its length is N).
        num_replicas: number of ranks (default: the distributed world size, or 1).
        rank: this rank (default: the distributed rank, or 0).
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None) -> None:
        if num_replicas is None or rank is None:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            num_replicas = torch.distributed.get_world_size() if distributed else 1
            rank = torch.distributed.get_rank() if distributed else 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)

    def __iter__(self):
        offset = self.epoch * len(self.dataset)
        return (offset + index for index in super().__iter__())


def cached_volumes(
    data: Sequence[Mapping[str, Any]], transform: Compose, num_workers: int = 0, progress: bool = True
) -> CacheDataset:
    """Preprocess and cache all volumes of one domain (the cache is shared, read-only, by the loader workers).

    Args:
        data: datalist entries ``{"image": path}``.
        transform: :func:`volume_preprocessing` of the domain.
        num_workers: threads used to build the cache.
        progress: show a progress bar while caching.

    Returns:
        A ``CacheDataset`` whose items are not copied on access (nothing downstream modifies them in place).
    """
    return CacheDataset(
        data, transform, cache_rate=1.0, num_workers=num_workers or None, progress=progress, copy_cache=False
    )
