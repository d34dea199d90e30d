"""Case pairing of the paired evaluation: which source, ground truth and mask each synthesis is measured on."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from bundle.datalist import load_datalist, read_datalist, synthesis_pair, volume_stem
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, MapTransform, Orientationd, Spacingd

__all__ = ["DIRECTIONS", "PairedVolumesd", "check_same_grid", "mask_preprocessing", "paired_cases", "paired_loader"]
__all__ += ["parse_directions"]

DIRECTIONS = ("A2B", "B2A")


def parse_directions(direction: str) -> list[str]:
    """The synthesis directions of ``direction`` (``"A2B"``, ``"B2A"`` or ``"both"``) as a list; else ValueError."""
    if direction in (*DIRECTIONS, "both"):
        return list(DIRECTIONS) if direction == "both" else [direction]
    raise ValueError(f'direction must be "A2B", "B2A" or "both", got {direction!r}.')


def paired_cases(
    dataset_dir: str | os.PathLike,
    datalist: str | os.PathLike = "datalist.json",
    key: str = "test",
    directions: Sequence[str] = DIRECTIONS,
) -> list[dict[str, Any]]:
    """The items of a paired list (:func:`bundle.datalist.synthesis_pair`) by direction, then entry: ``{"image":
    source, "label": ground truth, "mask", "subject", "direction", "experiment", "source_name", "target_name"}``
    (absolute paths; ``mask`` if the entry has one; ``subject``: the entry's or its ``A``'s stem; names: ``domains``).

    Args:
        dataset_dir, datalist: as for :func:`bundle.datalist.load_datalist`.
        key: the paired list (``"test"`` or ``"validation"``).
        directions: ``"A2B"`` and/or ``"B2A"``.

    Raises:
        KeyError: if the datalist has no such list.
        ValueError: if the list is empty or unpaired, a direction is unknown, or two entries have the same subject.
    """
    entries = load_datalist(dataset_dir, datalist, key)
    if not entries:
        raise ValueError(f"the {key!r} list of datalist {datalist} (in {dataset_dir}) is empty: nothing to evaluate.")
    if unpaired := [index for index, entry in enumerate(entries) if not {"A", "B"} <= set(entry)]:
        raise ValueError(
            f'the {key!r} list of datalist {datalist} is not paired: entries {unpaired[:5]} have no "A" and "B" '
            '(evaluate a paired list such as "test" or "validation"; training lists are unpaired).'
        )
    subjects = [str(entry.get("subject") or volume_stem(entry["A"])) for entry in entries]
    if repeated := sorted({s for s in subjects if subjects.count(s) > 1}):
        raise ValueError(
            f"the {key!r} list of datalist {datalist} names subjects {repeated} more than once; give each entry a "
            'distinct "subject" (it keys the CSV rows and the figures).'
        )
    names = {"A": "A", "B": "B", **read_datalist(dataset_dir, datalist).get("domains", {})}
    cases = []
    for direction in directions:
        source, target = ("A", "B") if direction == "A2B" else ("B", "A")
        for subject, entry in zip(subjects, entries, strict=True):
            pair = synthesis_pair(entry, direction)
            case = {"image": pair["source"], "label": pair["ground_truth"], "subject": subject, "direction": direction}
            case |= {"experiment": f"{names[source]} to {names[target]}", "source_name": names[source]}
            case |= {"target_name": names[target], **({"mask": pair["mask"]} if pair["mask"] else {})}
            cases.append(case)
    return cases


def mask_preprocessing(
    keys: str | Sequence[str] = "image", pixdim: Sequence[float] = (1.8, 1.8, 1.8), allow_missing_keys: bool = False
) -> Compose:
    """Geometry of :func:`bundle.data.volume_preprocessing` for masks (load, channel first, RAS, nearest resampling to
    ``pixdim`` mm); values are kept (non-zero voxels are inside)."""
    kw = {"allow_missing_keys": allow_missing_keys}
    load = [LoadImaged(keys, image_only=True, **kw), EnsureChannelFirstd(keys, **kw)]
    orient = Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")), allow_missing_keys=True)
    return Compose([*load, orient, Spacingd(keys, pixdim=pixdim, mode="nearest", **kw)])


def check_same_grid(
    reference: torch.Tensor,
    other: torch.Tensor,
    reference_file: str | os.PathLike,
    other_file: str | os.PathLike,
    what: str = "ground truth",
    atol_mm: float = 1e-3,
) -> None:
    """Raise ValueError (naming both files, their grids and what to do) unless two preprocessed channel-first
    volumes have the same shape and affine (within ``atol_mm``).

    Args:
        reference, other: the preprocessed source (a MetaTensor carries its affine) and ground truth or mask.
        reference_file, other_file, what: the files and what ``other`` is, for the message.
        atol_mm: tolerance on the affines' entries.
    """
    shapes = tuple(reference.shape[1:]), tuple(other.shape[1:])
    affines = [torch.as_tensor(getattr(v, "affine", torch.eye(4)), dtype=torch.float64) for v in (reference, other)]
    if shapes[0] == shapes[1] and torch.allclose(affines[0], affines[1], atol=atol_mm):
        return

    def grid(volume: torch.Tensor, shape: tuple[int, ...], affine: torch.Tensor) -> str:
        original = getattr(volume, "meta", {}).get("spatial_shape")
        file_size = "" if original is None else f" (file: {'x'.join(str(int(n)) for n in original)})"
        origin, spacing = (", ".join(f"{float(v):.2f}" for v in a) for a in (affine[:3, 3], affine[:3, :3].norm(dim=0)))
        return f"{'x'.join(str(int(n)) for n in shape)} voxels{file_size}, spacing ({spacing}) mm, origin ({origin})"

    raise ValueError(
        f"{what} {other_file} is not on the grid of its source {reference_file}:\n"
        f"  source: {grid(reference, shapes[0], affines[0])}\n"
        f"  {what}: {grid(other, shapes[1], affines[1])}\n"
        f"paired volumes must share the source's geometry (bundle.datalist: ground truth and masks are in the "
        f"source's geometry); resample the {what} onto the source before evaluating."
    )


class PairedVolumesd(MapTransform):
    """Check that the preprocessed ``label`` and ``mask`` lie on the ``image``'s grid (else ValueError, see
    :func:`check_same_grid`), append the mask (all voxels where the item has none) to ``label`` as its last channel
    (read by :mod:`bundle.metrics`) and set ``masked``."""

    def __init__(self) -> None:
        super().__init__(("label", "mask"), allow_missing_keys=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        source, target = d["image"], d["label"]
        files = {key: getattr(d[key], "meta", {}).get("filename_or_obj", key) for key in self.key_iterator(d)}
        source_file = source.meta.get("filename_or_obj", "image") if hasattr(source, "meta") else "image"
        check_same_grid(source, target, source_file, files["label"], "ground truth")
        if "mask" in d:
            check_same_grid(source, d["mask"], source_file, files["mask"], "mask")
        d["masked"] = "mask" in d
        mask = (d.pop("mask")[:1] > 0) if "mask" in d else torch.ones_like(torch.as_tensor(target)[:1], dtype=bool)
        d["label"] = torch.cat([target, mask.to(target.dtype)])  # a MetaTensor keeps the ground truth's affine
        return d


def paired_loader(
    cases: Sequence[Mapping[str, Any]],
    direction: str,
    source_preprocessing: Compose,
    target_preprocessing: Compose,
    pixdim: Sequence[float],
) -> DataLoader:
    """MONAI ``DataLoader`` of one direction's items of :func:`paired_cases`, one volume per batch: ``image``,
    ``label`` and ``mask`` preprocessed, then :class:`PairedVolumesd`.

    Args:
        cases: what :func:`paired_cases` returns.
        direction: ``"A2B"`` or ``"B2A"``.
        source_preprocessing, target_preprocessing: the domains' preprocessing with keys ``"image"``, ``"label"``.
        pixdim: voxel size in mm (for the masks).
    """
    masks = mask_preprocessing("mask", pixdim, allow_missing_keys=True)
    transform = Compose([source_preprocessing, target_preprocessing, masks, PairedVolumesd()])
    items = [dict(case) for case in cases if case["direction"] == direction]
    return DataLoader(Dataset(items, transform), batch_size=1, shuffle=False, num_workers=0)
