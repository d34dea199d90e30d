"""Training data of DicycleGAN: per-domain volume preprocessing and, per sample, a random axial slice of each
domain; samples are deterministic in ``(seed, sample id)``, independent of resuming, loader workers and ranks."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import monai.transforms as mt
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import CacheDataset
from monai.transforms import Compose, MapTransform
from monai.utils import convert_to_tensor
from torch.utils.data import Dataset, DistributedSampler

__all__ = ["DOMAIN_KINDS", "AxialForegroundSlicesd", "EpochSampler", "ForegroundZScored", "PairedSliceDataset"]
__all__ += ["UnpairedSliceDataset", "cached_volumes", "foreground_mask", "slice_augmentation", "volume_preprocessing"]

DOMAIN_KINDS = ("MR", "CT")
CT_FOREGROUND_HU = -500.0  # above air and lung, below fat: the head (and bed) in CT
MR_FOREGROUND_FRACTION = 0.1  # of the 99th percentile: above background noise, below CSF on every contrast


def _check_kind(kind: str) -> str:
    if kind not in DOMAIN_KINDS:
        raise ValueError(f"domain kind must be one of {DOMAIN_KINDS}, got {kind!r}.")
    return kind


def _name(image: Any, key: Hashable) -> str:
    return str(getattr(image, "meta", {}).get("filename_or_obj", key))


def foreground_mask(image: torch.Tensor, kind: str) -> torch.Tensor:
    """Boolean foreground (head) mask of ``image`` in its own units: ``kind`` ``"MR"``: above 10% of the 99th
    percentile; ``"CT"``: above -500 HU."""
    image = torch.as_tensor(image)
    if _check_kind(kind) == "CT":
        return image > CT_FOREGROUND_HU
    high = torch.quantile(image.float().flatten()[:: max(1, image.numel() // 1_000_000)], 0.99)
    return image > MR_FOREGROUND_FRACTION * high


class ForegroundZScored(MapTransform):
    """z-score MR volumes with the mean and std of their :func:`foreground_mask` (kept in a MetaTensor's metadata
    as ``zscore_mean``, ``zscore_std``).

    Raises:
        ValueError: if a volume has fewer than two foreground voxels.
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


