"""Datalists of the DicycleGAN bundle: format, loading and validation. A datalist is a JSON file inside (or beside)
the dataset folder; every relative path in it is relative to that folder::

    {"domains": {"A": "PD", "B": "T2"},
     "training_A": [{"image": "IXI002-Guys-0828-PD.nii.gz"}, ...], "training_B": [{"image": "...-T2.nii.gz"}, ...],
     "validation": [{"A": "...-PD.nii.gz", "B": "...-T2.nii.gz", "mask": "...", "subject": "IXI012"}, ...],
     "test": [...]}

``domains`` names each domain's contrast; ``training_A``, ``training_B`` are unpaired; ``validation``, ``test`` paired
(same subject), with an optional ``mask`` (in A's geometry) restricting metrics. Misaligned pairs also carry ``gt_A2B``
(a domain-B image in A's geometry), ``gt_B2A`` and ``mask_B`` (in B's geometry), by default ``B``, ``A``, ``mask``
(:func:`synthesis_pair`). Optional top-level keys record provenance (``distortion``, ``source``)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

__all__ = ["IMAGE_SUFFIXES", "PAIRED_KEYS", "PATH_KEYS", "TRAINING_KEYS", "check_volume", "load_datalist"]
__all__ += ["read_datalist", "screen_volume", "synthesis_pair", "validate_datalist", "volume_problem", "volume_stem"]

TRAINING_KEYS = ("training_A", "training_B")
PAIRED_KEYS = ("validation", "test")
PATH_KEYS = ("image", "A", "B", "mask", "mask_B", "gt_A2B", "gt_B2A")
_REQUIRED = {"training_A": ("image",), "training_B": ("image",), "validation": ("A", "B"), "test": ("A", "B")}
_NIFTI_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".img", ".img.gz")
_ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_SUFFIXES = _NIFTI_SUFFIXES + _ITK_SUFFIXES


def volume_stem(path: str | os.PathLike) -> str:
    """File name without its image extension (``sub01.nii.gz`` -> ``sub01``; a DICOM series folder: its name)."""
    name = Path(path).name
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _resolve(dataset_dir: str | os.PathLike, path: str | os.PathLike) -> Path:
    path = Path(path)
    return path if path.is_absolute() else Path(dataset_dir) / path


def read_datalist(dataset_dir: str | os.PathLike, datalist: str | os.PathLike = "datalist.json") -> dict[str, Any]:
    """The parsed datalist JSON, its structure checked and every relative path inside ``dataset_dir`` once ``..``
    is resolved (symbolic links inside the folder work).

    Args:
        dataset_dir: the dataset folder.
        datalist: the JSON file, absolute or relative to ``dataset_dir``.

    Raises:
        FileNotFoundError: if the JSON file does not exist.
        ValueError: if it is not valid JSON, not a datalist, or a relative path leaves the dataset folder.
    """
    path = _resolve(dataset_dir, datalist)
    if not path.is_file():
        raise FileNotFoundError(f"datalist {path} does not exist (dataset folder {dataset_dir}).")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"datalist {path} is not valid JSON: {error}.") from error
    if problems := _structure_problems(content):
        raise ValueError(f"datalist {path} is malformed:\n" + "\n".join(f"  {p}" for p in problems))
    root = os.path.normpath(os.path.abspath(dataset_dir))
    outside = [
        f'"{key}"[{index}]["{name}"]: {entry[name]}'
        for key in (*TRAINING_KEYS, *PAIRED_KEYS)
        for index, entry in enumerate(content.get(key, []))
        for name in PATH_KEYS
        if name in entry
        and not Path(entry[name]).is_absolute()
        and os.path.commonpath([root, os.path.normpath(os.path.join(root, entry[name]))]) != root
    ]
    if outside:
        raise ValueError(
            f"datalist {path}: {_count(len(outside), 'relative path')} outside the dataset folder {root} (write an "
            "absolute path to use a file elsewhere):\n" + "\n".join(f"  {p}" for p in outside)
        )
    return content


def _structure_problems(content: Any) -> list[str]:
    if not isinstance(content, dict):
        return [f"expected a JSON object, got {type(content).__name__}"]
    problems = []
    domains = content.get("domains")
    if not (isinstance(domains, dict) and {"A", "B"} <= set(domains)):
        problems.append('"domains" must be an object naming domains "A" and "B", e.g. {"A": "PD", "B": "T2"}')
    if not any(key in content for key in (*TRAINING_KEYS, *PAIRED_KEYS)):
        problems.append(f"no list of volumes: expected some of {', '.join(TRAINING_KEYS + PAIRED_KEYS)}")
    for key, required in _REQUIRED.items():
        entries = content.get(key, [])
        if not isinstance(entries, list):
            problems.append(f'"{key}" must be a list, got {type(entries).__name__}')
            continue
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                problems.append(f'"{key}"[{index}] must be an object, got {type(entry).__name__}')
                continue
            if missing := [name for name in required if name not in entry]:
                problems.append(f'"{key}"[{index}] has no {" / ".join(repr(m) for m in missing)}')
            not_paths = [name for name in PATH_KEYS if name in entry and not isinstance(entry[name], str)]
            problems += [f'"{key}"[{index}]["{name}"] must be a path string' for name in not_paths]
    return problems


def load_datalist(
    dataset_dir: str | os.PathLike, datalist: str | os.PathLike = "datalist.json", key: str = "training_A"
) -> list[dict[str, Any]]:
    """The entries of list ``key`` of a datalist (:func:`read_datalist`), their ``PATH_KEYS`` made absolute.

    Args:
        dataset_dir, datalist: as for :func:`read_datalist`.
        key: ``"training_A"``, ``"training_B"``, ``"validation"`` or ``"test"``.

    Raises:
        KeyError: if the datalist has no such list (and as :func:`read_datalist`).
    """
    content = read_datalist(dataset_dir, datalist)
    if key not in content:
        available = [k for k in (*TRAINING_KEYS, *PAIRED_KEYS) if k in content]
        raise KeyError(f"datalist {_resolve(dataset_dir, datalist)} has no {key!r} list (it has {available}).")
    root = Path(dataset_dir).resolve()
    return [
        {name: str(_resolve(root, value)) if name in PATH_KEYS else value for name, value in entry.items()}
        for entry in content[key]
    ]


def synthesis_pair(entry: Mapping[str, Any], direction: str = "A2B") -> dict[str, Any]:
    """``{"source", "ground_truth", "mask"}`` of a paired ``entry`` for ``direction`` (``"A2B"`` or ``"B2A"``), all
    in the source's geometry (``mask`` None where the entry has none); ValueError for another direction."""
    if direction == "A2B":
        return {"source": entry["A"], "ground_truth": entry.get("gt_A2B", entry["B"]), "mask": entry.get("mask")}
    if direction == "B2A":
        mask = entry.get("mask_B", entry.get("mask"))
        return {"source": entry["B"], "ground_truth": entry.get("gt_B2A", entry["A"]), "mask": mask}
    raise ValueError(f'direction must be "A2B" or "B2A", got {direction!r}.')


