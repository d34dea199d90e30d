"""DICOM output (configs/inference.json ``output_format: dicom``, bundle/dicom.py): MR series in, CT series out.

The outputs are read back with pydicom and with SimpleITK's ``ImageSeriesReader``, compared with the NIfTI output of
the same run, and checked with dicom3tools' ``dciodvfy`` where it is installed (CI installs it, see ``.ci/run``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK
import torch
from bundle.dicom import (
    CT_IMAGE_STORAGE,
    MR_IMAGE_STORAGE,
    model_version,
    save_dicom_series,
    series_description,
    write_dicom_series,
)
from bundle.inputs import find_inputs
from bundle.networks import DicycleGenerator
from bundle.outputs import DICOM_FILES_KEY, SaveSynthesisd
from monai.bundle import run
from monai.data import MetaTensor
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut
from tests.bundle_fixtures import root_error

ROOT = Path(__file__).resolve().parents[1]
INFERENCE = [str(ROOT / "configs" / "inference.json")]
TINY = {"ngf": 4, "n_blocks": 1, "pixdim": [2.0, 2.0, 2.0], "sw_batch_size": 8}
PSEUDO_CT = {"domain_b": "CT", "name_b": "CT", "hu_window": [-1000, 2000]}
VERSION = json.loads((ROOT / "configs" / "metadata.json").read_text(encoding="utf-8"))["version"]
MR2 = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "98892003" / "MR2"  # tri-planar pilots


def _models(ckpt_dir: Path) -> None:
    """A tiny MR -> CT generator (tanh output) and the intensity reference."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for seed, (name, activation) in enumerate((("model.pt", "tanh"), ("model_g_ba.pt", None))):
        torch.manual_seed(seed)
        g = DicycleGenerator(ngf=4, n_blocks=1, out_activation=activation, backend="torch")
        torch.save(g.state_dict(), ckpt_dir / name)
    reference = {"A": {"kind": "MR", "mean": 100.0, "std": 20.0}, "B": {"kind": "CT", "hu_window": [-1000, 2000]}}
    (ckpt_dir / "intensity_reference.json").write_text(json.dumps(reference), encoding="utf-8")


def infer(tmp_path: Path, output_dir: Path, **overrides) -> str:
    """Run inference; returns "" or, if it fails, the root error's message (the list of failed inputs)."""
    try:
        run(
            config_file=INFERENCE,
            ckpt_dir=str(tmp_path / "models"),
            output_dir=str(output_dir),
            **{"bundle_root": str(ROOT), **TINY, **PSEUDO_CT, **overrides},
        )
    except Exception as error:
        return str(root_error(error))
    return ""


def _pydicom_mr_series(folder: Path, slices: int = 4) -> list[Path]:
    """A 4-slice MR series made from pydicom's real scanner MR slice (MR_small.dcm, 64 x 64): its header as the
    scanner wrote it, slices 0.8 mm apart along its normal, files without extension."""
    folder.mkdir(parents=True)
    files = []
    for z in range(slices):
        ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{ds.SOPInstanceUID}.{z + 1}"
        ds.InstanceNumber = z + 1
        x, y, position = ds.ImagePositionPatient
        ds.ImagePositionPatient = [x, y, pydicom.valuerep.DS(f"{float(position) + 0.8 * z:.4f}")]
        ds.SliceLocation = ds.ImagePositionPatient[2]
        ds.PixelData = np.roll(ds.pixel_array, 3 * z, axis=1).astype(np.int16).tobytes()
        ds.save_as(folder / f"MR{z:04d}")
        files.append(folder / f"MR{z:04d}")
    return files


