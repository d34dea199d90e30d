"""Inference never loses data and one bad input never stops the batch (configs/inference.json, bundle/inputs.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom.data as pydicom_data  # its test data holds real scanner DICOM
import pytest
import torch
from bundle.inputs import (
    InferenceInputs,
    TolerantDataset,
    TolerantEvaluator,
    find_inputs,
    prepare_output_dir,
    raise_for_failures,
)
from bundle.networks import DicycleGenerator
from bundle.outputs import SaveSynthesisd
from monai.bundle import run
from tests.bundle_fixtures import root_error

ROOT = Path(__file__).resolve().parents[1]
INFERENCE = [str(ROOT / "configs" / "inference.json")]
TINY = {"ngf": 4, "n_blocks": 1, "pixdim": [2.0, 2.0, 2.0], "sw_batch_size": 8}
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _head(shape=(24, 28, 12), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = (x / 0.8) ** 2 + (y / 0.8) ** 2 + (z / 0.8) ** 2 <= 1
    return (np.where(inside, 100 + 50 * x, 0.0) + np.abs(rng.normal(0, 3, shape))).astype(np.float32)


def _models(ckpt_dir: Path) -> None:
    """Tiny G_AB and G_BA and the intensity reference."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(("model.pt", "model_g_ba.pt")):
        torch.manual_seed(seed)
        torch.save(DicycleGenerator(ngf=4, n_blocks=1, backend="torch").state_dict(), ckpt_dir / name)
    reference = {"A": {"kind": "MR", "mean": 100.0, "std": 20.0}, "B": {"kind": "MR", "mean": 500.0, "std": 50.0}}
    (ckpt_dir / "intensity_reference.json").write_text(json.dumps(reference), encoding="utf-8")


def _save(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(_head(seed=seed), AFFINE), path)
    return path


