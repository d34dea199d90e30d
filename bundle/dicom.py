"""A synthesized volume written as a DICOM series: one single-frame CT or MR image per slice.

- :func:`write_dicom_series`: CT Image Storage in HU or MR Image Storage; from a DICOM source series its patient,
  study, frame of reference and slice geometry, otherwise new ones and the geometry of the affine (RAS -> LPS);
- :func:`save_dicom_series` (what inference calls): the same, atomically, replacing nothing unless asked;
- :func:`series_description` and :func:`model_version` name the synthesis and the model in SeriesDescription.

Example, ``pseudo_ct`` a (1, X, Y, Z) MetaTensor in HU on the grid of the MR series it was synthesized from::

    description = series_description("CT", "CT", "DicycleGAN", "0.4.2")
    save_dicom_series(pseudo_ct, "out/s01_CT", source_files=mr_files, modality="CT", series_description=description)
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CT_IMAGE_STORAGE", "MR_IMAGE_STORAGE", "model_version", "save_dicom_series", "series_description"]
__all__ += ["write_dicom_series"]

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
_SOP_CLASS = {"CT": CT_IMAGE_STORAGE, "MR": MR_IMAGE_STORAGE}

# carried over from a DICOM source: Patient, Patient Study, General Study, Frame of Reference, and the series-level
# attributes that describe the patient rather than the acquisition
_PATIENT_KEYWORDS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex")
_STUDY_KEYWORDS = tuple(
    "StudyInstanceUID StudyDate StudyTime ReferringPhysicianName StudyID AccessionNumber StudyDescription PatientAge "
    "PatientSize PatientWeight".split()
)
_FRAME_KEYWORDS = ("FrameOfReferenceUID", "PositionReferenceIndicator")
_SERIES_KEYWORDS = ("PatientPosition", "BodyPartExamined", "Laterality")
_TYPE_2 = tuple(
    "PatientName PatientID PatientBirthDate PatientSex StudyDate StudyTime ReferringPhysicianName StudyID "
    "AccessionNumber PositionReferenceIndicator".split()
)
_GEOMETRY_KEYWORDS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")

_PARTIAL = ".partial-"  # <output dir>/.<series name>.partial-<host>-<pid>-<random>: a series being written
_REPLACED = ".replaced-"  # an old output moved aside while its replacement is renamed into place


def model_version(metadata_file: str | os.PathLike | None = None) -> str:
    """The bundle's version (e.g. ``"0.4.2"``), from its ``configs/metadata.json``.

    Args:
        metadata_file: default the one beside this package (whatever ``bundle_root`` says).

    Raises:
        FileNotFoundError: if the file does not exist.
        KeyError: if it has no version.
    """
    if metadata_file is None:
        metadata_file = Path(__file__).resolve().parents[1] / "configs" / "metadata.json"
    metadata = json.loads(Path(metadata_file).read_text(encoding="utf-8"))
    if "version" not in metadata:
        raise KeyError(f"{metadata_file} has no 'version'.")
    return str(metadata["version"])


def series_description(target_kind: str, target_name: str, method: str, version: str) -> str:
    """SeriesDescription of a synthesized series, e.g. ``"pseudo-CT (DicycleGAN, 0.4.2)"`` or
    ``"synthetic T2 (DicycleGAN, 0.4.2)"``, cut to 64 characters (a DICOM LO value).

    Args:
        target_kind: ``"CT"`` or ``"MR"``.
        target_name: the target domain's name, e.g. ``"T2"`` (unused for CT).
        method: ``"DicycleGAN"`` or ``"CycleGAN"``.
        version: the bundle's version (:func:`model_version`).
    """
    what = "pseudo-CT" if target_kind == "CT" else f"synthetic {target_name or 'MR'}"
    return f"{what} ({method}, {version})"[:64]


def _read_source(files: Sequence[str | os.PathLike]) -> list[Any]:
    """The headers (no pixel data) of a source series' slice files; raises naming an unreadable one."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    headers = []
    for f in files:
        try:
            header = pydicom.dcmread(f, stop_before_pixels=True)
        except (InvalidDicomError, OSError) as error:
            raise ValueError(f"source slice {f} cannot be read as DICOM: {error}") from None
        missing = [k for k in (*_GEOMETRY_KEYWORDS, "Rows", "Columns") if k not in header]
        if missing:
            raise ValueError(f"source slice {f} has no {', '.join(missing)}: its geometry cannot be carried over.")
        headers.append(header)
    return headers


def _lps_affine(affine: np.ndarray, space: str) -> np.ndarray:
    """The voxel-to-world affine in DICOM's patient coordinates (LPS)."""
    if space.upper() == "RAS":
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    if space.upper() == "LPS":
        return affine
    raise ValueError(f"affine space must be 'RAS' or 'LPS', got {space!r}.")