def _sitk_mr_series(folder: Path) -> SimpleITK.Image:
    """An oblique MR series written slice by slice with SimpleITK (GDCM)."""
    rng = np.random.default_rng(1)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in (20, 18, 6)], indexing="ij")
    volume = np.where(x**2 + y**2 + z**2 < 0.8, 400 + 200 * x, 20) + rng.normal(0, 5, x.shape)
    image = SimpleITK.GetImageFromArray(volume.astype(np.int16).transpose(2, 1, 0))
    image.SetSpacing((1.8, 1.6, 2.5))
    image.SetOrigin((-30.0, -20.0, 10.0))
    angle = np.deg2rad(20)
    image.SetDirection((np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0, 0, 0, 1))
    folder.mkdir(parents=True)
    writer = SimpleITK.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    uid = "1.2.826.0.1.3680043.2.1125.1.77"
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        for tag, value in {
            "0008|0060": "MR",
            "0010|0010": "Roe^Richard",
            "0010|0020": "SITK-1",
            "0020|000d": f"{uid}.1",
            "0020|000e": f"{uid}.2",
            "0020|0052": f"{uid}.4",
            "0008|0018": f"{uid}.3.{k}",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0037": "\\".join(f"{v:.6f}" for v in (*direction[0::3], *direction[1::3])),
            "0018|0050": f"{image.GetSpacing()[2]:.6f}",
        }.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_)
    return image


def _nifti_mr(path: Path) -> np.ndarray:
    """An oblique NIfTI MR volume; returns its affine (RAS)."""
    angle = np.deg2rad(15)
    rotation = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([2.0, 1.5, 3.0])
    affine[:3, 3] = [-20.0, 15.0, -8.0]
    rng = np.random.default_rng(2)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image((rng.random((16, 14, 5)) * 300).astype(np.float32), affine), path)
    return affine


def _read_series(folder: Path) -> SimpleITK.Image:
    reader = SimpleITK.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _headers(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.iterdir())]


def _assert_valid(folder: Path) -> None:
    """dciodvfy (dicom3tools) reports no error for any file of ``folder``, where it is installed."""
    if shutil.which("dciodvfy") is None:
        return
    for path in sorted(folder.iterdir()):
        report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, encoding="utf-8")
        errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{path}: {errors}"