def _read_array(path: Path | Sequence[str | os.PathLike]) -> tuple[np.ndarray, np.ndarray]:
    """Voxel array and voxel-to-world affine (RAS) of a NIfTI/Analyze file (nibabel), or SimpleITK's reading."""
    if not isinstance(path, Path) or path.is_dir() or not path.name.lower().endswith(_NIFTI_SUFFIXES):
        import SimpleITK

        names = str(path) if isinstance(path, Path) else [str(p) for p in path]
        if isinstance(path, Path) and path.is_dir():
            names = SimpleITK.ImageSeriesReader.GetGDCMSeriesFileNames(str(path))
            if not names:
                raise ValueError("folder without a DICOM series")
        image = SimpleITK.ReadImage(names)
        if image.GetNumberOfComponentsPerPixel() > 1:
            raise ValueError(f"has {image.GetNumberOfComponentsPerPixel()} components per voxel, not a scalar volume")
        affine, dim = np.eye(4), image.GetDimension()
        affine[:dim, :dim] = np.asarray(image.GetDirection()).reshape(dim, dim) * np.asarray(image.GetSpacing())
        affine[:dim, 3] = image.GetOrigin()
        return SimpleITK.GetArrayFromImage(image).T, affine  # a copy: ITK arrays are (z, y, x); a view would outlive it
    image = nib.load(path)
    return np.asanyarray(image.dataobj), np.asarray(image.affine, dtype=float)


