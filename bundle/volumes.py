"""Volumes in folders: image files by extension, DICOM series by content (:func:`find_volumes`,
:func:`dicom_series`), and the slice files of one series read as one volume (:class:`DicomSeriesReader`)."""

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
    """A DICOM series: UID (as GDCM splits series), slice files in reading order, number and description of its
    first slice (None / "" where absent)."""

    uid: str
    files: tuple[str, ...]
    number: int | None
    description: str


_NOT_DICOM_SUFFIXES = (*IMAGE_SUFFIXES, ".img", ".img.gz", ".json", ".txt", ".csv", ".md", ".pt", ".png", ".jpg")


def dicom_series(folder: str | os.PathLike) -> list[DicomSeries]:
    """The DICOM series among the files directly inside ``folder``, found by content whatever the extensions, split
    as MONAI's ``ITKReader`` splits them (series details and date), sorted by series number then UID."""
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
    """Sorted volumes directly inside ``folder``: image files (NIfTI, NRRD, MetaImage; an Analyze pair by its
    ``.hdr``) and sub-folders holding a DICOM series (:func:`dicom_series`).

    Raises:
        FileNotFoundError: if the folder does not exist.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {folder} does not exist.")

    def image(path: Path) -> bool:
        name = path.name.lower()
        return path.is_file() and name.endswith(IMAGE_SUFFIXES) and not name.endswith((".img", ".img.gz"))

    return [path for path in sorted(folder.iterdir()) if image(path) or (path.is_dir() and dicom_series(path))]


class DicomSeriesReader(ITKReader):
    """MONAI ``ITKReader`` that reads a list of DICOM slice files as one volume, not as channels (the inputs of
    :func:`bundle.inputs.find_inputs` for a folder of several series)."""

    def verify_suffix(self, filename: Sequence[os.PathLike] | os.PathLike) -> bool:
        """True for two or more files none of which has an image-file extension (a DICOM series)."""
        names = [str(f) for f in filename] if isinstance(filename, (list, tuple)) else [str(filename)]
        return len(names) > 1 and not any(n.lower().endswith(IMAGE_SUFFIXES) for n in names)

    def read(self, data: Sequence[os.PathLike] | os.PathLike, **kwargs: Any) -> Any:
        import itk

        return itk.imread([str(f) for f in data], **{**self.kwargs, **kwargs})


def with_dicom_series_reader(transform: Compose) -> Compose:
    """Register :class:`DicomSeriesReader` in every ``LoadImaged`` of ``transform`` (in place) and return it; without
    ``itk`` nothing is registered (a DICOM series then fails as that one input's problem)."""
    if not optional_import("itk")[1]:
        return transform
    for t in transform.flatten().transforms:
        if isinstance(t, LoadImaged):
            t.register(DicomSeriesReader())
    return transform
