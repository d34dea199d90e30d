"""Inference outputs: :class:`SaveSynthesisd` saves a synthesized volume to its planned path without ever replacing
a file by accident; :func:`remove_stale_partials` clears the partial files a killed run left."""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from bundle.dicom import _running, save_dicom_series
from bundle.settings import as_bool
from monai.config import KeysCollection
from monai.data import NibabelWriter
from monai.data.utils import to_affine_nd
from monai.transforms import MapTransform, SaveImage

__all__ = ["DICOM_FILES_KEY", "OUTPUT_KEY", "SaveSynthesisd", "remove_stale_partials"]

logger = logging.getLogger(__name__)

OUTPUT_KEY = "output"  # the planned output path of an item (bundle.inputs.find_inputs)
DICOM_FILES_KEY = "dicom_files"  # the slice files of a DICOM series input, for a DICOM output of its study

# an output being written: ".<name>.<pid>-<random>.partial<ext>" (older runs: ".<name>.<32 hex>.partial<ext>")
_PARTIAL = r"\.{name}\.(?:(?P<pid>\d+)-[0-9a-f]{{8}}|[0-9a-f]{{32}})\.partial{ext}"


def _output_ext(target: Path) -> str:
    """The image-file extension of an output path ("" for another name, e.g. a DICOM output folder)."""
    return next((s for s in (".nii.gz", ".nii", ".nrrd", ".mha") if target.name.endswith(s)), "")


def remove_stale_partials(target: Path) -> None:
    """Remove the partial files of ``target`` whose process no longer exists on this machine (a killed run's), and
    those of the older naming without a process id."""
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


class _GeometryNiftiWriter(NibabelWriter):
    """MONAI's ``NibabelWriter`` keeping the input's NIfTI codes and shape: the sform with its ``sform_code``, the qform
    with its ``qform_code`` unless sheared (then code 0, with a warning); a 4-D input of one time point stays 4-D."""

    def set_metadata(self, meta_dict: Mapping | None, resample: bool = True, **options: Any) -> None:
        self._source_header = dict(meta_dict or {})  # for write
        super().set_metadata(meta_dict, resample=resample, **options)

    def write(self, filename: os.PathLike | str, verbose: bool = False, **obj_kwargs: Any) -> None:
        header = getattr(self, "_source_header", {})
        dim = np.asarray(header.get("dim", [])).ravel()
        data = np.asarray(self.data_obj)
        if dim.size > 4 and int(dim[0]) == 4 and int(dim[4]) == 1 and data.ndim == 3:
            data = data[..., None]  # the input's trailing time point of one
        affine = to_affine_nd(3, np.eye(4) if self.affine is None else np.asarray(self.affine, dtype=float))
        image = self.create_backend_obj(data, affine=affine, dtype=self.output_dtype, **obj_kwargs)
        # MONAI's default (1, scanner) for inputs without NIfTI codes (DICOM, NRRD, MetaImage)
        sform_code, qform_code = (int(np.asarray(header.get(k, 1))) for k in ("sform_code", "qform_code"))
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
    """Save ``keys`` to the path in ``data["output"]``, never replacing a file unless ``overwrite`` (a hidden temporary
    file, then hard-linked to its name). With ``output_format="dicom"``, a DICOM series folder
    (:func:`bundle.dicom.save_dicom_series`), in the study of its source series (``data["dicom_files"]``) if any.

    Args:
        keys, output_key: the synthesized image's key and the output path's key.
        output_dtype: data type of the saved image file.
        overwrite: replace an existing output.
        output_format: ``"nifti"`` (an image file named by the output path's extension) or ``"dicom"``.
        dicom: :func:`bundle.dicom.write_dicom_series`'s ``modality``, ``series_description``, patient attributes.

    Raises:
        ValueError: for another ``output_format``.
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
            stem = target.name[: len(target.name) - len(ext)]
            written = target.with_name(f".{stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial{ext}")
            writer = _GeometryNiftiWriter if ext in (".nii", ".nii.gz") else None  # the input's geometry, shape
            options = {"resample": False, "separate_folder": False, "print_log": False}
            saver = SaveImage(output_ext=ext, output_dtype=self.output_dtype, writer=writer, **options)
            try:
                saver(d[key], filename=str(written)[: len(str(written)) - len(ext)])
                if self.overwrite:
                    os.replace(written, target)
                else:
                    try:
                        os.link(written, target)  # fails if the name exists: no race replaces a file
                    except OSError as error:  # the name exists, or a file system without hard links
                        if isinstance(error, FileExistsError) or target.exists():
                            raise FileExistsError(f"{target} appeared during the run; it is not replaced") from None
                        os.replace(written, target)
            finally:
                written.unlink(missing_ok=True)
            logger.info(f"wrote {target}")
        return d
