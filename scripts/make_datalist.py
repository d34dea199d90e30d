"""Build, check and derive datalists for real data (IXI or your own folders); the format is in bundle/datalist.py,
the builders in scripts/tooling/datasets.py.

Usage (from the repository root)::

    # IXI: PD and T2 files (IXI012-HH-1211-PD.nii.gz, ...-T2.nii.gz) anywhere under /data/IXI, split 38/28
    python -m scripts.make_datalist ixi --dataset_dir /data/IXI [--n_train 38 --n_test 28 --n_validation 0 --seed 0]

    # your own unpaired folders (NIfTI, NRRD, MetaImage or DICOM series sub-folders), optional paired folders
    python -m scripts.make_datalist folders --dataset_dir /data/pelvis --dir_a mr --dir_b ct --name_a MR --name_b CT \\
        [--paired_dir_a eval/mr --paired_dir_b eval/ct --paired_mask_dir eval/body --n_validation 2]

    # the paper's deformed-T2 experiment: distort every domain-B volume (new files, new datalist)
    python -m scripts.make_datalist distort --dataset_dir /data/IXI --datalist datalist.json \\
        --output datalist_deformed_t2.json [--max_displacement_mm 8 --seed 0]

    # check every file of a datalist (missing, unreadable, not 3-D, NaN/Inf, empty) before training
    python -m scripts.make_datalist validate --dataset_dir /data/IXI --datalist datalist.json

Every command writes paths relative to ``--dataset_dir`` and never overwrites an existing file without
``--overwrite``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import fire
from bundle import datalist as dl
from scripts.tooling import datasets

ROOT = Path(__file__).resolve().parents[1]


def _write_and_check(content: dict[str, Any], dataset_dir: str, output: str, overwrite: bool, check: bool) -> str:
    """Write a datalist built by a ``make_*_datalist`` function, then optionally validate every file."""
    extra = {k: v for k, v in content.items() if k not in ("domains", *dl.TRAINING_KEYS, *dl.PAIRED_KEYS)}
    lists = [content[k] for k in (*dl.TRAINING_KEYS, *dl.PAIRED_KEYS)]
    path = datasets.write_datalist(output, dataset_dir, content["domains"], *lists, extra=extra, overwrite=overwrite)
    print(
        f"wrote {path}: {len(content['training_A'])} training A ({content['domains']['A']}), "
        f"{len(content['training_B'])} training B ({content['domains']['B']}), "
        f"{len(content['validation'])} validation pairs, {len(content['test'])} test pairs"
    )
    if check:
        validate(dataset_dir, path)
    return str(path)


def ixi(
    dataset_dir: str,
    output: str = "datalist.json",
    contrast_a: str = "PD",
    contrast_b: str = "T2",
    n_train: int | None = 38,
    n_test: int = 28,
    n_validation: int = 0,
    seed: int = 0,
    mask_dir: str | None = None,
    overwrite: bool = False,
    validate: bool = True,
) -> str:
    """IXI datalist: pair subjects by identifier, report subjects missing a contrast, split as the paper.

    Args:
        dataset_dir: folder holding the IXI files (any depth, e.g. the untarred IXI-PD/ and IXI-T2/).
        output: datalist file, relative to ``dataset_dir`` or absolute.
        contrast_a: IXI contrast of domain A (PD, T2, T1).
        contrast_b: IXI contrast of domain B.
        n_train: training subjects (None: all subjects left after validation and test).
        n_test: test subjects.
        n_validation: validation subjects.
        seed: seed of the split and of the shuffles of the two training lists.
        mask_dir: optional folder of per-subject masks (file name starting with the subject, e.g. IXI012_mask.nii.gz).
        overwrite: replace an existing datalist.
        validate: read every volume afterwards and report unusable ones.

    Returns:
        the path of the datalist.
    """
    content = datasets.make_ixi_datalist(
        dataset_dir, contrast_a, contrast_b, n_train, n_test, n_validation, seed, mask_dir, progress=print
    )
    return _write_and_check(content, dataset_dir, output, overwrite, validate)


def folders(
    dataset_dir: str,
    dir_a: str,
    dir_b: str,
    name_a: str = "A",
    name_b: str = "B",
    paired_dir_a: str | None = None,
    paired_dir_b: str | None = None,
    paired_mask_dir: str | None = None,
    n_validation: int = 0,
    seed: int = 0,
    output: str = "datalist.json",
    overwrite: bool = False,
    validate: bool = True,
) -> str:
    """Datalist from a folder per domain (unpaired training) and optional paired folders (validation and test).

    Args:
        dataset_dir: the dataset folder; the other folders are relative to it or absolute.
        dir_a: unpaired volumes of domain A.
        dir_b: unpaired volumes of domain B.
        name_a: name of domain A (e.g. MR).
        name_b: name of domain B (e.g. CT).
        paired_dir_a: paired domain-A volumes, same file names as in ``paired_dir_b``.
        paired_dir_b: paired domain-B volumes.
        paired_mask_dir: masks of the pairs (same file names), in A's geometry.
        n_validation: pairs for validation; the other pairs are for testing.
        seed: seed of the shuffles.
        output: datalist file, relative to ``dataset_dir`` or absolute.
        overwrite: replace an existing datalist.
        validate: read every volume afterwards and report unusable ones.

    Returns:
        the path of the datalist.
    """
    folders = (dir_a, dir_b, name_a, name_b, paired_dir_a, paired_dir_b, paired_mask_dir)
    content = datasets.make_folder_datalist(dataset_dir, *folders, n_validation, seed, progress=print)
    return _write_and_check(content, dataset_dir, output, overwrite, validate)


def distort(
    dataset_dir: str,
    datalist: str = "datalist.json",
    output: str = "datalist_deformed.json",
    folder: str | None = None,
    max_displacement_mm: float = 8.0,
    control_spacing_mm: float = 40.0,
    seed: int = 0,
    overwrite: bool = False,
) -> str:
    """Deformed-B experiment: write distorted copies of domain B (and the matching ground truth) and a datalist.

    Args:
        dataset_dir: the dataset folder.
        datalist: the undistorted datalist.
        output: the new datalist.
        folder: sub-folder for the distorted volumes (default ``distorted_<B>_<mm>mm_seed<seed>``).
        max_displacement_mm: largest displacement of the distortion (mm).
        control_spacing_mm: B-spline control-point spacing (mm).
        seed: seed of the distortion.
        overwrite: replace existing outputs.

    Returns:
        the path of the new datalist.
    """
    path = datasets.make_distorted_datalist(
        dataset_dir, datalist, output, folder, max_displacement_mm, control_spacing_mm, seed, overwrite, print
    )
    print(f"wrote {path}")
    return str(path)


def validate(dataset_dir: str, datalist: str = "datalist.json") -> int:
    """Check every volume a datalist names; list every unusable file with its problem.

    Args:
        dataset_dir: the dataset folder.
        datalist: the datalist, relative to ``dataset_dir`` or absolute.

    Returns:
        the number of volumes checked.
    """
    count = dl.validate_datalist(dataset_dir, datalist, progress=print)
    print(f"all {count} volumes are readable 3-D volumes")
    return count


def main() -> None:
    """Run the command line; data errors print one clear message and exit with status 1."""
    try:
        fire.Fire({"ixi": ixi, "folders": folders, "distort": distort, "validate": validate})
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error.args[0] if isinstance(error, KeyError) else error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