def volume_problem(path: str | os.PathLike | Sequence[str | os.PathLike]) -> str | None:
    """What makes a volume unusable (``"missing"``, ``"empty file (0 bytes)"``, ``"unreadable ..."``, unsupported
    voxel type, not 3-D, NaN/Inf, constant, singular or non-finite affine), or None for a usable 3-D volume.

    Args:
        path: a NIfTI/Analyze, NRRD, MetaImage file, a DICOM series folder, or the slice files of one DICOM series.
    """
    return screen_volume(path)[0]


def screen_volume(path: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[str | None, np.ndarray | None]:
    """``(problem, affine)``: :func:`volume_problem` and the voxel-to-world affine it read (None if not read)."""
    files = [Path(p) for p in path] if isinstance(path, (list, tuple)) else [Path(path)]
    if missing := [p for p in files if not p.exists()]:
        return "missing" if len(files) == 1 else f"missing slice files: {', '.join(map(str, missing[:3]))}", None
    if files[0].is_file() and files[0].stat().st_size == 0:
        return "empty file (0 bytes)", None
    try:
        data, affine = _read_array(files[0] if len(files) == 1 else files)
    except Exception as error:  # any reader failure means "not an image we can read"
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"unreadable, not an image ({message})", None
    # RGB24/RGBA32 NIfTI read as structured arrays (no arithmetic at all), complex numbers have no order
    if data.dtype.fields is not None or not any(np.issubdtype(data.dtype, t) for t in (np.integer, np.floating, bool)):
        fields = list(data.dtype.names or ())
        kind = f"{len(fields)} components per voxel ({', '.join(fields)}: colour)" if fields else f"type {data.dtype}"
        return f"has voxels of {kind}: unsupported, expected a scalar (grey-value) volume", affine
    return _array_problem(data, affine), affine


def _array_problem(data: np.ndarray, affine: np.ndarray) -> str | None:
    """What makes a scalar voxel array and its affine unusable, or None."""
    shape = list(data.shape)
    while len(shape) > 3 and shape[-1] == 1:  # NIfTI stores 3-D volumes as 4-D with one time point
        shape.pop()
    text = "x".join(str(int(n)) for n in shape)
    if len(shape) < 3:
        return f"is {len(shape)}-D (shape {text}), expected a 3-D volume"
    if len(shape) > 3:
        return f"is {len(shape)}-D with {int(np.prod(shape[3:]))} volumes (shape {text}), expected 3-D"
    if min(shape) == 0:
        return f"has no voxels (shape {text})"
    if min(shape) == 1:
        return f"is a single 2-D slice (shape {text}), expected a 3-D volume"
    if np.issubdtype(data.dtype, np.floating):
        n_nan, n_inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
        if n_nan or n_inf:
            return f"contains {n_nan} NaN and {n_inf} infinite voxels"
    if (low := data.min()) == data.max():
        return f"is empty: every voxel is {np.asarray(low).item():g}"
    if not np.isfinite(affine).all():
        return "has a non-finite voxel-to-world affine (NaN or infinite in its header): its geometry is undefined"
    matrix, norms = affine[:3, :3], np.linalg.norm(affine[:3, :3], axis=0)
    if (norms == 0).any() or abs(np.linalg.det(matrix)) <= 1e-6 * float(np.prod(norms)):
        rows = "; ".join(" ".join(f"{v:g}" for v in row) for row in matrix)
        return (
            f"has a singular voxel-to-world affine [{rows}] (e.g. sform and qform all zero): its geometry is undefined"
        )
    return None


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n > 1 else ''}"