def _md5s(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def infer(tmp_path: Path, output_dir: Path, **overrides) -> None:
    run(
        config_file=INFERENCE,
        bundle_root=str(ROOT),
        ckpt_dir=str(tmp_path / "models"),
        output_dir=str(output_dir),
        **{**TINY, **overrides},
    )


def infer_failing(tmp_path: Path, output_dir: Path, **overrides) -> str:
    """Run inference that must fail; returns the root error's message."""
    with pytest.raises(Exception) as caught:
        infer(tmp_path, output_dir, **overrides)
    return str(root_error(caught.value))


# ------------------------------------------------------------------------------------ item 1: nothing overwritten


def test_output_dir_equal_to_input_dir_is_refused_and_a_real_t2_stays_byte_identical(tmp_path):
    """The reported case: output_dir == input_dir holding good_PD and a real T2 named good_PD_T2."""
    _models(tmp_path / "models")
    folder = tmp_path / "scans"
    _save(folder / "good_PD.nii.gz")
    _save(folder / "good_PD_T2.nii.gz", seed=7)  # a real T2, not an output
    before = _md5s(folder)
    for _ in range(2):  # a second run neither
        message = infer_failing(tmp_path, folder, input_dir=str(folder))
        assert "output_dir" in message and "is input_dir" in message and len(message.splitlines()) == 1
        assert _md5s(folder) == before  # nothing replaced, nothing added (no _T2_T2)


def test_an_existing_file_is_replaced_only_with_overwrite(tmp_path):
    _models(tmp_path / "models")
    folder = tmp_path / "scans"
    source = _save(folder / "good_PD.nii.gz")
    _save(folder / "good_PD_T2.nii.gz", seed=7)
    before = _md5s(folder)
    message = infer_failing(tmp_path, folder, input_file=str(source))
    assert "1 of 1 inputs could not be synthesized (0 written)" in message
    assert f"{source}: output {folder / 'good_PD_T2.nii.gz'} exists and is not replaced" in message
    assert "--overwrite true" in message
    assert _md5s(folder) == before
    infer(tmp_path, folder, input_file=str(source), overwrite="true")  # asked for: replaced
    after = _md5s(folder)
    assert after["good_PD.nii.gz"] == before["good_PD.nii.gz"]
    assert after["good_PD_T2.nii.gz"] != before["good_PD_T2.nii.gz"]
    assert sorted(after) == sorted(before) and not list(folder.glob(".*"))  # no temporary file left


def test_an_input_is_never_replaced_even_with_overwrite(tmp_path):
    """A datalist may list a volume and, beside it, a file named like its output: that input is kept."""
    _models(tmp_path / "models")
    folder = tmp_path / "scans"
    _save(folder / "a.nii.gz")
    _save(folder / "a_T2.nii.gz", seed=3)
    entries = [{"A": "a.nii.gz", "B": "a.nii.gz"}, {"A": "a_T2.nii.gz", "B": "a_T2.nii.gz"}]
    (folder / "list.json").write_text(
        json.dumps({"domains": {"A": "PD", "B": "T2"}, "test": entries}), encoding="utf-8"
    )
    before = _md5s(folder)
    message = infer_failing(
        tmp_path, folder, input_datalist=str(folder / "list.json"), dataset_dir=str(folder), overwrite=True
    )
    assert f"{folder / 'a.nii.gz'}: its output {folder / 'a_T2.nii.gz'} is an input of this run" in message
    after = _md5s(folder)
    assert {k: after[k] for k in before} == before
    assert sorted(set(after) - set(before)) == ["a_T2_T2.nii.gz"]  # the listed a_T2 itself was synthesized


def test_an_output_folder_inside_the_input_folder_is_not_scanned_by_a_later_run(tmp_path):
    _models(tmp_path / "models")
    folder = tmp_path / "scans"
    _save(folder / "good_PD.nii.gz")
    _save(folder / "good_PD_T2.nii.gz", seed=7)
    out = folder / "synth"
    infer(tmp_path, out, input_dir=str(folder))
    assert sorted(p.name for p in out.iterdir()) == ["good_PD_T2.nii.gz", "good_PD_T2_T2.nii.gz"]
    first = _md5s(folder)
    infer(tmp_path, out, input_dir=str(folder), overwrite=True)  # again, asked to replace its own outputs
    assert sorted(p.name for p in out.iterdir()) == ["good_PD_T2.nii.gz", "good_PD_T2_T2.nii.gz"]  # no _T2_T2_T2
    assert {k: v for k, v in _md5s(folder).items() if not k.startswith("synth")} == {
        k: v for k, v in first.items() if not k.startswith("synth")
    }


def test_two_inputs_with_one_output_name_do_not_overwrite_each_other(tmp_path):
    folder = tmp_path / "scans"
    _save(folder / "a.nii")
    _save(folder / "a.nii.gz", seed=1)
    inputs = find_inputs(input_dir=str(folder), output_dir=str(tmp_path / "out"), output_postfix="T2")
    assert [e["output"] for e in inputs.good] == [str((tmp_path / "out" / "a_T2.nii.gz").resolve())]
    assert "would also be the output of" in inputs.failures[str(folder / "a.nii.gz")]


def test_save_never_replaces_a_file_that_appeared_after_planning(tmp_path):
    target = tmp_path / "out" / "x_T2.nii.gz"
    target.parent.mkdir()
    target.write_bytes(b"someone else's file")
    image = torch.as_tensor(_head())[None]
    with pytest.raises(FileExistsError, match=r"x_T2\.nii\.gz appeared during the run; it is not replaced"):
        SaveSynthesisd("pred")({"pred": image, "output": str(target)})
    assert target.read_bytes() == b"someone else's file"
    assert [p.name for p in target.parent.iterdir()] == ["x_T2.nii.gz"]  # the temporary file is gone
    SaveSynthesisd("pred", overwrite=True)({"pred": image, "output": str(target)})
    assert nib.load(target).shape[:3] == image.shape[1:]


# ------------------------------------------------------------------------ item 6: non-writable output folder


def test_an_output_folder_that_cannot_be_created_is_reported_in_one_line_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x", encoding="utf-8")
    # input_dir does not exist either: the output folder is checked first, before any input is looked at
    message = infer_failing(tmp_path, blocker / "out", input_dir=str(tmp_path / "missing"))
    assert message.startswith(f"output_dir {blocker / 'out'} cannot be created") and len(message.splitlines()) == 1
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        prepare_output_dir(blocker)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_output_folder_is_reported_in_one_line(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match=f"^output_dir {folder} is not writable: Permission denied.$"):
            prepare_output_dir(folder)
    finally:
        folder.chmod(0o700)


# --------------------------------------------------------------- item 2: one bad volume never stops the batch


def _nifti_with_header(path: Path, **fields) -> Path:
    """A good volume whose header fields are then set as given (nibabel would otherwise fix the geometry)."""
    image = nib.Nifti1Image(_head(), AFFINE)
    header = image.header.copy()
    for name, value in fields.items():
        header[name] = value
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), None, header=header), path)
    return path


