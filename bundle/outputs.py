"""Inference outputs: a synthesized volume saved to its planned path without ever replacing a file by accident.

:class:`SaveSynthesisd` writes each volume to a hidden partial file beside its output and links it to its name
(NIfTI with the input's header geometry, NRRD, MetaImage, or a DICOM series through :mod:`bundle.dicom`);
:func:`remove_stale_partials` clears the partial files a killed run left, before the next run writes that output.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bundle.dicom import save_dicom_series
from bundle.settings import as_bool
from monai.config import KeysCollection
from monai.data import NibabelWriter
from monai.data.utils import to_affine_nd
from monai.transforms import MapTransform, SaveImage

__all__ = ["DICOM_FILES_KEY", "OUTPUT_KEY", "SaveSynthesisd", "remove_stale_partials"]

logger = logging.getLogger(__name__)

OUTPUT_KEY = "output"  # the planned output path of an item (bundle.inputs.find_inputs)
DICOM_FILES_KEY = "dicom_files"  # the slice files of a DICOM series input, for a DICOM output of its study


# the temporary name of an output being written: ".<name>.<pid>-<random>.partial<ext>" (before: ".<name>.<hex>.partial")
_PARTIAL = r"\.{name}\.(?:(?P<pid>\d+)-[0-9a-f]{{8}}|[0-9a-f]{{32}})\.partial{ext}"


def _partial_name(target: Path, ext: str) -> Path:
    """Where :class:`SaveSynthesisd` writes ``target`` before linking it to its name: hidden, and naming this
    process, so that a later run can tell a partial file left by a killed run from one being written."""
    return target.with_name(
        f".{target.name[: len(target.name) - len(ext)]}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial{ext}"
    )


def _output_ext(target: Path) -> str:
    """The image-file extension of an output path ("" for another name, e.g. a DICOM output folder)."""
    return next((s for s in (".nii.gz", ".nii", ".nrrd", ".mha") if target.name.endswith(s)), "")


def remove_stale_partials(target: Path) -> None:
    """Remove the partial files of ``target`` whose writer is no longer running (SIGKILL, power loss while saving).

    Only files named as :func:`_partial_name` names this very output are considered, and only those of a process
    that does not exist any more on this machine (or of the older naming without a process id).
    """
    ext = _output_ext(target)
    if not ext or not target.parent.is_dir():  # DICOM folders are written and renamed by bundle.dicom
        return
    pattern = re.compile(_PARTIAL.format(name=re.escape(target.name[: -len(ext)]), ext=re.escape(ext)))
    for path in target.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match is None or (match["pid"] is not None and _running(int(match["pid"]))):
            continue
        try:
            path.unlink()
            logger.info(f"removed {path}, a partial output left by an interrupted run")
        except OSError as error:
            logger.warning(f"could not remove the stale partial output {path}: {error.strerror}")


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (where that cannot be told: assume it does)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only the existence is checked
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


class _GeometryNiftiWriter(NibabelWriter):
    """MONAI's ``NibabelWriter`` that keeps the input's NIfTI header geometry and shape.

    MONAI writes sform and qform both with code 1, and the qform of a sheared affine is only an approximation of it
    (up to centimetres away at the corners), so tools reading one or the other place the output differently. Here
    the sform is the affine with the input's ``sform_code``; the qform is the same affine with the input's
    ``qform_code`` where a qform can hold it (no shear), else it is left out (code 0) with a warning. A NIfTI input
    stored as 4-D with one time point gives a 4-D output with one time point.
    """

    def set_metadata(self, meta_dict: Mapping | None, resample: bool = True, **options: Any) -> None:
        """Keep the header fields of ``meta_dict`` for :meth:`write`, then as ``NibabelWriter``."""
        self._source_header = dict(meta_dict or {})
        super().set_metadata(meta_dict, resample=resample, **options)

    def write(self, filename: os.PathLike | str, verbose: bool = False, **obj_kwargs: Any) -> None:
        """Write ``filename`` with the input's geometry codes (see the class)."""
        import nibabel as nib

        header = getattr(self, "_source_header", {})
        dim = np.asarray(header.get("dim", [])).ravel()
        data = np.asarray(self.data_obj)
        if dim.size > 4 and int(dim[0]) == 4 and int(dim[4]) == 1 and data.ndim == 3:
            data = data[..., None]  # the input's trailing time point of one
        affine = np.eye(4) if self.affine is None else np.asarray(self.affine, dtype=float)
        affine = to_affine_nd(3, affine)
        image = self.create_backend_obj(data, affine=affine, dtype=self.output_dtype, **obj_kwargs)
        # MONAI's default (1, scanner) for inputs without NIfTI codes (DICOM, NRRD, MetaImage)
        sform_code = int(np.asarray(header.get("sform_code", 1)))
        qform_code = int(np.asarray(header.get("qform_code", 1)))
        image.set_sform(affine, code=sform_code)
        columns = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
        if np.allclose(columns.T @ columns, np.eye(3), atol=1e-5):
            image.set_qform(affine, code=qform_code)
        else:
            image.set_qform(None, code=0)
            logger.warning(
                f"{header.get('filename_or_obj', filename)}: its voxel-to-world affine is sheared, which a NIfTI "
                f"qform cannot hold: the output has it exactly in the sform (code {sform_code}), no qform (code 0)"
            )
        nib.save(image, filename)


