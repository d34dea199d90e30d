"""Volumes in folders: image files by extension, DICOM series by content, and a series read as one volume.

- :func:`find_volumes` lists the volumes directly inside a folder: NIfTI, NRRD and MetaImage files, and the
  sub-folders that hold a DICOM series;
- :func:`dicom_series` finds the DICOM series among a folder's files whatever their extensions, split as MONAI's
  ``ITKReader`` splits them;
- :class:`DicomSeriesReader` reads the slice files of one series (a list of paths) as one volume, and
  :func:`with_dicom_series_reader` registers it in a preprocessing's ``LoadImaged``.

Example::

    for series in dicom_series("scans/patient01"):
        print(series.number, series.description, len(series.files))
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from bundle.datalist import IMAGE_SUFFIXES
from monai.data import ITKReader
from monai.transforms import Compose, LoadImaged
from monai.utils import optional_import

__all__ = ["DicomSeries", "DicomSeriesReader", "dicom_series", "find_volumes", "with_dicom_series_reader"]


class DicomSeries(NamedTuple):
    """One DICOM series of a folder: its series UID (as ITK/GDCM splits series), slice files in reading order,
    and the series number and description of its first slice (None / "" where absent)."""

    uid: str
    files: tuple[str, ...]
    number: int | None
    description: str


_NOT_DICOM_SUFFIXES = (*IMAGE_SUFFIXES, ".img", ".img.gz", ".json", ".txt", ".csv", ".md", ".pt", ".png", ".jpg")


def dicom_series(folder: str | os.PathLike) -> list[DicomSeries]:
    """The DICOM series among the files directly inside ``folder``, found by content, whatever the extensions.

    Series are split as MONAI's ``ITKReader`` splits them (``itk.GDCMSeriesFileNames`` with series details and the
    series date), so each one is what ``LoadImage`` reads from a folder holding only it.

    Args:
        folder: the folder.

    Returns:
        The series, sorted by series number then UID; empty if there is none.
    """
    folder = Path(folder)
    if not any(p.is_file() and not p.name.lower().endswith(_NOT_DICOM_SUFFIXES) for p in folder.iterdir()):
        return []  # only known non-DICOM files: spare GDCM the scan (and its warning)
    import itk
    import SimpleITK

    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(True)
    names.AddSeriesRestriction("0008|0021")  # series date, as monai.data.ITKReader
    names.SetDirectory(str(folder))
    series = []
    for uid in names.GetSeriesUIDs():
        files = tuple(str(f) for f in names.GetFileNames(uid))
        if not files:
            continue
        reader = SimpleITK.ImageFileReader()
        reader.SetFileName(files[0])
        number, description = None, ""
        try:
            reader.ReadImageInformation()
            if reader.HasMetaDataKey("0020|0011") and reader.GetMetaData("0020|0011").strip().isdigit():
                number = int(reader.GetMetaData("0020|0011").strip())
            if reader.HasMetaDataKey("0008|103e"):
                description = reader.GetMetaData("0008|103e").strip()
        except RuntimeError:  # unreadable header: the screening will name the problem
            pass
        series.append(DicomSeries(str(uid), files, number, description))
    return sorted(series, key=lambda s: (s.number is None, s.number or 0, s.uid))


def find_volumes(folder: str | os.PathLike) -> list[Path]:
    """Volumes directly inside ``folder``: image files (NIfTI, NRRD, MetaImage) and DICOM series sub-folders.

    A sub-folder is a DICOM series folder when it holds DICOM series (found by content, see :func:`dicom_series`),
    whatever its files' extensions.

    Args:
        folder: the folder.

    Returns:
        sorted paths.

    Raises:
        FileNotFoundError: if the folder does not exist.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {folder} does not exist.")
    volumes = []
    for path in sorted(folder.iterdir()):
        # an Analyze/NIfTI pair is listed once, by its header (.hdr)
        if (
            path.is_file()
            and path.name.lower().endswith(IMAGE_SUFFIXES)
            and not path.name.lower().endswith((".img", ".img.gz"))
        ):
            volumes.append(path)
        elif path.is_dir() and dicom_series(path):
            volumes.append(path)
    return volumes


class DicomSeriesReader(ITKReader):
    """MONAI ``ITKReader`` that reads a list of DICOM slice files as one series (one volume), not as channels.

    :func:`bundle.inputs.find_inputs` gives each series of a folder holding several as the list of its files;
    :func:`with_dicom_series_reader` registers this reader in a preprocessing's ``LoadImaged``.
    """

    def verify_suffix(self, filename: Sequence[os.PathLike] | os.PathLike) -> bool:
        """True for two or more files none of which has an image-file extension (a DICOM series)."""
        names = [str(f) for f in filename] if isinstance(filename, (list, tuple)) else [str(filename)]
        return len(names) > 1 and not any(n.lower().endswith(IMAGE_SUFFIXES) for n in names)

    def read(self, data: Sequence[os.PathLike] | os.PathLike, **kwargs: Any) -> Any:
        """Read the files as one series."""
        import itk

        return itk.imread([str(f) for f in data], **{**self.kwargs, **kwargs})


def with_dicom_series_reader(transform: Compose) -> Compose:
    """Register :class:`DicomSeriesReader` in every ``LoadImaged`` of ``transform`` (in place).

    Without ``itk`` nothing is registered: NIfTI, NRRD and MetaImage files still load, and a DICOM series fails as
    that one input's problem (MONAI's ``ITKReader`` refuses to be built without ``itk``).

    Args:
        transform: a preprocessing, e.g. :func:`bundle.data.volume_preprocessing`.

    Returns:
        The same transform.
    """
    if not optional_import("itk")[1]:
        return transform
    for t in transform.flatten().transforms:
        if isinstance(t, LoadImaged):
            t.register(DicomSeriesReader())
    return transform