def _zero_geometry(path: Path) -> Path:
    zero = dict.fromkeys(("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z"), 0)
    return _nifti_with_header(path, srow_x=0, srow_y=0, srow_z=0, sform_code=1, qform_code=1, **zero)


def _nan_geometry(path: Path) -> Path:
    return _nifti_with_header(path, srow_x=[np.nan, 0, 0, 0], sform_code=1)


def test_singular_or_non_finite_geometry_is_screened_and_the_volume_after_it_is_written(tmp_path):
    _models(tmp_path / "models")
    folder = tmp_path / "scans"
    folder.mkdir()
    _zero_geometry(folder / "a_zero.nii.gz")  # today: Orientationd "Unable to find out axis 0.0" kills the run
    _nan_geometry(folder / "b_nan.nii.gz")
    _save(folder / "c_good.nii.gz")
    message = infer_failing(tmp_path, tmp_path / "out", input_dir=str(folder))
    assert "2 of 3 inputs could not be synthesized (1 written)" in message
    assert f"{folder / 'a_zero.nii.gz'}: has a singular voxel-to-world affine" in message
    assert f"{folder / 'b_nan.nii.gz'}: has a non-finite voxel-to-world affine" in message
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["c_good_T2.nii.gz"]


def test_a_failure_while_preprocessing_synthesizing_or_saving_one_volume_is_recorded_and_the_batch_goes_on():
    from monai.data import DataLoader
    from monai.inferers import SimpleInferer

    def preprocess(entry):
        if entry["source"] == "bad_input":
            raise ValueError("cannot preprocess this one")
        return {**entry, "image": torch.full((1, 4, 4), float(entry["value"]))}

    class Network(torch.nn.Module):
        def forward(self, x):
            if (x == 2).all():
                raise RuntimeError("out of memory on this one")
            return x * 10

    saved = []

    def save(data):
        if data["source"] == "unsavable":
            raise PermissionError("disk full")
        saved.append((data["source"], float(data["pred"].mean())))
        return data

    names = ["first", "bad_input", "bad_network", "unsavable", "last"]
    entries = [{"source": name, "image": "", "value": i} for i, name in enumerate(names)]
    inputs = InferenceInputs(good=entries)
    evaluator = TolerantEvaluator(
        inputs=inputs,
        device=torch.device("cpu"),
        val_data_loader=DataLoader(TolerantDataset(entries, preprocess), batch_size=1),
        network=Network(),
        inferer=SimpleInferer(),
        postprocessing=save,
    )
    evaluator.run()
    assert saved == [("first", 0.0), ("last", 40.0)]
    assert inputs.failures == {
        "bad_input": "preprocessing failed: ValueError: cannot preprocess this one",
        "bad_network": "synthesis failed: RuntimeError: out of memory on this one",
        "unsavable": "inverting or saving failed: PermissionError: disk full",
    }
    with pytest.raises(RuntimeError, match=r"3 of 5 inputs could not be synthesized \(2 written\)"):
        raise_for_failures(inputs)


def test_a_saving_failure_in_the_workflow_names_the_volume_and_the_next_one_is_written(tmp_path):
    _models(tmp_path / "models")
    folder = tmp_path / "scans"
    _save(folder / "a.nii.gz")
    _save(folder / "b.nii.gz", seed=1)
    (tmp_path / "out" / "a_T2.nii.gz").mkdir(parents=True)  # a folder where a's output goes
    message = infer_failing(tmp_path, tmp_path / "out", input_dir=str(folder), overwrite=True)
    assert f"{folder / 'a.nii.gz'}: inverting or saving failed: IsADirectoryError" in message
    assert (tmp_path / "out" / "b_T2.nii.gz").is_file() and (tmp_path / "out" / "a_T2.nii.gz").is_dir()