def _assert_same_grid(written: SimpleITK.Image, source: SimpleITK.Image) -> None:
    assert written.GetSize() == source.GetSize()
    np.testing.assert_allclose(written.GetOrigin(), source.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(written.GetSpacing(), source.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(written.GetDirection(), source.GetDirection(), atol=1e-5)


def _md5s(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def test_mr_series_in_pseudo_ct_series_out_in_the_source_study_and_geometry(tmp_path):
    """The issue's acceptance: DICOM MR series (pydicom's scanner header, SimpleITK-made oblique) and a NIfTI volume
    in, CT Image Storage series out, equal to the NIfTI output within 1 HU; a tri-planar pilot series is named."""
    _models(tmp_path / "models")
    scans = tmp_path / "scans"
    pydicom_files = _pydicom_mr_series(scans / "mr_small")
    sitk_image = _sitk_mr_series(scans / "mr_sitk")
    affine = _nifti_mr(scans / "mr_nifti.nii.gz")
    shutil.copytree(MR2, scans / "MR2")
    out_dicom, out_nifti = tmp_path / "out_dicom", tmp_path / "out_nifti"

    message = infer(tmp_path, out_dicom, input_dir=str(scans), output_format="dicom")
    infer(tmp_path, out_nifti, input_dir=str(scans))
    assert sorted(p.name for p in out_dicom.iterdir()) == ["mr_nifti_CT", "mr_sitk_CT", "mr_small_CT"]
    # MR2's two 3-slice series are tri-planar pilots (no volume grid): named, and the batch went on
    assert "3 of 6 inputs could not be synthesized (3 written)" in message
    pilots = [line for line in message.splitlines() if f"{scans / 'MR2'} [series" in line and "PILOT" in line]
    assert len(pilots) == 2 and all("is not that of source slice" in line for line in pilots), message

    version_description = f"pseudo-CT (DicycleGAN, {VERSION})"
    assert series_description("CT", "CT", "DicycleGAN", VERSION) == version_description
    for name, source_files in (("mr_small", pydicom_files), ("mr_sitk", sorted((scans / "mr_sitk").iterdir()))):
        folder = out_dicom / f"{name}_CT"
        headers = _headers(folder)
        sources = {h.SOPInstanceUID: h for h in (pydicom.dcmread(f) for f in source_files)}
        first = next(iter(sources.values()))
        assert len(headers) == len(sources)
        for h in headers:
            assert h.SOPClassUID == CT_IMAGE_STORAGE and h.Modality == "CT"
            assert h.file_meta.MediaStorageSOPClassUID == CT_IMAGE_STORAGE
            assert list(h.ImageType)[:2] == ["DERIVED", "SECONDARY"]
            assert h.SeriesDescription == version_description
            for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "FrameOfReferenceUID", "StudyDate"):
                assert h.get(keyword) == first.get(keyword), keyword
            assert h.SeriesInstanceUID != first.SeriesInstanceUID
            source = sources[h.SourceImageSequence[0].ReferencedSOPInstanceUID]  # the slice it was made from
            for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
                assert h[keyword].value == source[keyword].value, keyword  # exactly the source's
            assert float(h.RescaleSlope) == 1.0 and h.pixel_array.dtype.kind in "iu"  # integers, HU by rescale
        assert len({h.SeriesInstanceUID for h in headers}) == 1
        uids = {h.SOPInstanceUID for h in headers}
        assert len(uids) == len(headers) and not uids & set(sources)
        # SimpleITK's series reader: the source's grid, and the NIfTI output's HU within 1 HU (rounded: 0.5)
        written = _read_series(folder)
        _assert_same_grid(written, _read_series(source_files[0].parent))
        nifti = SimpleITK.ReadImage(str(out_nifti / f"{name}_CT.nii.gz"))
        _assert_same_grid(written, nifti)
        hu = SimpleITK.GetArrayFromImage(nifti)
        assert hu.std() > 1.0  # a synthesis, not a constant
        np.testing.assert_allclose(SimpleITK.GetArrayFromImage(written), hu, rtol=0, atol=0.5 + 1e-3)
        # pydicom's modality LUT gives the same HU, slice by slice
        for k in range(nifti.GetDepth()):
            point = np.asarray(nifti.TransformIndexToPhysicalPoint((0, 0, k)))
            h = min(headers, key=lambda h: np.linalg.norm(np.asarray(h.ImagePositionPatient, float) - point))
            np.testing.assert_allclose(apply_modality_lut(h.pixel_array, h), hu[k], rtol=0, atol=0.5 + 1e-3)
        _assert_valid(folder)
    _assert_same_grid(_read_series(out_dicom / "mr_sitk_CT"), sitk_image)

    # the NIfTI source: a new study and frame of reference, geometry from the affine (RAS -> LPS), no patient
    folder = out_dicom / "mr_nifti_CT"
    headers = _headers(folder)
    studies = {h.StudyInstanceUID for h in headers}
    assert len(studies) == 1 and len({h.FrameOfReferenceUID for h in headers}) == 1
    assert not studies & {pydicom.dcmread(pydicom_files[0]).StudyInstanceUID, "1.2.826.0.1.3680043.2.1125.1.77.1"}
    assert all(h.PatientID == "" and h.PatientName == "" for h in headers)
    written = _read_series(folder)
    _assert_same_grid(written, SimpleITK.ReadImage(str(scans / "mr_nifti.nii.gz")))
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    np.testing.assert_allclose(written.GetOrigin(), lps[:3, 3], atol=1e-4)
    nifti_hu = SimpleITK.GetArrayFromImage(SimpleITK.ReadImage(str(out_nifti / "mr_nifti_CT.nii.gz")))
    np.testing.assert_allclose(SimpleITK.GetArrayFromImage(written), nifti_hu, rtol=0, atol=0.5 + 1e-3)
    _assert_valid(folder)


def test_dicom_outputs_are_replaced_only_with_overwrite_and_patient_flags_never_contradict_a_dicom_source(tmp_path):
    _models(tmp_path / "models")
    scans, out = tmp_path / "scans", tmp_path / "out"
    _pydicom_mr_series(scans / "mr_small")
    _nifti_mr(scans / "mr_nifti.nii.gz")
    flags = {"patient_id": "12345", "patient_name": "Doe^Jane"}
    # a bundle_root without configs/ (models elsewhere): the model version comes from the bundle's own metadata
    message = infer(tmp_path, out, input_dir=str(scans), output_format="dicom", bundle_root=str(tmp_path), **flags)
    # the NIfTI source takes the flags; the DICOM source keeps its patient and is named with the contradiction
    assert "1 of 2 inputs could not be synthesized (1 written)" in message
    assert f"{scans / 'mr_small'}: inverting or saving failed: ValueError: " in message
    assert "PatientID '12345' was given but its source series" in message and "'4MR1'" in message
    assert sorted(p.name for p in out.iterdir()) == ["mr_nifti_CT"]  # no temporary folder left
    headers = _headers(out / "mr_nifti_CT")
    assert {(h.PatientID, str(h.PatientName)) for h in headers} == {("12345", "Doe^Jane")}
    assert (
        headers[0].SeriesDescription
        == f"pseudo-CT (DicycleGAN, {VERSION})"
        == f"pseudo-CT (DicycleGAN, {model_version()})"
    )

    assert infer(tmp_path, out, input_dir=str(scans), output_format="dicom") == (
        f"1 of 2 inputs could not be synthesized (1 written):\n  {scans / 'mr_nifti.nii.gz'}: output "
        f"{out / 'mr_nifti_CT'} exists and is not replaced; pass --overwrite true to replace it"
    )
    before = _md5s(out / "mr_nifti_CT")
    assert infer(tmp_path, out, input_dir=str(scans), output_format="dicom", overwrite="true") == ""
    assert sorted(p.name for p in out.iterdir()) == ["mr_nifti_CT", "mr_small_CT"]
    replaced = _headers(out / "mr_nifti_CT")
    assert _md5s(out / "mr_nifti_CT").keys() == before.keys() and _md5s(out / "mr_nifti_CT") != before
    assert replaced[0].SeriesInstanceUID != headers[0].SeriesInstanceUID
    assert replaced[0].PatientID == ""  # flags are not remembered


def _ct_volume(shape=(12, 10, 4)) -> MetaTensor:
    affine = torch.tensor([[2.0, 0, 0, -30], [0, 1.5, 0, 20], [0, 0, 3, 5], [0, 0, 0, 1]], dtype=torch.float64)
    values = torch.linspace(-1000, 2000, int(np.prod(shape)), dtype=torch.float32).reshape(1, *shape)
    return MetaTensor(values, affine=affine)


def test_a_series_is_renamed_into_place_when_whole_and_a_stale_temporary_folder_is_removed(tmp_path):
    target = tmp_path / "x_CT"
    dead = subprocess.Popen(["true"])
    dead.wait()
    import socket

    stale = tmp_path / f".x_CT.partial-{socket.gethostname()}-{dead.pid}-0123abcd"  # a killed run's
    stale.mkdir()
    (stale / "IM0001.dcm").write_bytes(b"half a series")
    running = tmp_path / f".x_CT.partial-{socket.gethostname()}-{os.getppid()}-0123abcd"  # a running one's
    running.mkdir()
    other = tmp_path / ".y_CT.partial-elsewhere-1-0123abcd"  # another host's: it may still run
    other.mkdir()
    files = save_dicom_series(_ct_volume(), target, modality="CT", series_description="pseudo-CT (test)")
    assert [p.name for p in files] == ["IM0001.dcm", "IM0002.dcm", "IM0003.dcm", "IM0004.dcm"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["x_CT", running.name, other.name])
    # a failure leaves neither the series nor its temporary folder; the message names the series
    broken = _ct_volume()
    broken[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=f"{tmp_path / 'y_CT'}: the volume has non-finite values"):
        save_dicom_series(broken, tmp_path / "y_CT", modality="CT", series_description="pseudo-CT (test)")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["x_CT", running.name, other.name])


def test_nothing_is_replaced_without_overwrite_and_a_folder_of_folders_never(tmp_path):
    target = tmp_path / "x_CT"
    target.write_bytes(b"someone else's file")  # appeared after planning
    saver = SaveSynthesisd("pred", output_format="dicom", dicom={"modality": "CT", "series_description": "t"})
    with pytest.raises(FileExistsError, match=r"x_CT appeared during the run; it is not replaced"):
        saver({"pred": _ct_volume(), "output": str(target)})
    assert target.read_bytes() == b"someone else's file" and [p.name for p in tmp_path.iterdir()] == ["x_CT"]
    overwriting = SaveSynthesisd(
        "pred", overwrite=True, output_format="dicom", dicom={"modality": "CT", "series_description": "t"}
    )
    overwriting({"pred": _ct_volume(), "output": str(target)})  # asked for: replaced
    assert len(list(target.iterdir())) == 4 and [p.name for p in tmp_path.iterdir()] == ["x_CT"]
    folders = tmp_path / "study"
    (folders / "series1").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="holds sub-folders, so it is not a series folder"):
        overwriting({"pred": _ct_volume(), "output": str(folders)})
    assert (folders / "series1").is_dir()
    with pytest.raises(ValueError, match="output_format must be 'nifti' or 'dicom', got 'dcm'"):
        SaveSynthesisd("pred", output_format="dcm")


