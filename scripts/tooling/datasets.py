"""Dataset builders for experiments: datalists from IXI, from a folder per domain, and distorted copies of domain B.

Not shipped in the zoo export. The datalist format is in :mod:`bundle.datalist`; the builders return a datalist's
content with absolute paths and :func:`write_datalist` stores it relative to the dataset folder. CLI:
``scripts/make_datalist.py``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import nibabel as nib
import numpy as np
from bundle.datalist import (
    _NIFTI_SUFFIXES,
    IMAGE_SUFFIXES,
    PAIRED_KEYS,
    PATH_KEYS,
    TRAINING_KEYS,
    _resolve,
    _structure_problems,
    read_datalist,
    volume_stem,
)
from bundle.transforms import DomainDistortion
from bundle.volumes import find_volumes

__all__ = [
    "IXI_CONTRASTS",
    "IXIInventory",
    "IXIName",
    "find_ixi_volumes",
    "make_distorted_datalist",
    "make_folder_datalist",
    "make_ixi_datalist",
    "parse_ixi_name",
    "split_subjects",
    "write_datalist",
]

IXI_CONTRASTS = ("T1", "T2", "PD", "MRA", "DTI")
_IXI_NAME = re.compile(
    r"^(?P<subject>IXI\d{3})-(?P<site>[A-Za-z]+)-(?P<study>\d+)-(?P<contrast>[A-Za-z0-9]+)\.nii(\.gz)?$"
)


def _relative(dataset_dir: Path, path: str | os.PathLike) -> str:
    """Path relative to ``dataset_dir`` with forward slashes (portable JSON); a path outside ``dataset_dir`` stays
    absolute, as :func:`~bundle.datalist.read_datalist` refuses relative paths that leave the dataset folder."""
    relative = os.path.relpath(_resolve(dataset_dir, path), dataset_dir)
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):
        return str(Path(os.path.abspath(_resolve(dataset_dir, path))))
    return Path(relative).as_posix()


def write_datalist(
    path: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    domains: Mapping[str, str],
    training_a: Iterable[Mapping[str, Any]],
    training_b: Iterable[Mapping[str, Any]],
    validation: Iterable[Mapping[str, Any]] = (),
    test: Iterable[Mapping[str, Any]] = (),
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a datalist JSON; paths (absolute or relative to ``dataset_dir``) are stored relative to it.

    Args:
        path: the JSON file to write, absolute or relative to ``dataset_dir``.
        dataset_dir: the dataset folder.
        domains: ``{"A": name, "B": name}``.
        training_a: unpaired domain-A entries ``{"image": path}``.
        training_b: unpaired domain-B entries ``{"image": path}``.
        validation: paired entries ``{"A", "B", ...}``.
        test: paired entries ``{"A", "B", ...}``.
        extra: other top-level keys (provenance).
        overwrite: replace an existing file.

    Returns:
        the path written.

    Raises:
        FileExistsError: if the file exists and ``overwrite`` is False.
        ValueError: if the content is not a well-formed datalist.
    """
    dataset_dir = Path(dataset_dir).resolve()
    path = _resolve(dataset_dir, path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another name or pass overwrite=True (--overwrite).")
    content: dict[str, Any] = {"domains": {"A": domains["A"], "B": domains["B"]}}
    for key, entries in zip((*TRAINING_KEYS, *PAIRED_KEYS), (training_a, training_b, validation, test)):
        content[key] = [
            {name: _relative(dataset_dir, value) if name in PATH_KEYS else value for name, value in entry.items()}
            for entry in entries
        ]
    content.update(extra or {})
    problems = _structure_problems(content)
    if problems:
        raise ValueError("refusing to write a malformed datalist:\n" + "\n".join(f"  {p}" for p in problems))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    return path


def split_subjects(
    subjects: Sequence[str], n_train: int | None, n_test: int, n_validation: int = 0, seed: int = 0
) -> dict[str, list[str]]:
    """Seeded random split of subjects (sorted first) into training, validation and test.

    Args:
        subjects: subject identifiers.
        n_train: training subjects; None takes every subject not used for validation or test.
        n_test: test subjects.
        n_validation: validation subjects.
        seed: random seed.

    Returns:
        ``{"training", "validation", "test", "unused"}`` lists of subjects, each sorted.

    Raises:
        ValueError: if a count is negative or more subjects are requested than available.
    """
    pool = sorted(set(subjects))
    n_fixed = n_test + n_validation
    if min(n_test, n_validation) < 0 or (n_train is not None and n_train < 0):
        raise ValueError("subject counts must be >= 0.")
    n_train = len(pool) - n_fixed if n_train is None else n_train
    if n_train + n_fixed > len(pool) or n_train < 0:
        raise ValueError(
            f"{len(pool)} subjects available, fewer than the {n_train} training + {n_validation} validation + "
            f"{n_test} test requested; lower the counts (e.g. --n_train/--n_test)."
        )
    order = [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))]
    return {
        "test": sorted(order[:n_test]),
        "validation": sorted(order[n_test:n_fixed]),
        "training": sorted(order[n_fixed : n_fixed + n_train]),
        "unused": sorted(order[n_fixed + n_train :]),
    }