def _lines(problems: Mapping[str, str]) -> str:
    return "\n".join(f"  {where}: {problem}" for where, problem in problems.items())


def _raise_for(problems: Mapping[str, str], what: str) -> None:
    """Raise one error listing every problem: FileNotFoundError if all files are missing, else ValueError."""
    message = f"{what}: {_count(len(problems), 'unusable file')}:\n{_lines(problems)}"
    if problems:
        raise (FileNotFoundError if all(p == "missing" for p in problems.values()) else ValueError)(message)


def check_volume(path: str | os.PathLike) -> None:
    """Raise FileNotFoundError if ``path`` does not exist, ValueError naming any other :func:`volume_problem`."""
    problem = volume_problem(path)
    _raise_for({str(path): problem} if problem else {}, f"volume {path}")


def validate_datalist(
    dataset_dir: str | os.PathLike,
    datalist: str | os.PathLike = "datalist.json",
    keys: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> int:
    """Check every volume a datalist names, before any work starts; report all problems at once.

    Args:
        dataset_dir, datalist: as for :func:`read_datalist`.
        keys: lists to check; default all of ``training_A``, ``training_B``, ``validation``, ``test`` present.
        progress: called with a line of text every 25 volumes (e.g. ``print``).

    Returns:
        the number of distinct volumes checked.

    Raises:
        FileNotFoundError: if the datalist is missing, or if every unusable volume is missing.
        ValueError: if the datalist is malformed, lists a volume twice or an unusable one, or a training list is empty.
        KeyError: if one of ``keys`` is not a list of the datalist.
    """
    content = read_datalist(dataset_dir, datalist)
    keys = [k for k in (*TRAINING_KEYS, *PAIRED_KEYS) if k in content] if keys is None else list(keys)
    if unknown := [k for k in keys if k not in content]:
        raise KeyError(f"datalist {_resolve(dataset_dir, datalist)} has no {unknown} list.")
    entries = [entry for key in keys for entry in content[key]]
    paths = dict.fromkeys(str(_resolve(dataset_dir, e[name])) for e in entries for name in PATH_KEYS if name in e)
    in_lists = {}  # empty training lists; volumes listed twice in one list (they would weigh more)
    for key in keys:
        if key in TRAINING_KEYS and not content[key]:
            in_lists[f'"{key}"'] = f"the training list of domain {key[-1]} is empty: nothing to train on"
        for name in ("image", "A", "B"):  # masks may be shared by several entries; the volumes themselves may not
            where: dict[str, list[int]] = {}
            for index, entry in enumerate(content[key]):
                if name in entry:
                    where.setdefault(str(_resolve(dataset_dir, entry[name])), []).append(index)
            for path, indices in where.items():
                if len(indices) > 1:
                    field = f'["{name}"]' if key in PAIRED_KEYS else ""
                    in_lists[f'"{key}"{field}: {path}'] = (
                        f"listed {len(indices)} times (entries {', '.join(map(str, indices))}); list each volume once"
                    )
    problems: dict[str, str] = {}
    for index, path in enumerate(paths, 1):
        if problem := volume_problem(path):
            problems[path] = problem
        if progress and (index % 25 == 0 or index == len(paths)):
            progress(f"checked {index}/{len(paths)} volumes, {len(problems)} unusable")
    what = f"datalist {_resolve(dataset_dir, datalist)}"
    if in_lists:  # reported with the unusable files, if any, in one error
        files = f" and {_count(len(problems), 'unusable file')}" if problems else ""
        lines = _lines({**in_lists, **problems})
        raise ValueError(f"{what}: {_count(len(in_lists), 'problem')} in its lists{files}:\n{lines}")
    _raise_for(problems, what)
    return len(paths)