def test_a_series_folder_output_never_holds_an_input(tmp_path):
    """With DICOM output the output is a folder: one that holds an input of the run is refused, overwrite or not."""
    folder = tmp_path / "scans"
    affine = np.eye(4)
    for path in (folder / "a.nii.gz", folder / "a_CT" / "b.nii.gz"):
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 4), np.float32), affine), path)
    (folder / "list.json").write_text(
        json.dumps(
            {"domains": {"A": "MR", "B": "CT"}, "test": [{"A": "a.nii.gz", "B": "-"}, {"A": "a_CT/b.nii.gz", "B": "-"}]}
        ),
        encoding="utf-8",
    )
    inputs = find_inputs(
        datalist=str(folder / "list.json"), output_dir=str(folder), output_postfix="CT", output_ext="", overwrite=True
    )
    assert inputs.failures == {
        str(folder / "a.nii.gz"): f"its output {folder / 'a_CT'} is an input of this run; choose another output_dir"
    }
    assert [Path(e["output"]).name for e in inputs.good] == ["b_CT"]


def test_series_inputs_carry_their_slice_files_for_the_dicom_output(tmp_path):
    files = _pydicom_mr_series(tmp_path / "scans" / "mr_small")
    inputs = find_inputs(input_dir=str(tmp_path / "scans"), output_dir=str(tmp_path / "out"), output_ext="")
    assert [sorted(e[DICOM_FILES_KEY]) for e in inputs.good] == [sorted(str(f) for f in files)]