class AxialForegroundSlicesd(MapTransform):
    """Add ``"<key>_slices"``: the axial slices (last spatial axis, RAS) whose foreground area is at least
    ``min_ratio`` times the volume's largest (run before intensity normalisation).

    Args:
        keys, allow_missing_keys: keys of the (channel-first) volumes, and whether to skip missing keys.
        kind, expected_channels: ``"MR"`` or ``"CT"`` (see :func:`foreground_mask`); channels every volume has.

    Raises:
        ValueError: if a volume is not 3-D, has another number of channels, or has no foreground.
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
        self.kind, self.min_ratio, self.expected_channels = _check_kind(kind), min_ratio, expected_channels

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image, src = d[key], _name(d[key], key)
            if image.ndim != 4:
                raise ValueError(f"{src}: expected a 3-D volume, got shape {tuple(image.shape[1:])}.")
            if image.shape[0] != self.expected_channels:
                raise ValueError(f"{src}: has {image.shape[0]} channels, the networks expect {self.expected_channels}.")
            area = foreground_mask(image, self.kind).any(dim=0).sum(dim=(0, 1))  # per axial slice
            if int(area.max()) == 0:
                raise ValueError(f"{src}: no foreground voxels (empty volume).")
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
    """Deterministic preprocessing of one domain's volumes: load (NIfTI, NRRD, MHA, DICOM), channel first, RAS, bilinear
    resampling to ``pixdim``, then MR: :class:`ForegroundZScored`; CT: ``hu_window`` (HU) mapped to [-1, 1], clipped.

    Args:
        keys, kind: keys of the volumes of this domain, and its kind: ``"MR"`` or ``"CT"``.
        pixdim: voxel size in mm (paper: 1.8 mm isotropic for brain, 1.56 x 1.56 x 5 for abdomen).
        slice_keys, min_foreground_ratio, in_channels: keys (training only), ``min_ratio`` and ``expected_channels``
            of :class:`AxialForegroundSlicesd`.
    """
    kind = _check_kind(kind)
    steps: list = [mt.LoadImaged(keys, image_only=True), mt.EnsureChannelFirstd(keys)]
    steps.append(mt.Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))))
    steps.append(mt.Spacingd(keys, pixdim=pixdim, mode="bilinear"))
    if slice_keys is not None:
        steps.append(AxialForegroundSlicesd(slice_keys, kind, min_foreground_ratio, in_channels))
    if kind == "MR":
        return Compose([*steps, ForegroundZScored(keys)])
    low, high = hu_window
    return Compose([*steps, mt.ScaleIntensityRanged(keys, a_min=low, a_max=high, b_min=-1.0, b_max=1.0, clip=True)])


def slice_augmentation(
    keys: KeysCollection = "image",
    spatial_size: Sequence[int] = (128, 128),
    prob: float = 0.5,
    rotate_degrees: float = 15.0,
    shear: float = 0.1,
    translate: float = 10.0,
) -> Compose:
    """Random augmentation of one axial slice: crop or pad to ``spatial_size``, flips, rotation, shear, translation
    (the paper's "aggressive" augmentation); padding and resampling repeat the border.

    Args:
        keys, spatial_size: keys of the (C, X, Y) slices; training size (paper: 128 x 128 brain, 192 x 192 abdomen).
        prob: probability of each flip and of the affine augmentation.
        rotate_degrees, shear, translate: largest rotation (degrees), shear factor and translation (pixels).
    """
    options = {"prob": prob, "rotate_range": (np.deg2rad(rotate_degrees),), "shear_range": (shear, shear)}
    affine = mt.RandAffined(keys, translate_range=(translate,) * 2, mode="bilinear", padding_mode="border", **options)
    flips = [mt.RandFlipd(keys, prob=prob, spatial_axis=axis) for axis in (0, 1)]
    return Compose([mt.ResizeWithPadOrCropd(keys, spatial_size=spatial_size, mode="edge"), *flips, affine])


def _plain(slices: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    # plain tensors: metadata of augmented slices has no use in training and must not reach checkpoints
    return {key: convert_to_tensor(value, torch.float32, track_meta=False) for key, value in slices.items()}


class UnpairedSliceDataset(Dataset):
    """Unpaired samples ``{"A": slice of domain A, "B": slice of domain B}``: sample ``sample_id`` (integer >= 0) draws
    per domain a volume, a trainable slice and the augmentation's random state with a ``(seed, sample_id)`` generator.

    Args:
        volumes_a, volumes_b: preprocessed volumes of each domain, ``{"image": (C, X, Y, Z), "image_slices": indices}``.
        augmentation_a, augmentation_b: random transforms of a slice ``{"image": (C, X, Y)}`` of each domain.
        samples_per_epoch, seed: the dataset's length and the seed of the sampling.

    Raises:
        ValueError: if a domain has no volume or ``samples_per_epoch < 1``.
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
        self.samples_per_epoch, self.seed = samples_per_epoch, seed

    def __len__(self) -> int:
        return self.samples_per_epoch

    def _draw(self, rng: np.random.Generator, domain: str) -> tuple[torch.Tensor, int, int, int]:
        """One augmented slice of ``domain``, its volume index, axial slice index and augmentation seed."""
        volumes, augmentation = self.domains[domain]
        index = int(rng.integers(len(volumes)))
        slices = volumes[index]["image_slices"]
        z = int(slices[int(rng.integers(len(slices)))])
        seed = int(rng.integers(2**31))
        return self._slice(volumes[index], z, augmentation, seed), index, z, seed

    @staticmethod
    def _slice(volume: Mapping[str, Any], z: int, augmentation: Compose, seed: int) -> torch.Tensor:
        image = torch.as_tensor(volume["image"]).as_subclass(torch.Tensor)  # no MetaTensor overhead per slice
        augmentation.set_random_state(seed=seed)
        return augmentation({"image": image[..., z]})["image"]

    def __getitem__(self, sample_id: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng((self.seed, int(sample_id)))
        return _plain({domain: self._draw(rng, domain)[0] for domain in "AB"})


class PairedSliceDataset(UnpairedSliceDataset):
    """Samples ``{"A": x_A, "B": x_B, "B_paired": y_B}`` of the misaligned-pairs mode: ``A`` (from the pairs) and ``B``
    drawn as by :class:`UnpairedSliceDataset`; ``B_paired``: the same slice of the pair's domain-B volume (same grid,
    no registration) with ``A``'s augmentation state (``augmentation_b`` must draw like ``augmentation_a``).

    Args:
        pairs_a, pairs_b: preprocessed domain-A (with ``image_slices``) and domain-B volumes of the pairs, in order.
        volumes_b, augmentation_a, augmentation_b, samples_per_epoch, seed: as for :class:`UnpairedSliceDataset`.

    Raises:
        ValueError: as :class:`UnpairedSliceDataset`, or if the pair lists differ in length or a pair in shape.
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
        a, index, z, seed = self._draw(rng, "A")
        b = self._draw(rng, "B")[0]
        return _plain({"A": a, "B": b, "B_paired": self._slice(self.pairs_b[index], z, self.domains["B"][1], seed)})


class EpochSampler(DistributedSampler):
    """Sample ids ``epoch * N .. epoch * N + N - 1`` of a dataset of length N, split across ranks (MONAI workflows
    call :meth:`set_epoch` every epoch).

    Args:
        dataset, num_replicas, rank: the dataset; ranks and this rank (default: from ``torch.distributed``, else 1, 0).
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
    """All volumes of one domain (``data``: datalist entries ``{"image": path}``) preprocessed by ``transform`` (its
    :func:`volume_preprocessing`) in a ``CacheDataset`` shared read-only by the loader workers, built by
    ``num_workers`` threads, with a progress bar if ``progress``."""
    return CacheDataset(
        data, transform, cache_rate=1.0, num_workers=num_workers or None, progress=progress, copy_cache=False
    )