def _match_source(headers: list[Any], lps: np.ndarray, shape: tuple[int, int, int], name: str) -> list[Any]:
    """The source slice of each output slice ``k``; raises if the volume is not on the source series' grid."""
    nx, ny, nz = shape
    if len(headers) != nz:
        raise ValueError(f"{name}: the volume has {nz} slices but its source series has {len(headers)} files.")
    inverse = np.linalg.inv(lps)
    axes = lps[:3, :3] / np.linalg.norm(lps[:3, :3], axis=0)
    by_slice: dict[int, Any] = {}
    for header in headers:
        where = header.filename
        if (int(header.Rows), int(header.Columns)) != (ny, nx):
            raise ValueError(
                f"{name}: source slice {where} is {header.Columns} x {header.Rows} pixels, the volume {nx} x {ny}."
            )
        orientation = np.asarray([float(v) for v in header.ImageOrientationPatient]).reshape(2, 3)
        if not np.allclose(orientation, axes[:, :2].T, atol=1e-3):
            raise ValueError(f"{name}: the volume's orientation is not that of source slice {where}.")
        i, j, k = (inverse @ np.asarray([*(float(v) for v in header.ImagePositionPatient), 1.0]))[:3]
        index = round(float(k))
        if abs(i) > 0.05 or abs(j) > 0.05 or abs(k - index) > 0.25 or not 0 <= index < nz or index in by_slice:
            raise ValueError(f"{name}: source slice {where} is not a slice of the volume's grid (voxel {i, j, k}).")
        by_slice[index] = header
    return [by_slice[k] for k in range(nz)]


def _ds(values: Sequence[float]) -> list[Any]:
    """Decimal strings of at most 16 characters (DICOM DS)."""
    from pydicom.valuerep import DS

    return [DS(float(v), auto_format=True) for v in values]


def _pixels(volume: np.ndarray, modality: str, name: str) -> tuple[np.ndarray, float, float]:
    """Unsigned 16-bit stored values and the RescaleSlope, RescaleIntercept that give ``volume`` back.

    CT: HU rounded to integers, intercept -1024 (or the minimum, if lower). MR (arbitrary units): the range spread
    over 0..65535.
    """
    if not np.isfinite(volume).all():
        raise ValueError(f"{name}: the volume has non-finite values; it cannot be written as DICOM.")
    low, high = float(volume.min()), float(volume.max())
    if modality == "CT":
        intercept = float(min(-1024.0, np.floor(low)))
        stored = np.rint(volume) - intercept
        if stored.max() > 65535:
            raise ValueError(f"{name}: HU range {low:.0f}..{high:.0f} does not fit in 16 bits.")
        return stored.astype(np.uint16), 1.0, intercept
    slope = (high - low) / 65535.0 if high > low else 1.0
    slope = float(f"{slope:.6g}") * (1 + 1e-6)  # as DS keeps it, a hair larger so the top value still fits
    stored = np.clip(np.rint((volume - low) / slope), 0, 65535)
    return stored.astype(np.uint16), slope, low