def _training_lists(
    volumes_a: Sequence[str], volumes_b: Sequence[str], seed: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Unpaired training lists: each domain shuffled with its own random stream."""
    stream_a, stream_b = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    return (
        [{"image": volumes_a[i]} for i in stream_a.permutation(len(volumes_a))],
        [{"image": volumes_b[i]} for i in stream_b.permutation(len(volumes_b))],
    )


class IXIName(NamedTuple):
    """Parts of an IXI file name such as ``IXI012-HH-1211-PD.nii.gz``."""

    subject: str  # IXI012
    site: str  # Guys, HH or IOP
    study: str  # 1211
    contrast: str  # T1, T2, PD, MRA, DTI


def parse_ixi_name(name: str | os.PathLike) -> IXIName | None:
    """The :class:`IXIName` of a file name or path such as ``IXI012-HH-1211-PD.nii.gz``; None if not IXI's pattern."""
    match = _IXI_NAME.match(Path(name).name)
    if match is None:
        return None
    return IXIName(match["subject"], match["site"], match["study"], match["contrast"])


class IXIInventory(NamedTuple):
    """IXI volumes found under a folder, by subject."""

    complete: dict[str, dict[str, Path]]  # subject -> contrast -> file, subjects with every requested contrast
    incomplete: dict[str, list[str]]  # subject -> missing contrasts
    duplicates: dict[str, list[Path]]  # "subject contrast" -> files, when one subject has several


def find_ixi_volumes(root: str | os.PathLike, contrasts: Sequence[str] = ("PD", "T2")) -> IXIInventory:
    """The :class:`IXIInventory` of the IXI volumes under ``root`` (any depth, e.g. ``IXI-PD/`` and ``IXI-T2/``);
    a complete subject has each of ``contrasts``."""
    found: dict[str, dict[str, list[Path]]] = {}
    for path in sorted(Path(root).rglob("IXI*.nii*")):
        parsed = parse_ixi_name(path.name)
        if parsed is not None and parsed.contrast in contrasts:
            found.setdefault(parsed.subject, {}).setdefault(parsed.contrast, []).append(path)
    complete, incomplete, duplicates = {}, {}, {}
    for subject, by_contrast in sorted(found.items()):
        missing = [c for c in contrasts if c not in by_contrast]
        for contrast, paths in by_contrast.items():
            if len(paths) > 1:
                duplicates[f"{subject} {contrast}"] = paths
        if missing:
            incomplete[subject] = missing
        elif all(len(by_contrast[c]) == 1 for c in contrasts):
            complete[subject] = {c: by_contrast[c][0] for c in contrasts}
    return IXIInventory(complete, incomplete, duplicates)


def _masks_by_subject(mask_dir: Path, subjects: Iterable[str]) -> tuple[dict[str, Path], list[str]]:
    """One mask per subject: the image file in ``mask_dir`` whose name starts with the subject identifier."""
    files = [p for p in sorted(mask_dir.iterdir()) if p.name.lower().endswith(IMAGE_SUFFIXES)]
    masks, problems = {}, []
    for subject in subjects:
        matches = [p for p in files if p.name.startswith(subject)]
        if len(matches) == 1:
            masks[subject] = matches[0]
        else:
            problems.append(f"{subject}: {len(matches)} masks in {mask_dir} (expected 1)")
    return masks, problems


def make_ixi_datalist(
    dataset_dir: str | os.PathLike,
    contrast_a: str = "PD",
    contrast_b: str = "T2",
    n_train: int | None = 38,
    n_test: int = 28,
    n_validation: int = 0,
    seed: int = 0,
    mask_dir: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build an IXI datalist: subjects paired by identifier, split as the paper (38 training, 28 test); the training
    subjects' A and B lists are shuffled independently (unpaired).

    Args:
        dataset_dir: folder holding the IXI files (any depth); the datalist's paths are relative to it.
        contrast_a: IXI contrast of domain A.
        contrast_b: IXI contrast of domain B.
        n_train: training subjects (None: all subjects left after validation and test).
        n_test: test subjects.
        n_validation: validation subjects.
        seed: seed of the split and of the shuffles.
        mask_dir: optional folder of masks, one per subject whose name starts with it (``IXI012_mask.nii.gz``).
        progress: called with report lines.

    Returns:
        the datalist content (absolute paths, for :func:`write_datalist`), with a ``source`` key recording the split
        and the subjects missing a contrast.

    Raises:
        ValueError: if there are duplicate files, missing masks, or fewer subjects than requested.
    """
    say = progress or (lambda _line: None)
    dataset_dir = Path(dataset_dir).resolve()
    contrasts = (contrast_a, contrast_b)
    inventory = find_ixi_volumes(dataset_dir, contrasts)
    say(f"{len(inventory.complete)} IXI subjects with both {contrast_a} and {contrast_b} under {dataset_dir}")
    if inventory.incomplete:
        missing = ", ".join(f"{s} (no {'/'.join(c)})" for s, c in inventory.incomplete.items())
        say(f"{len(inventory.incomplete)} subjects missing a contrast, left out: {missing}")
    if inventory.duplicates:
        listing = "; ".join(f"{k}: {', '.join(p.name for p in v)}" for k, v in inventory.duplicates.items())
        raise ValueError(f"several IXI files for one subject and contrast under {dataset_dir}: {listing}.")
    split = split_subjects(list(inventory.complete), n_train, n_test, n_validation, seed)
    masks: dict[str, Path] = {}
    if mask_dir is not None:
        masks, problems = _masks_by_subject(_resolve(dataset_dir, mask_dir), [s for k in split for s in split[k]])
        if problems:
            raise ValueError("masks do not match the subjects:\n" + "\n".join(f"  {p}" for p in problems))
    say(
        f"split (seed {seed}): {len(split['training'])} training, {len(split['validation'])} validation, "
        f"{len(split['test'])} test, {len(split['unused'])} unused"
    )

    def pairs(subjects: list[str]) -> list[dict[str, str]]:
        return [
            {"A": str(inventory.complete[s][contrast_a]), "B": str(inventory.complete[s][contrast_b])}
            | ({"mask": str(masks[s])} if s in masks else {})
            | {"subject": s}
            for s in subjects
        ]

    training_a, training_b = _training_lists(
        [str(inventory.complete[s][contrast_a]) for s in split["training"]],
        [str(inventory.complete[s][contrast_b]) for s in split["training"]],
        seed,
    )
    return {
        "domains": {"A": contrast_a, "B": contrast_b},
        "training_A": training_a,
        "training_B": training_b,
        "validation": pairs(split["validation"]),
        "test": pairs(split["test"]),
        "source": {
            "dataset": "IXI",
            "seed": seed,
            "training_subjects": split["training"],
            "unused_subjects": split["unused"],
            "subjects_missing_a_contrast": inventory.incomplete,
        },
    }


def make_folder_datalist(
    dataset_dir: str | os.PathLike,
    dir_a: str | os.PathLike,
    dir_b: str | os.PathLike,
    name_a: str = "A",
    name_b: str = "B",
    paired_dir_a: str | os.PathLike | None = None,
    paired_dir_b: str | os.PathLike | None = None,
    paired_mask_dir: str | os.PathLike | None = None,
    n_validation: int = 0,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build a datalist from a folder per domain (unpaired) and optional paired folders, which hold the same subjects
    under the same file names (extension aside); ``n_validation`` pairs of a seeded shuffle go to validation, the
    rest to test.

    Args:
        dataset_dir: the dataset folder; the other folders are absolute or relative to it.
        dir_a: unpaired training volumes of domain A.
        dir_b: unpaired training volumes of domain B.
        name_a: name of domain A (e.g. ``"MR"``).
        name_b: name of domain B (e.g. ``"CT"``).
        paired_dir_a: paired evaluation volumes of domain A.
        paired_dir_b: paired evaluation volumes of domain B.
        paired_mask_dir: masks of the pairs (A's geometry).
        n_validation: pairs used for validation.
        seed: seed of the shuffles.
        progress: called with report lines.

    Returns:
        the datalist content (absolute paths, for :func:`write_datalist`).

    Raises:
        ValueError: if a folder has no volumes or the paired folders do not match.
    """
    say = progress or (lambda _line: None)
    dataset_dir = Path(dataset_dir).resolve()
    volumes_a, volumes_b = find_volumes(_resolve(dataset_dir, dir_a)), find_volumes(_resolve(dataset_dir, dir_b))
    empty = [str(d) for d, v in ((dir_a, volumes_a), (dir_b, volumes_b)) if not v]
    if empty:
        raise ValueError(f"no volumes ({', '.join(IMAGE_SUFFIXES)} or DICOM series) in {', '.join(empty)}.")
    say(f"training: {len(volumes_a)} {name_a} volumes, {len(volumes_b)} {name_b} volumes (unpaired)")
    training_a, training_b = _training_lists([str(p) for p in volumes_a], [str(p) for p in volumes_b], seed)
    pairs: list[dict[str, str]] = []
    if (paired_dir_a is None) != (paired_dir_b is None):
        raise ValueError("paired_dir_a and paired_dir_b go together.")
    if paired_dir_a is not None and paired_dir_b is not None:
        folders = {"A": paired_dir_a, "B": paired_dir_b}
        if paired_mask_dir is not None:
            folders["mask"] = paired_mask_dir
        found = {
            name: {volume_stem(p): p for p in find_volumes(_resolve(dataset_dir, d))} for name, d in folders.items()
        }
        keys = sorted(set.union(*(set(v) for v in found.values())))
        unmatched = [
            f"{k} (no {', '.join(n for n in found if k not in found[n])})"
            for k in keys
            if not all(k in v for v in found.values())
        ]
        if unmatched:
            raise ValueError("paired folders do not match: " + "; ".join(unmatched) + ".")
        pairs = [{**{name: str(found[name][k]) for name in found}, "subject": k} for k in keys]
        say(f"paired: {len(pairs)} subjects")
    if n_validation > len(pairs):
        raise ValueError(f"n_validation={n_validation} but only {len(pairs)} paired subjects.")
    order = np.random.default_rng(seed).permutation(len(pairs))
    shuffled = [pairs[i] for i in order]
    return {
        "domains": {"A": name_a, "B": name_b},
        "training_A": training_a,
        "training_B": training_b,
        "validation": sorted(shuffled[:n_validation], key=lambda e: e["subject"]),
        "test": sorted(shuffled[n_validation:], key=lambda e: e["subject"]),
        "source": {"dataset": "folders", "seed": seed},
    }


def _read_volume(path: Path) -> tuple[np.ndarray, np.ndarray, Callable[[np.ndarray, Path], None]]:
    """A volume as float32 ``(X, Y, Z)``, its RAS affine, and a writer that saves an array like it (same header,
    geometry and stored dtype) to another path."""
    if path.name.lower().endswith(_NIFTI_SUFFIXES):
        image = nib.load(path)
        stored = image.get_data_dtype()

        def write_nifti(array: np.ndarray, target: Path) -> None:
            if np.issubdtype(stored, np.integer):
                info = np.iinfo(stored)
                array = np.clip(np.rint(array), info.min, info.max).astype(stored)
            out = image.__class__(array, image.affine, image.header)
            out.set_data_dtype(stored)
            nib.save(out, target)

        return np.asarray(image.get_fdata(dtype=np.float32)), np.asarray(image.affine), write_nifti
    import SimpleITK

    image = SimpleITK.ReadImage(str(path))
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # ITK's LPS world -> RAS

    def write_itk(array: np.ndarray, target: Path) -> None:
        out = SimpleITK.GetImageFromArray(np.ascontiguousarray(array.T))
        out.CopyInformation(image)
        SimpleITK.WriteImage(
            SimpleITK.Cast(out, image.GetPixelID()) if image.GetPixelID() != out.GetPixelID() else out, str(target)
        )

    return SimpleITK.GetArrayFromImage(image).T.astype(np.float32), affine, write_itk


def make_distorted_datalist(
    dataset_dir: str | os.PathLike,
    datalist: str | os.PathLike = "datalist.json",
    output: str | os.PathLike = "datalist_deformed.json",
    folder: str | None = None,
    max_displacement_mm: float = 8.0,
    control_spacing_mm: float = 40.0,
    seed: int = 0,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Derive the deformed-B experiment from a datalist: distort every domain-B volume with one fixed distortion.

    Writes under ``dataset_dir/folder`` the distorted copy of every domain-B volume and, for each pair, of its
    A volume and mask; then a datalist whose ``training_B`` and pairs' ``B`` are distorted, with ``gt_A2B``
    (undistorted B), ``gt_B2A`` (distorted A) and ``mask_B`` (distorted mask). The inputs are never modified.

    Args:
        dataset_dir: the dataset folder.
        datalist: the source datalist (undistorted), absolute or relative to ``dataset_dir``.
        output: the new datalist, absolute or relative to ``dataset_dir``.
        folder: sub-folder for the distorted volumes (default ``distorted_<B>_<mm>mm_seed<seed>``).
        max_displacement_mm: see :class:`~bundle.transforms.DomainDistortion`.
        control_spacing_mm: see :class:`~bundle.transforms.DomainDistortion`.
        seed: seed of the distortion.
        overwrite: replace existing distorted volumes and an existing output datalist.
        progress: called with a line per volume.

    Returns:
        the path of the new datalist.

    Raises:
        ValueError: if the datalist is already distorted or the output would replace the input.
        FileExistsError: if an output exists and ``overwrite`` is False.
    """
    say = progress or (lambda _line: None)
    root = Path(dataset_dir).resolve()
    source_path, output_path = _resolve(root, datalist).resolve(), _resolve(root, output).resolve()
    if source_path == output_path:
        raise ValueError(f"output {output_path} would replace the input datalist; choose another name.")
    content = read_datalist(root, source_path)
    if "distortion" in content or any("gt_A2B" in e for k in PAIRED_KEYS for e in content.get(k, [])):
        raise ValueError(f"datalist {source_path} is already distorted; start from the undistorted one.")
    name_b = re.sub(r"[^A-Za-z0-9]+", "", str(content["domains"]["B"])) or "B"
    folder = folder or f"distorted_{name_b}_{max_displacement_mm:g}mm_seed{seed}"
    distortion = DomainDistortion(max_displacement_mm, control_spacing_mm, seed=seed)
    targets: dict[str, Path] = {}

    def distorted(relative: str, mode: str) -> str:
        """Distort one volume (once); its new path relative to the dataset folder."""
        if relative in targets:
            return _relative(root, targets[relative])
        source = _resolve(root, relative).resolve()
        inside = not os.path.relpath(source, root).startswith("..")
        target = root / folder / (os.path.relpath(source, root) if inside else source.name)
        if target in targets.values():
            raise ValueError(f"two volumes would be distorted into {target}; rename one of them.")
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} exists; pass overwrite=True (--overwrite) to replace it.")
        array, affine, write = _read_volume(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        write(np.asarray(distortion(array[None], affine=affine, mode=mode))[0], target)
        targets[relative] = target
        say(f"distorted {relative} -> {_relative(root, target)}")
        return _relative(root, target)

    training_b = [{**e, "image": distorted(e["image"], "bilinear")} for e in content.get("training_B", [])]
    paired = {}
    for key in PAIRED_KEYS:
        paired[key] = []
        for entry in content.get(key, []):
            new = {**entry, "B": distorted(entry["B"], "bilinear"), "gt_A2B": entry["B"]}
            new["gt_B2A"] = distorted(entry["A"], "bilinear")
            if "mask" in entry:
                new["mask_B"] = distorted(entry["mask"], "nearest")
            paired[key].append(new)
    extra = {k: v for k, v in content.items() if k not in ("domains", *TRAINING_KEYS, *PAIRED_KEYS)}
    extra["distortion"] = {
        "domain": "B",
        "max_displacement_mm": max_displacement_mm,
        "control_spacing_mm": control_spacing_mm,
        "seed": seed,
        "source_datalist": _relative(root, source_path),
    }
    return write_datalist(
        output_path,
        root,
        content["domains"],
        content.get("training_A", []),
        training_b,
        paired["validation"],
        paired["test"],
        extra=extra,
        overwrite=overwrite,
    )