# ------------------------------------------------------------------------- item 3: DICOM series by content

DICOMDIR_TESTS = Path(pydicom_data.__file__).parent / "test_files" / "dicomdirtests"
CT5N = DICOMDIR_TESTS / "98892001" / "CT5N"  # one CT series, 5 slices of 16 x 16, files without extension
MR2 = DICOMDIR_TESTS / "98892003" / "MR2"  # two 3-slice MR series and a 1-slice localizer in one folder


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_a_series_folder_whose_slices_have_no_extension_is_synthesized(tmp_path):
    _models(tmp_path / "models")
    _copy(CT5N, tmp_path / "scans" / "CT5N")
    assert not any("." in p.name for p in (tmp_path / "scans" / "CT5N").iterdir())
    infer(tmp_path, tmp_path / "out", input_dir=str(tmp_path / "scans"))
    written = nib.load(tmp_path / "out" / "CT5N_T2.nii.gz")
    assert written.shape == (16, 16, 5) and np.isfinite(written.get_fdata()).all()


def test_every_series_of_a_mixed_folder_is_synthesized_or_named(tmp_path):
    _models(tmp_path / "models")
    folder = _copy(MR2, tmp_path / "scans" / "MR2")
    message = infer_failing(tmp_path, tmp_path / "out", input_dir=str(tmp_path / "scans"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["MR2_s2-1_T2.nii.gz", "MR2_s2-2_T2.nii.gz"]
    assert "1 of 3 inputs could not be synthesized (2 written)" in message
    assert f"{folder} [series " in message and "FAST LOCALIZER]: is a single 2-D slice" in message
    for name in ("MR2_s2-1_T2.nii.gz", "MR2_s2-2_T2.nii.gz"):
        assert nib.load(tmp_path / "out" / name).shape == (16, 16, 3)
    first, second = (
        np.asarray(nib.load(tmp_path / "out" / n).dataobj) for n in ("MR2_s2-1_T2.nii.gz", "MR2_s2-2_T2.nii.gz")
    )
    assert not np.allclose(first, second)  # two different series, not one read twice


@pytest.mark.parametrize("given", ["input_dir", "input_file"])
def test_a_series_folder_itself_as_input_just_works(tmp_path, given):
    _models(tmp_path / "models")
    folder = _copy(CT5N, tmp_path / "CT5N")
    infer(tmp_path, tmp_path / "out", **{given: str(folder)})
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["CT5N_T2.nii.gz"]
    assert nib.load(tmp_path / "out" / "CT5N_T2.nii.gz").shape == (16, 16, 5)


def test_a_mixed_series_folder_as_input_file_gives_every_series(tmp_path):
    inputs = find_inputs(input_file=str(MR2), output_dir=str(tmp_path), output_postfix="T2")
    assert sorted(Path(e["output"]).name for e in inputs.good) == ["MR2_s2-1_T2.nii.gz", "MR2_s2-2_T2.nii.gz"]
    assert all(len(e["image"]) == 3 for e in inputs.good) and len(inputs.failures) == 1


# ------------------------------------------------------------------------------------------ acceptance


def _write_dicom_series(volume: np.ndarray, spacing: float, folder: Path, series: str, number: int) -> None:
    """One file per axial slice, without extension, with the tags a reader needs to rebuild the geometry."""
    import SimpleITK

    folder.mkdir(parents=True, exist_ok=True)
    image = SimpleITK.GetImageFromArray(volume.astype(np.int16).transpose(2, 1, 0))
    image.SetSpacing((spacing,) * 3)
    writer = SimpleITK.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")  # the files have no extension to choose it by
    for z in range(image.GetDepth()):
        slice_ = image[:, :, z]
        for tag, value in {
            "0008|0060": "MR",
            "0020|000d": f"{series}.1",
            "0020|000e": f"{series}.2",
            "0020|0011": str(number),
            "0008|0018": f"{series}.3.{z}",
            "0020|0013": str(z + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, z))),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0018|0050": f"{spacing:.6f}",
        }.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{number}{z:04d}"))
        writer.Execute(slice_)