class SaveSynthesisd(MapTransform):
    """Save ``key`` to the path in ``data["output"]`` (planned by :func:`bundle.inputs.find_inputs`), never
    replacing a file unless ``overwrite``.

    The volume is written by MONAI's ``SaveImage`` to a hidden temporary file in the output folder, then linked
    to its name, which fails if a file appeared there meanwhile; so no existing file is ever truncated. With
    ``output_format="dicom"`` the output path is a folder and the volume becomes a DICOM series in it
    (:func:`bundle.dicom.save_dicom_series`, written to a temporary folder and renamed), in the study of the DICOM
    series it was synthesized from (``data["dicom_files"]``, set by :func:`bundle.inputs.find_inputs`) where there
    is one.

    Args:
        keys: the synthesized image's key.
        output_dtype: data type of the saved volume (NIfTI and the other image files).
        overwrite: replace an existing output.
        output_key: the key of the output path.
        output_format: ``"nifti"`` (an image file named by the output path's extension) or ``"dicom"``.
        dicom: :func:`bundle.dicom.write_dicom_series`'s ``modality``, ``series_description`` and patient
            attributes, for ``"dicom"``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dtype: torch.dtype | np.dtype | None = torch.float32,
        overwrite: bool | str = False,
        output_key: str = OUTPUT_KEY,
        output_format: str = "nifti",
        dicom: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(keys)
        self.output_dtype, self.overwrite, self.output_key = output_dtype, as_bool(overwrite, "overwrite"), output_key
        if output_format not in ("nifti", "dicom"):
            raise ValueError(f"output_format must be 'nifti' or 'dicom', got {output_format!r}.")
        self.output_format, self.dicom = output_format, dict(dicom or {})

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        target = Path(d[self.output_key])
        target.parent.mkdir(parents=True, exist_ok=True)  # here, not before the run: nothing written, no folder
        for key in self.key_iterator(d):
            if self.output_format == "dicom":
                files = d.get(DICOM_FILES_KEY)
                save_dicom_series(d[key], target, overwrite=self.overwrite, source_files=files, **self.dicom)
                logger.info(f"wrote {target}")
                continue
            ext = _output_ext(target) or target.suffix
            written = _partial_name(target, ext)
            nifti = ext in (".nii", ".nii.gz")
            saver = SaveImage(
                output_ext=ext,
                output_dtype=self.output_dtype,
                resample=False,
                separate_folder=False,
                print_log=False,
                writer=_GeometryNiftiWriter if nifti else None,  # the input's header geometry and shape
            )
            try:
                saver(d[key], filename=str(written)[: len(str(written)) - len(ext)])
                if self.overwrite:
                    os.replace(written, target)
                else:
                    try:
                        os.link(written, target)  # fails if the name exists: no race replaces a file
                    except FileExistsError:
                        raise FileExistsError(f"{target} appeared during the run; it is not replaced") from None
                    except OSError:  # a file system without hard links
                        if target.exists():
                            raise FileExistsError(f"{target} appeared during the run; it is not replaced") from None
                        os.replace(written, target)
            finally:
                written.unlink(missing_ok=True)
            logger.info(f"wrote {target}")
        return d