def write_dicom_series(
    volume: np.ndarray | torch.Tensor,
    affine: np.ndarray | torch.Tensor,
    folder: str | os.PathLike,
    modality: str,
    series_description: str,
    source_files: Sequence[str | os.PathLike] | None = None,
    affine_space: str = "RAS",
    patient_id: str | int | None = "",
    patient_name: str | None = "",
    series_number: int | None = None,
    software_version: str = "",
    name: str | None = None,
) -> list[Path]:
    """Write ``volume`` as a new DICOM series into a new ``folder``, one single-frame image per slice; returns the
    files written, in slice order.

    Slice ``k`` is ``volume[..., k]``, its columns along the first axis, its rows along the second. The series gets
    new Series and SOP Instance UIDs, ImageType ``DERIVED\\SECONDARY`` and ``series_description``. With
    ``source_files`` the patient, study and frame of reference attributes are carried over and each slice gets its
    source slice's ImagePositionPatient, ImageOrientationPatient, PixelSpacing and SliceThickness exactly and
    references it (SourceImageSequence); without, a new study and frame of reference, the geometry from ``affine``.

    Args:
        volume: the synthesized volume, (X, Y, Z) or (1, X, Y, Z); HU for CT.
        affine: its voxel-to-world affine (4 x 4), in ``affine_space``.
        folder: the series folder to create; it must not exist.
        modality: ``"CT"`` (CT Image Storage) or ``"MR"`` (MR Image Storage).
        series_description: e.g. :func:`series_description`'s ``"pseudo-CT (DicycleGAN, 0.4.2)"``.
        source_files: the slice files of the DICOM series the volume is on the grid of; None for a non-DICOM source.
        affine_space: ``"RAS"`` (MONAI's default) or ``"LPS"`` (DICOM's).
        patient_id: PatientID (None: empty); with a DICOM source, empty or the source's.
        patient_name: PatientName (e.g. ``"Doe^Jane"``); with a DICOM source, empty or the source's.
        series_number: SeriesNumber; default the source's plus 1000 (1000 without a DICOM source).
        software_version: SoftwareVersions, e.g. the bundle's version.
        name: how error messages name the series (default: ``folder``).

    Raises:
        ValueError: for a modality other than CT or MR, a volume not on the grid of its source series (the message
            names the slice), an unreadable source slice, non-finite values, or patient attributes that contradict
            the source's.
        FileExistsError: if ``folder`` exists.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    name = str(folder) if name is None else name
    patient_id, patient_name = ("" if v is None else str(v) for v in (patient_id, patient_name))
    if modality not in _SOP_CLASS:
        raise ValueError(f"modality must be 'CT' or 'MR', got {modality!r}.")
    array = np.asarray(volume.detach().cpu() if isinstance(volume, torch.Tensor) else volume, dtype=np.float64)
    array = array[0] if array.ndim == 4 and array.shape[0] == 1 else array
    if array.ndim != 3:
        raise ValueError(f"{name}: expected a volume (X, Y, Z) or (1, X, Y, Z), got shape {array.shape}.")
    matrix = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    lps = _lps_affine(matrix, affine_space)
    stored, slope, intercept = _pixels(array, modality, name)
    low, high = float(array.min()), float(array.max())
    nx, ny, nz = array.shape

    common = Dataset()
    sources: list[Any] | None = None
    if source_files:
        sources = _match_source(_read_source(source_files), lps, (nx, ny, nz), name)
        first = sources[0]
        for keyword, given in (("PatientID", patient_id), ("PatientName", patient_name)):
            if given and str(first.get(keyword, "")) != given:
                raise ValueError(
                    f"{name}: {keyword} {given!r} was given but its source series ({first.filename}) has "
                    f"{str(first.get(keyword, ''))!r}; a DICOM source keeps its own patient attributes."
                )
        if "SpecificCharacterSet" in first:
            common.SpecificCharacterSet = first.SpecificCharacterSet
        for keyword in (*_PATIENT_KEYWORDS, *_STUDY_KEYWORDS, *_FRAME_KEYWORDS, *_SERIES_KEYWORDS):
            if keyword in first:
                common[keyword] = first[keyword]
        number = first.get("SeriesNumber")
        default_number = 1000 + (int(number) if number not in (None, "") else 0)
    else:
        now = datetime.datetime.now()
        if not (patient_id + patient_name).isascii():
            common.SpecificCharacterSet = "ISO_IR 192"  # UTF-8
        common.PatientName, common.PatientID = patient_name, patient_id
        common.StudyInstanceUID, common.FrameOfReferenceUID = generate_uid(), generate_uid()
        common.StudyDate, common.StudyTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
        default_number = 1000
    for keyword in (*_TYPE_2, "PatientPosition", "Laterality", "Manufacturer", "AcquisitionNumber"):
        if keyword not in common:  # type 2: present, possibly empty
            setattr(common, keyword, "")

    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    common.SOPClassUID, common.Modality, common.SeriesInstanceUID = _SOP_CLASS[modality], modality, generate_uid()
    common.SeriesNumber = series_number if series_number is not None else default_number
    common.SeriesDescription = series_description
    common.SeriesDate, common.SeriesTime = date, time
    common.ContentDate, common.ContentTime = date, time
    common.InstanceCreationDate, common.InstanceCreationTime = date, time
    common.SoftwareVersions = software_version
    common.DerivationDescription = f"{series_description}: synthesized from the source images, not acquired"[:1024]
    common.BurnedInAnnotation, common.SamplesPerPixel, common.PhotometricInterpretation = "NO", 1, "MONOCHROME2"
    common.Rows, common.Columns = ny, nx
    common.BitsAllocated, common.BitsStored, common.HighBit, common.PixelRepresentation = 16, 16, 15, 0
    common.RescaleIntercept, common.RescaleSlope = _ds([intercept, slope])
    if modality == "CT":
        common.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        common.RescaleType, common.KVP = "HU", ""
        common.WindowCenter, common.WindowWidth = _ds([40.0, 400.0])  # soft tissue
    else:
        common.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
        common.WindowCenter, common.WindowWidth = _ds([(low + high) / 2.0, max(high - low, 1.0)])
        common.ScanningSequence, common.SequenceVariant = "RM", "NONE"  # research mode: not an acquisition
        common.ScanOptions, common.MRAcquisitionType = "", ""
        common.RepetitionTime, common.EchoTime, common.EchoTrainLength = "", "", ""

    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    axes = lps[:3, :3] / spacing
    folder.mkdir(parents=False, exist_ok=False)
    written = []
    for k in range(nz):
        ds = Dataset()
        ds.update(common)
        ds.SOPInstanceUID, ds.InstanceNumber = generate_uid(), k + 1
        if sources is not None:
            source = sources[k]
            for keyword in (*_GEOMETRY_KEYWORDS, "SliceThickness", "SliceLocation"):
                if keyword in source:
                    ds[keyword] = source[keyword]
            reference = Dataset()
            reference.ReferencedSOPClassUID = source.SOPClassUID
            reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
            ds.SourceImageSequence = [reference]
        else:
            ds.ImagePositionPatient = _ds(lps[:3, :3] @ [0.0, 0.0, k] + lps[:3, 3])
            ds.ImageOrientationPatient = _ds([*axes[:, 0], *axes[:, 1]])
            ds.PixelSpacing = _ds([spacing[1], spacing[0]])  # between rows, between columns
            ds.SliceThickness = _ds([spacing[2]])[0]
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        ds.file_meta = meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"IM{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def _alive(host: str, pid: int) -> bool:
    """Whether the process ``pid`` of this host still runs (a process of another host is taken as running)."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists
        pass
    return True