def test_a_mixed_folder_writes_every_good_output_names_every_bad_input_and_changes_no_file(tmp_path):
    """The issue's acceptance test, through the command line."""
    import subprocess
    import sys

    _models(tmp_path / "models")
    scans, out = tmp_path / "scans", tmp_path / "out"
    _save(scans / "good1_PD.nii.gz")
    _save(scans / "good1_PD_T2.nii.gz", seed=7)  # a real T2 named like an output of good1_PD
    _save(scans / "good2.nii.gz", seed=1)
    _save(out / "taken_T2.nii.gz", seed=2)  # an earlier output: not replaced
    _save(scans / "taken.nii.gz", seed=3)
    _zero_geometry(scans / "zero_geometry.nii.gz")
    _nan_geometry(scans / "nan_geometry.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((8, 8), np.float32), AFFINE), scans / "flat.nii.gz")
    (scans / "broken.nii.gz").write_bytes(b"\x1f\x8b not gzip")
    (scans / "notes.txt").write_text("not an image", encoding="utf-8")
    _copy(CT5N, scans / "CT5N")
    _copy(MR2, scans / "MR2")
    _write_dicom_series(_head((16, 16, 8)) * 10, 2.4, scans / "small_fov", "1.2.826.0.1.3680043.2.1125.7", 3)
    before = {**{f"scans/{k}": v for k, v in _md5s(scans).items()}, **{f"out/{k}": v for k, v in _md5s(out).items()}}
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(INFERENCE), "--bundle_root", str(ROOT)]
    command += ["--ckpt_dir", str(tmp_path / "models"), "--input_dir", str(scans), "--output_dir", str(out)]
    command += [arg for k, v in TINY.items() for arg in (f"--{k}", json.dumps(v).replace(" ", ""))]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode != 0, result.stderr[-3000:]
    assert "could not be synthesized" in result.stderr, result.stderr[-3000:]
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(
        [
            "taken_T2.nii.gz",
            "good1_PD_T2.nii.gz",
            "good1_PD_T2_T2.nii.gz",
            "good2_T2.nii.gz",
            "CT5N_T2.nii.gz",
            "MR2_s2-1_T2.nii.gz",
            "MR2_s2-2_T2.nii.gz",
            "small_fov_T2.nii.gz",
        ]
    )
    assert nib.load(out / "small_fov_T2.nii.gz").shape == (16, 16, 8)
    summary = result.stderr[result.stderr.index("inputs could not be synthesized") :]
    for source, reason in [
        (scans / "taken.nii.gz", "exists and is not replaced"),
        (scans / "zero_geometry.nii.gz", "singular voxel-to-world affine"),
        (scans / "nan_geometry.nii.gz", "non-finite voxel-to-world affine"),
        (scans / "flat.nii.gz", "is 2-D"),
        (scans / "broken.nii.gz", "unreadable"),
        (scans / "notes.txt", "not an image volume"),
        (f"{scans / 'MR2'} [series", "is a single 2-D slice"),
    ]:
        line = next(line for line in summary.splitlines() if line.strip().startswith(str(source)))
        assert reason in line, line
    assert "7 of 14 inputs could not be synthesized (7 written)" in result.stderr
    after = {**{f"scans/{k}": v for k, v in _md5s(scans).items()}, **{f"out/{k}": v for k, v in _md5s(out).items()}}
    assert {k: after[k] for k in before} == before


def test_preprocessing_without_itk_still_loads_nifti(tmp_path, monkeypatch):
    """Found on the GPU machine (no itk): registering the DICOM series reader crashed the whole inference."""
    import nibabel as nib
    import numpy as np
    from bundle.data import volume_preprocessing
    from bundle.volumes import DicomSeriesReader, with_dicom_series_reader
    from monai.transforms import LoadImaged

    monkeypatch.setitem(sys.modules, "itk", None)  # as if itk were not installed
    path = tmp_path / "scan_PD.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((12, 12, 6), dtype=np.float32) * 100, np.eye(4)), path)
    preprocessing = with_dicom_series_reader(volume_preprocessing("image", "MR", (2.0, 2.0, 2.0)))
    loaders = [t for t in preprocessing.flatten().transforms if isinstance(t, LoadImaged)]
    assert loaders and not any(isinstance(r, DicomSeriesReader) for t in loaders for r in t._loader.readers)
    assert preprocessing({"image": str(path)})["image"].shape[0] == 1