def test_an_mr_target_is_mr_image_storage_and_keeps_its_values(tmp_path):
    volume = np.random.default_rng(3).normal(500.0, 50.0, (10, 8, 3))
    affine = np.array([[0, 0, 1.2, 4], [1.0, 0, 0, -3], [0, 0.9, 0, 7], [0, 0, 0, 1]])
    description = series_description("MR", "T2", "CycleGAN", "1.0")
    assert description == "synthetic T2 (CycleGAN, 1.0)"
    files = write_dicom_series(volume, affine, tmp_path / "t2", "MR", description, patient_name="Müller^Jörg")
    headers = [pydicom.dcmread(f) for f in files]
    assert {h.SOPClassUID for h in headers} == {MR_IMAGE_STORAGE}
    assert headers[0].SpecificCharacterSet == "ISO_IR 192" and headers[0].PatientName == "Müller^Jörg"
    for k, h in enumerate(headers):
        np.testing.assert_allclose(apply_modality_lut(h.pixel_array, h), volume[:, :, k].T, rtol=0, atol=0.01)
    written = _read_series(tmp_path / "t2")
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    np.testing.assert_allclose(written.GetOrigin(), lps[:3, 3], atol=1e-4)
    np.testing.assert_allclose(written.GetSpacing(), [1.0, 0.9, 1.2], atol=1e-5)
    np.testing.assert_allclose(np.reshape(written.GetDirection(), (3, 3)), lps[:3, :3] / [1.0, 0.9, 1.2], atol=1e-5)
    _assert_valid(tmp_path / "t2")
    with pytest.raises(ValueError, match="modality must be 'CT' or 'MR', got 'PT'"):
        write_dicom_series(volume, affine, tmp_path / "pt", "PT", description)
    with pytest.raises(FileExistsError):
        write_dicom_series(volume, affine, tmp_path / "t2", "MR", description)
