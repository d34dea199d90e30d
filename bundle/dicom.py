"""A synthesized volume written as a DICOM series, one single-frame CT or MR image per slice: :func:`write_dicom_series`
(atomically: :func:`save_dicom_series`), e.g. ``save_dicom_series(pseudo_ct, "out/s01_CT", source_files=mr_files,
modality="CT", series_description=series_description("CT", "CT", "DicycleGAN", "0.4.2"))``."""

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
_CARRIED_KEYWORDS = (
    "PatientName PatientID IssuerOfPatientID PatientBirthDate PatientSex StudyInstanceUID StudyDate StudyTime "
    "ReferringPhysicianName StudyID AccessionNumber StudyDescription PatientAge PatientSize PatientWeight "
    "FrameOfReferenceUID PositionReferenceIndicator PatientPosition BodyPartExamined Laterality"
).split()
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
        metadata_file: default the one beside this package.

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
    """SeriesDescription of a synthesis, e.g. ``"pseudo-CT (DicycleGAN, 0.4.2)"``, cut to 64 characters (DICOM LO).

    Args:
        target_kind: ``"CT"`` or ``"MR"``.
        target_name: the target domain's name, e.g. ``"T2"`` (unused for CT).
        method: ``"DicycleGAN"`` or ``"CycleGAN"``.
        version: the bundle's version (:func:`model_version`).
    """
    what = "pseudo-CT" if target_kind == "CT" else f"synthetic {target_name or 'MR'}"
    return f"{what} ({method}, {version})"[:64]