def _remove_stale(target: Path) -> None:
    """Remove the temporary folders of ``target`` that a run of this host which no longer runs left behind."""
    for prefix in (_PARTIAL, _REPLACED):
        for stale in target.parent.glob(f".{target.name}{prefix}*"):
            host_pid = stale.name[len(f".{target.name}{prefix}") :].rpartition("-")[0]  # <host>-<pid>
            host, _, pid_text = host_pid.rpartition("-")
            try:
                pid = int(pid_text)
            except ValueError:
                continue
            if stale.is_dir() and not _alive(host, pid):
                logger.info(f"removing {stale}: the temporary folder of an earlier run that did not finish")
                shutil.rmtree(stale, ignore_errors=True)


def _temporary(target: Path, prefix: str) -> Path:
    return target.with_name(f".{target.name}{prefix}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def save_dicom_series(
    image: torch.Tensor | np.ndarray,
    target: str | os.PathLike,
    affine: np.ndarray | torch.Tensor | None = None,
    overwrite: bool = False,
    **kwargs: Any,
) -> list[Path]:
    """Write ``image`` as the DICOM series folder ``target``, atomically, replacing nothing unless ``overwrite``;
    returns the files written (under ``target``), in slice order.

    :func:`write_dicom_series` writes into ``.<name>.partial-<host>-<pid>-<random>`` beside ``target``, renamed to
    ``target`` when complete (removed on an error). Temporary folders of ``target`` left by runs of this host that
    no longer run are removed first.

    Args:
        image: the volume, (1, X, Y, Z) or (X, Y, Z); a MONAI ``MetaTensor`` carries its affine and space.
        target: the series folder.
        affine: the voxel-to-world affine; default ``image.affine`` (in ``image.meta["space"]``, RAS by default).
        overwrite: replace an existing ``target`` (a folder holding only files, or a file).
        kwargs: :func:`write_dicom_series`'s ``modality``, ``series_description``, ``source_files``, ...

    Raises:
        FileExistsError: if ``target`` exists and not ``overwrite``, or it holds sub-folders (never replaced).
        ValueError: if ``affine`` is None for a volume that is not a MetaTensor; see :func:`write_dicom_series`.
    """
    target = Path(target)
    if affine is None:
        if not hasattr(image, "affine"):
            raise ValueError(f"{target}: give the affine of a volume that is not a MONAI MetaTensor.")
        affine = image.affine
        kwargs.setdefault("affine_space", str(getattr(image, "meta", {}).get("space", "RAS")))
    if os.path.lexists(target):
        if not overwrite:  # find_inputs planned it as new
            raise FileExistsError(f"{target} appeared during the run; it is not replaced")
        if target.is_dir() and any(p.is_dir() for p in target.iterdir()):
            raise FileExistsError(f"{target} holds sub-folders, so it is not a series folder; it is not replaced")
    _remove_stale(target)
    temporary = _temporary(target, _PARTIAL)
    try:
        write_dicom_series(image, affine, temporary, **{"name": str(target), **kwargs})
        if os.path.lexists(target):
            if not overwrite:
                raise FileExistsError(f"{target} appeared during the run; it is not replaced")
            old = _temporary(target, _REPLACED)
            os.rename(target, old)
            try:
                os.rename(temporary, target)
            except OSError:
                os.rename(old, target)  # put it back
                raise
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            try:
                os.rename(temporary, target)  # onto a non-empty folder or a file that appeared meanwhile: fails
            except OSError as error:
                if error.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    raise FileExistsError(f"{target} appeared during the run; it is not replaced") from None
                raise
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    return sorted(target.iterdir())