def _match_source(files: Sequence[str | os.PathLike], lps: np.ndarray, shape: tuple[int, int, int], name: str) -> list:
    """Each output slice's source header (no pixels); raises naming an unreadable slice or one off the volume's grid."""
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
    """Write ``volume`` as a new DICOM series (ImageType ``DERIVED\\SECONDARY``) into a new ``folder``; returns the
    files, in slice order. Slice ``k`` is ``volume[..., k]``, columns along the first axis. With ``source_files`` the
    patient, study and frame of reference are carried over and each slice gets its source slice's geometry exactly and
    references it (SourceImageSequence); without, new ones, the geometry from ``affine``.

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
        ValueError: for another modality or affine space, an unreadable source slice or one off the volume's grid
            (naming it), non-finite values, or patient attributes that contradict the source's.
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
    lps = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    if affine_space.upper() not in ("RAS", "LPS"):
        raise ValueError(f"affine space must be 'RAS' or 'LPS', got {affine_space!r}.")
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps if affine_space.upper() == "RAS" else lps  # DICOM's patient space
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: the volume has non-finite values; it cannot be written as DICOM.")
    low, high = float(array.min()), float(array.max())
    # unsigned 16-bit stored values: CT integer HU, intercept -1024 (or the minimum, if lower); MR over 0..65535
    if modality == "CT":
        slope, intercept = 1.0, float(min(-1024.0, np.floor(low)))
        stored = np.rint(array) - intercept
        if stored.max() > 65535:
            raise ValueError(f"{name}: HU range {low:.0f}..{high:.0f} does not fit in 16 bits.")
    else:
        slope = (high - low) / 65535.0 if high > low else 1.0
        slope, intercept = float(f"{slope:.6g}") * (1 + 1e-6), low  # as DS keeps it, a hair larger: the top fits
        stored = np.clip(np.rint((array - low) / slope), 0, 65535)
    stored = stored.astype(np.uint16)
    nx, ny, nz = array.shape
    date, time = datetime.datetime.now().strftime("%Y%m%d %H%M%S.%f").split()
    common = Dataset()
    sources = _match_source(source_files, lps, (nx, ny, nz), name) if source_files else None
    if sources is not None:
        first = sources[0]
        for keyword, given in (("PatientID", patient_id), ("PatientName", patient_name)):
            if given and str(first.get(keyword, "")) != given:
                raise ValueError(
                    f"{name}: {keyword} {given!r} was given but its source series ({first.filename}) has "
                    f"{str(first.get(keyword, ''))!r}; a DICOM source keeps its own patient attributes."
                )
        if "SpecificCharacterSet" in first:
            common.SpecificCharacterSet = first.SpecificCharacterSet
        for keyword in _CARRIED_KEYWORDS:
            if keyword in first:
                common[keyword] = first[keyword]
        number = first.get("SeriesNumber")
        default_number = 1000 + (int(number) if number not in (None, "") else 0)
    else:
        if not (patient_id + patient_name).isascii():
            common.SpecificCharacterSet = "ISO_IR 192"  # UTF-8
        common.PatientName, common.PatientID = patient_name, patient_id
        common.StudyInstanceUID, common.FrameOfReferenceUID = generate_uid(), generate_uid()
        common.StudyDate, common.StudyTime = date, time[:6]
        default_number = 1000
    for keyword in (*_TYPE_2, "PatientPosition", "Laterality", "Manufacturer", "AcquisitionNumber"):
        if keyword not in common:  # type 2: present, possibly empty
            setattr(common, keyword, "")
    common.SOPClassUID, common.Modality, common.SeriesInstanceUID = _SOP_CLASS[modality], modality, generate_uid()
    common.SeriesNumber = series_number if series_number is not None else default_number
    common.SeriesDate, common.SeriesTime = date, time
    common.ContentDate, common.ContentTime = date, time
    common.InstanceCreationDate, common.InstanceCreationTime = date, time
    common.SeriesDescription, common.SoftwareVersions = series_description, software_version
    common.DerivationDescription = f"{series_description}: synthesized from the source images, not acquired"[:1024]
    common.BurnedInAnnotation, common.SamplesPerPixel, common.PhotometricInterpretation = "NO", 1, "MONOCHROME2"
    common.Rows, common.Columns = ny, nx
    common.BitsAllocated, common.BitsStored, common.HighBit, common.PixelRepresentation = 16, 16, 15, 0
    common.RescaleIntercept, common.RescaleSlope = _ds([intercept, slope])
    if modality == "CT":
        common.ImageType, common.RescaleType, common.KVP = ["DERIVED", "SECONDARY", "AXIAL"], "HU", ""
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
        written.append(folder / f"IM{k + 1:04d}.dcm")
        ds.save_as(written[-1], enforce_file_format=True)
    return written


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (where that cannot be told: assume it does)."""
    try:
        if os.name == "posix":
            os.kill(pid, 0)  # signal 0: nothing is sent, only the existence is checked
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists
        pass
    return True


def _temporary(target: Path, prefix: str) -> Path:
    return target.with_name(f".{target.name}{prefix}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def save_dicom_series(
    image: torch.Tensor | np.ndarray,
    target: str | os.PathLike,
    affine: np.ndarray | torch.Tensor | None = None,
    overwrite: bool = False,
    **kwargs: Any,
) -> list[Path]:
    """Write ``image`` as the DICOM series folder ``target`` atomically (:func:`write_dicom_series` into a hidden
    ``.<name>.partial-<host>-<pid>-<random>`` beside it, then renamed), replacing nothing unless ``overwrite``; returns
    the files written, in slice order.

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
    for prefix in (_PARTIAL, _REPLACED):  # the temporary folders of target left by runs that no longer run
        for stale in target.parent.glob(f".{target.name}{prefix}*"):
            host, _, pid = stale.name[len(f".{target.name}{prefix}") :].rpartition("-")[0].rpartition("-")
            try:  # a process of another host is taken as running
                alive = host != socket.gethostname() or _running(int(pid))
            except ValueError:
                continue
            if stale.is_dir() and not alive:
                logger.info(f"removing {stale}: the temporary folder of an earlier run that did not finish")
                shutil.rmtree(stale, ignore_errors=True)
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
        shutil.rmtree(temporary, ignore_errors=True)  # left only by an error
    return sorted(target.iterdir())
