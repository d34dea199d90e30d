"""Datalists: IXI naming, pairing and the paper's split, user folders, validation messages, deformed experiment."""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK
from bundle import datalist as dl
from bundle import volumes
from scripts.tooling import datasets

REPO = Path(__file__).resolve().parents[1]
SITES = ("Guys", "HH", "IOP")


def ixi_affine(shape: tuple[int, int, int]) -> np.ndarray:
    """IXI PD/T2-like header geometry: axial 0.9375 x 0.9375 x 1.2 mm, the field of view centred near the origin."""
    affine = np.diag([0.9375, 0.9375, 1.2, 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    return affine


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Small NIfTI with an IXI-like header (int16 unless the data are float, mm units, scanner qform/sform)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = ixi_affine(data.shape[:3] if data.ndim >= 3 else (*data.shape, 1)) if affine is None else affine
    image = nib.Nifti1Image(data, affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, path)
    return path


def volume(seed: int, shape: tuple[int, ...] = (8, 8, 5)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, shape, dtype=np.int16)


@pytest.fixture(scope="module")
def ixi_dir(tmp_path_factory) -> Path:
    """70 IXI subjects laid out as the untarred IXI-PD/ and IXI-T2/ folders; 4 of them miss a contrast."""
    root = tmp_path_factory.mktemp("IXI")
    for index in range(70):
        subject = f"IXI{index + 2:03d}"
        name = f"{subject}-{SITES[index % 3]}-{800 + index:04d}"
        if index not in (5, 17, 33):  # three subjects without T2
            write_nifti(root / "IXI-T2" / f"{name}-T2.nii.gz", volume(2 * index))
        if index != 50:  # one without PD
            write_nifti(root / "IXI-PD" / f"{name}-PD.nii.gz", volume(2 * index + 1))
        if index < 3:  # other contrasts and stray files are ignored
            write_nifti(root / "IXI-T1" / f"{name}-T1.nii.gz", volume(500 + index))
    (root / "IXI-PD" / "README.txt").write_text("not an image", encoding="utf-8")
    return root


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("IXI012-HH-1211-PD.nii.gz", datasets.IXIName("IXI012", "HH", "1211", "PD")),
        ("IXI002-Guys-0828-T2.nii.gz", datasets.IXIName("IXI002", "Guys", "0828", "T2")),
        ("/data/IXI-T1/IXI035-IOP-0873-T1.nii", datasets.IXIName("IXI035", "IOP", "0873", "T1")),
        ("IXI12-HH-1211-PD.nii.gz", None),
        ("IXI012-HH-1211-PD.mat", None),
        ("sub-01_T2w.nii.gz", None),
    ],
)
def test_parse_ixi_name(name: str, expected: datasets.IXIName | None) -> None:
    assert datasets.parse_ixi_name(name) == expected


def test_ixi_pairs_by_subject_and_reports_missing_contrasts(ixi_dir) -> None:
    inventory = datasets.find_ixi_volumes(ixi_dir, ("PD", "T2"))
    assert len(inventory.complete) == 66
    assert inventory.incomplete == {"IXI007": ["T2"], "IXI019": ["T2"], "IXI035": ["T2"], "IXI052": ["PD"]}
    pair = inventory.complete["IXI012"]
    assert pair["PD"].name == "IXI012-HH-0810-PD.nii.gz" and pair["T2"].name == "IXI012-HH-0810-T2.nii.gz"


def test_ixi_split_is_the_papers_and_training_lists_are_unpaired(ixi_dir) -> None:
    lines: list[str] = []
    content = datasets.make_ixi_datalist(ixi_dir, n_train=38, n_test=28, seed=0, progress=lines.append)
    assert "4 subjects missing a contrast" in "\n".join(lines) and "IXI052 (no PD)" in "\n".join(lines)
    subject_of = lambda path: datasets.parse_ixi_name(path).subject  # noqa: E731
    train_a = [subject_of(e["image"]) for e in content["training_A"]]
    train_b = [subject_of(e["image"]) for e in content["training_B"]]
    test = [e["subject"] for e in content["test"]]
    assert len(train_a) == 38 and len(test) == 28 and content["validation"] == []
    assert sorted(train_a) == sorted(train_b) and not set(train_a) & set(test)
    assert train_a != train_b  # shuffled independently: the i-th A and B volumes are different subjects
    assert all(e["image"].endswith("-PD.nii.gz") for e in content["training_A"])
    for entry in content["test"]:
        assert subject_of(entry["A"]) == subject_of(entry["B"]) == entry["subject"]
    # seeded: same seed, same split; another seed, another split
    assert datasets.make_ixi_datalist(ixi_dir, seed=0) == content
    assert [e["subject"] for e in datasets.make_ixi_datalist(ixi_dir, seed=1)["test"]] != test


def test_ixi_datalist_is_written_relative_and_loads_absolute(ixi_dir, tmp_path) -> None:
    content = datasets.make_ixi_datalist(ixi_dir, n_train=30, n_test=20, n_validation=6, seed=3)
    path = datasets.write_datalist(
        tmp_path / "ixi.json", ixi_dir, content["domains"], content["training_A"], content["training_B"],
        content["validation"], content["test"],
    )  # fmt: skip
    stored = json.loads(path.read_text(encoding="utf-8"))
    assert stored["domains"] == {"A": "PD", "B": "T2"}
    assert stored["validation"][0]["A"].startswith("IXI-PD/IXI")  # relative to the dataset folder, posix
    loaded = dl.load_datalist(ixi_dir, path, "validation")
    assert len(loaded) == 6 and all(Path(e["A"]).is_absolute() and Path(e["B"]).is_file() for e in loaded)
    assert dl.validate_datalist(ixi_dir, path) == 2 * 30 + 2 * 26
    with pytest.raises(FileExistsError, match="overwrite"):
        datasets.write_datalist(path, ixi_dir, content["domains"], [], [], content["test"])


def test_ixi_errors_name_the_problem(ixi_dir, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"66 subjects available, fewer than the 40 training \+ 0 validation \+ 28"):
        datasets.make_ixi_datalist(ixi_dir, n_train=40, n_test=28)
    duplicate = tmp_path / "IXI"
    write_nifti(duplicate / "a" / "IXI002-Guys-0800-PD.nii.gz", volume(1))
    write_nifti(duplicate / "b" / "IXI002-Guys-0800-PD.nii.gz", volume(2))
    write_nifti(duplicate / "IXI002-Guys-0800-T2.nii.gz", volume(3))
    with pytest.raises(ValueError, match=r"several IXI files.*IXI002 PD"):
        datasets.make_ixi_datalist(duplicate, n_train=1, n_test=0)


def test_ixi_masks_by_subject(ixi_dir, tmp_path) -> None:
    subjects = sorted(datasets.find_ixi_volumes(ixi_dir).complete)
    for subject in subjects[:-1]:
        write_nifti(tmp_path / "masks" / f"{subject}_brainmask.nii.gz", (volume(7) > 500).astype(np.uint8))
    with pytest.raises(ValueError, match=f"{subjects[-1]}: 0 masks"):
        datasets.make_ixi_datalist(ixi_dir, mask_dir=tmp_path / "masks")
    write_nifti(tmp_path / "masks" / f"{subjects[-1]}_brainmask.nii.gz", (volume(8) > 500).astype(np.uint8))
    content = datasets.make_ixi_datalist(ixi_dir, mask_dir=tmp_path / "masks")
    assert all(Path(e["mask"]).name == f"{e['subject']}_brainmask.nii.gz" for e in content["test"])


@pytest.fixture()
def bad_files(tmp_path) -> dict[str, tuple[Path, str]]:
    """One file per problem, with the message fragment it must produce."""
    files = {
        "missing": (tmp_path / "gone.nii.gz", "missing"),
        "zero": (tmp_path / "zero.nii.gz", "empty file (0 bytes)"),
        "text": (tmp_path / "text.nii.gz", "unreadable, not an image"),
        "2d": (write_nifti(tmp_path / "slice2d.nii.gz", volume(1, (8, 8))), "is 2-D (shape 8x8)"),
        "one_slice": (
            write_nifti(tmp_path / "one.nii.gz", volume(1, (8, 8, 1))),
            "is a single 2-D slice (shape 8x8x1)",
        ),
        "4d": (write_nifti(tmp_path / "fmri.nii.gz", volume(1, (8, 8, 5, 3))), "is 4-D with 3 volumes"),
        "nan": (None, "contains 2 NaN and 1 infinite voxels"),
        "constant": (
            write_nifti(tmp_path / "blank.nii.gz", np.zeros((8, 8, 5), np.int16)),
            "is empty: every voxel is 0",
        ),
        "mha_2d": (tmp_path / "slice.mha", "is 2-D (shape 8x6)"),
    }
    files["zero"][0].write_bytes(b"")
    files["text"][0].write_text("this is not a NIfTI file", encoding="utf-8")
    with_nan = volume(2).astype(np.float32)
    with_nan[0, 0, 0] = with_nan[1, 1, 1] = np.nan
    with_nan[2, 2, 2] = np.inf
    files["nan"] = (write_nifti(tmp_path / "nan.nii.gz", with_nan), files["nan"][1])
    SimpleITK.WriteImage(SimpleITK.GetImageFromArray(volume(3, (6, 8)).astype(np.float32)), str(files["mha_2d"][0]))
    return files


def test_volume_problems_are_named(bad_files, tmp_path) -> None:
    for path, fragment in bad_files.values():
        assert fragment in dl.volume_problem(path), path
    good_4d = write_nifti(tmp_path / "good4d.nii.gz", volume(4, (8, 8, 5, 1)))  # NIfTI 3-D stored as 4-D
    good_mha = tmp_path / "good.mha"
    SimpleITK.WriteImage(SimpleITK.GetImageFromArray(volume(5, (5, 8, 8))), str(good_mha))
    assert dl.volume_problem(good_4d) is None and dl.volume_problem(good_mha) is None
    with pytest.raises(FileNotFoundError, match=r"gone\.nii\.gz: missing"):
        dl.check_volume(bad_files["missing"][0])
    with pytest.raises(ValueError, match=r"nan\.nii\.gz: contains 2 NaN"):
        dl.check_volume(bad_files["nan"][0])


def write_dicom_series(folder: Path, data: np.ndarray) -> Path:
    """A DICOM series (one file per axial slice, one series UID), as a scanner export folder."""
    folder.mkdir(parents=True)
    writer = SimpleITK.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    image = SimpleITK.GetImageFromArray(data)  # (slices, rows, columns)
    for index in range(data.shape[0]):
        slice_ = image[:, :, index]
        slice_.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1.42")  # series instance UID
        slice_.SetMetaData("0020|0013", str(index + 1))  # instance number
        slice_.SetMetaData("0020|0032", f"0\\0\\{1.2 * index}")  # image position (patient)
        slice_.SetMetaData("0008|0060", "MR")
        writer.SetFileName(str(folder / f"slice{index:03d}.dcm"))
        writer.Execute(slice_)
    return folder


def test_dicom_series_folders(tmp_path) -> None:
    series = write_dicom_series(tmp_path / "unpaired" / "scan01", volume(6, (4, 8, 8)))
    assert dl.volume_problem(series) is None
    assert volumes.find_volumes(tmp_path / "unpaired") == [series]
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "x.dcm").write_text("not DICOM", encoding="utf-8")
    assert dl.volume_problem(junk) == "unreadable, not an image (folder without a DICOM series)"


def test_validation_lists_every_bad_file_at_once(bad_files, tmp_path) -> None:
    good = write_nifti(tmp_path / "good.nii.gz", volume(9))
    paired = [{"A": str(path), "B": str(path), "subject": key} for key, (path, _) in bad_files.items()]
    training = [{"image": "good.nii.gz"}]
    datalist = datasets.write_datalist(
        tmp_path / "bad.json", tmp_path, {"A": "PD", "B": "T2"}, training, training, test=paired
    )
    with pytest.raises(ValueError) as error:
        dl.validate_datalist(tmp_path, datalist)
    message = str(error.value)
    assert f"{len(bad_files)} unusable files" in message
    for path, fragment in bad_files.values():
        assert f"{path}: {fragment}" in message
    assert str(good) not in message
    only_missing = datasets.write_datalist(
        tmp_path / "missing.json", tmp_path, {"A": "PD", "B": "T2"}, [{"image": "a.nii.gz"}], [{"image": "b.nii.gz"}]
    )
    with pytest.raises(FileNotFoundError, match=r"2 unusable files:\n.*a.nii.gz: missing\n.*b.nii.gz: missing"):
        dl.validate_datalist(tmp_path, only_missing)


def _rgb24(path: Path) -> Path:
    """A true RGB24 NIfTI (datatype 128): nibabel reads it as a structured array of R, G, B bytes."""
    rgb = np.zeros((8, 8, 5), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["G"] = volume(11).astype(np.uint8)
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), path)
    assert nib.load(path).header["datatype"] == 128
    return path


def test_an_rgb_volume_is_named_as_unsupported_and_validation_lists_it_with_the_others(tmp_path, capsys) -> None:
    """Issue 23: the screening crashed with numpy's UFuncNoLoopError and named no file."""
    rgb = _rgb24(tmp_path / "colour.nii.gz")
    assert dl.volume_problem(rgb) == (
        "has voxels of 3 components per voxel (R, G, B: colour): unsupported, expected a scalar (grey-value) volume"
    )
    write_nifti(tmp_path / "good.nii.gz", volume(9))
    write_nifti(tmp_path / "good_b.nii.gz", volume(10))
    datasets.write_datalist(
        tmp_path / "list.json",
        tmp_path,
        {"A": "PD", "B": "T2"},
        [{"image": "good.nii.gz"}, {"image": "colour.nii.gz"}],
        [{"image": "good_b.nii.gz"}],
    )
    cli = _load_cli()
    with pytest.raises(ValueError, match=rf"1 unusable file:\n  {rgb}: has voxels of 3 components per voxel"):
        cli.validate(str(tmp_path), "list.json")


def test_validate_refuses_an_empty_training_list_and_reports_duplicates(tmp_path, monkeypatch, capsys) -> None:
    """Issue 23: an empty training_A, or one volume listed three times, passed as "all volumes are readable"."""
    for name, seed in (("a.nii.gz", 1), ("b.nii.gz", 2), ("c.nii.gz", 3)):
        write_nifti(tmp_path / name, volume(seed))
    domains = {"A": "PD", "B": "T2"}
    datasets.write_datalist(tmp_path / "empty.json", tmp_path, domains, [], [{"image": "b.nii.gz"}])
    monkeypatch.setattr(sys, "argv", ["make_datalist.py", "validate", "--dataset_dir", str(tmp_path), "--datalist",
                                      "empty.json"])  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        _load_cli().main()
    error = capsys.readouterr().err
    assert exit_info.value.code == 1 and "all" not in error
    assert '"training_A": the training list of domain A is empty: nothing to train on' in error
    three = [{"image": "a.nii.gz"}, {"image": "c.nii.gz"}, {"image": "a.nii.gz"}, {"image": "a.nii.gz"}]
    pairs = [{"A": "a.nii.gz", "B": "b.nii.gz"}, {"A": "c.nii.gz", "B": "b.nii.gz", "mask": "a.nii.gz"}]
    datasets.write_datalist(tmp_path / "dup.json", tmp_path, domains, three, [{"image": "b.nii.gz"}], test=pairs)
    with pytest.raises(ValueError) as caught:
        dl.validate_datalist(tmp_path, "dup.json")
    message = str(caught.value)
    assert "2 problems in its lists" in message and "unusable" not in message
    assert f'"training_A": {tmp_path / "a.nii.gz"}: listed 3 times (entries 0, 2, 3)' in message
    assert f'"test"["B"]: {tmp_path / "b.nii.gz"}: listed 2 times (entries 0, 1)' in message
    assert "c.nii.gz" not in message  # listed once per list (and a mask may repeat a volume)
    assert dl.validate_datalist(tmp_path, "dup.json", keys=["training_B"]) == 1  # the lists not asked for: unchecked


def test_malformed_datalist_lists_every_structural_problem(tmp_path) -> None:
    (tmp_path / "bad.json").write_text(
        json.dumps({"training_A": [{"img": "x.nii.gz"}], "test": [{"A": "a"}, "b"]}), encoding="utf-8"
    )
    with pytest.raises(ValueError) as error:
        dl.read_datalist(tmp_path, "bad.json")
    message = str(error.value)
    assert '"domains" must be an object' in message
    assert "\"training_A\"[0] has no 'image'" in message
    assert "\"test\"[0] has no 'B'" in message and '"test"[1] must be an object' in message
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.json is not valid JSON"):
        dl.read_datalist(tmp_path, "broken.json")
    with pytest.raises(FileNotFoundError, match=r"nowhere\.json does not exist"):
        dl.load_datalist(tmp_path, "nowhere.json")
    datasets.write_datalist(
        tmp_path / "ok.json", tmp_path, {"A": "MR", "B": "CT"}, [{"image": "a.nii"}], [{"image": "b.nii"}]
    )
    with pytest.raises(KeyError, match="no 'validation_set' list"):
        dl.load_datalist(tmp_path, "ok.json", "validation_set")


def test_synthesis_pair_resolves_the_ground_truth_of_each_direction() -> None:
    aligned = {"A": "pd.nii", "B": "t2.nii", "mask": "brain.nii", "subject": "s"}
    assert dl.synthesis_pair(aligned, "A2B") == {"source": "pd.nii", "ground_truth": "t2.nii", "mask": "brain.nii"}
    assert dl.synthesis_pair(aligned, "B2A") == {"source": "t2.nii", "ground_truth": "pd.nii", "mask": "brain.nii"}
    deformed = aligned | {"B": "t2_d.nii", "gt_A2B": "t2.nii", "gt_B2A": "pd_d.nii", "mask_B": "brain_d.nii"}
    assert dl.synthesis_pair(deformed, "A2B") == {"source": "pd.nii", "ground_truth": "t2.nii", "mask": "brain.nii"}
    assert dl.synthesis_pair(deformed, "B2A") == {
        "source": "t2_d.nii",
        "ground_truth": "pd_d.nii",
        "mask": "brain_d.nii",
    }
    with pytest.raises(ValueError, match="direction"):
        dl.synthesis_pair(aligned, "AB")


def test_relative_paths_may_not_leave_the_dataset_folder(tmp_path) -> None:
    dataset = tmp_path / "data"
    write_nifti(dataset / "sub" / "a.nii.gz", volume(1))
    outside = write_nifti(tmp_path / "elsewhere" / "b.nii.gz", volume(2))
    entries = {
        "training_A": [{"image": "sub/a.nii.gz"}, {"image": "../../../../etc/passwd"}],
        "training_B": [{"image": str(outside)}],  # absolute: the user's own choice, kept
        "test": [{"A": "sub/../sub/a.nii.gz", "B": "sub/../../elsewhere/b.nii.gz", "subject": "s1"}],
    }
    (dataset / "datalist.json").write_text(json.dumps({"domains": {"A": "PD", "B": "T2"}, **entries}), encoding="utf-8")
    for read in (dl.read_datalist, dl.load_datalist, dl.validate_datalist):
        with pytest.raises(ValueError, match="outside the dataset folder") as error:
            read(dataset, "datalist.json")
        message = str(error.value)
        assert '"training_A"[1]["image"]: ../../../../etc/passwd' in message
        assert '"test"[0]["B"]: sub/../../elsewhere/b.nii.gz' in message
        assert "sub/a.nii.gz\n" not in message and str(outside) not in message  # inside, or absolute: not named
    del entries["training_A"][1], entries["test"]
    (dataset / "datalist.json").write_text(json.dumps({"domains": {"A": "PD", "B": "T2"}, **entries}), encoding="utf-8")
    assert dl.load_datalist(dataset, "datalist.json", "training_B") == [{"image": str(outside)}]
    assert dl.validate_datalist(dataset, "datalist.json") == 2


def test_written_datalists_keep_files_outside_the_dataset_folder_absolute(folder_dataset, tmp_path) -> None:
    """A builder given a folder outside the dataset folder must write a datalist that loads (not ``../`` paths)."""
    outside = tmp_path.parent / f"{tmp_path.name}_outside"
    write_nifti(outside / "mr9.nii.gz", volume(9))
    content = datasets.make_folder_datalist(folder_dataset, outside, "ct")
    path = datasets.write_datalist(
        "datalist.json", folder_dataset, content["domains"], content["training_A"], content["training_B"]
    )
    stored = json.loads(path.read_text(encoding="utf-8"))
    assert stored["training_A"] == [{"image": str(outside / "mr9.nii.gz")}]
    assert all(not Path(e["image"]).is_absolute() for e in stored["training_B"])  # inside: relative, portable
    assert dl.load_datalist(folder_dataset, path, "training_A") == [{"image": str(outside / "mr9.nii.gz")}]


def test_split_subjects() -> None:
    subjects = [f"s{i:02d}" for i in range(10)]
    split = datasets.split_subjects(subjects, n_train=None, n_test=3, n_validation=2, seed=4)
    assert [len(split[k]) for k in ("training", "validation", "test", "unused")] == [5, 2, 3, 0]
    assert sorted(itertools.chain(*split.values())) == subjects
    assert datasets.split_subjects(subjects[::-1], None, 3, 2, seed=4) == split  # input order does not matter
    assert len(datasets.split_subjects(subjects, n_train=4, n_test=3)["unused"]) == 3
    with pytest.raises(ValueError, match="10 subjects available"):
        datasets.split_subjects(subjects, n_train=8, n_test=3)


@pytest.fixture()
def folder_dataset(tmp_path) -> Path:
    """Unpaired MR (NIfTI) and CT (MetaImage) folders, and paired evaluation folders with masks."""
    for i in range(3):
        write_nifti(tmp_path / "mr" / f"mr{i}.nii.gz", volume(i, (12, 12, 8)))
    (tmp_path / "ct").mkdir()
    for i in range(2):
        SimpleITK.WriteImage(
            SimpleITK.GetImageFromArray(volume(10 + i, (8, 12, 12))), str(tmp_path / "ct" / f"ct{i}.mha")
        )
    for name in ("p01", "p02", "p03"):
        for folder, seed in (("eval/mr", 20), ("eval/ct", 30), ("eval/body", 40)):
            data = (
                volume(seed, (12, 12, 8))
                if folder != "eval/body"
                else (volume(seed, (12, 12, 8)) > 300).astype(np.uint8)
            )
            write_nifti(tmp_path / folder / f"{name}.nii.gz", data)
    return tmp_path


def test_folder_datalist(folder_dataset) -> None:
    content = datasets.make_folder_datalist(
        folder_dataset, "mr", "ct", "MR", "CT", "eval/mr", "eval/ct", "eval/body", n_validation=1, seed=0
    )
    assert content["domains"] == {"A": "MR", "B": "CT"}
    assert sorted(Path(e["image"]).name for e in content["training_B"]) == ["ct0.mha", "ct1.mha"]
    assert len(content["training_A"]) == 3 and len(content["validation"]) == 1 and len(content["test"]) == 2
    for entry in content["validation"] + content["test"]:
        assert {Path(entry[k]).name for k in ("A", "B", "mask")} == {f"{entry['subject']}.nii.gz"}
        assert Path(entry["mask"]).parent.name == "body"
    (folder_dataset / "eval" / "ct" / "p02.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"paired folders do not match: p02 \(no B\)"):
        datasets.make_folder_datalist(folder_dataset, "mr", "ct", paired_dir_a="eval/mr", paired_dir_b="eval/ct")
    with pytest.raises(FileNotFoundError, match=r"folder .*nothere does not exist"):
        datasets.make_folder_datalist(folder_dataset, "mr", "nothere")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_distorted_datalist_never_touches_its_inputs(folder_dataset) -> None:
    content = datasets.make_folder_datalist(folder_dataset, "mr", "ct", "MR", "CT", "eval/mr", "eval/ct", "eval/body")
    source = datasets.write_datalist("datalist.json", folder_dataset, content["domains"], content["training_A"],
                               content["training_B"], test=content["test"])  # fmt: skip
    before = {p: _digest(p) for p in folder_dataset.rglob("*") if p.is_file()}
    lines: list[str] = []
    output = datasets.make_distorted_datalist(folder_dataset, max_displacement_mm=6.0, seed=1, progress=lines.append)
    assert all(_digest(p) == digest for p, digest in before.items())  # inputs unchanged
    derived = json.loads(output.read_text(encoding="utf-8"))
    assert (
        derived["distortion"]["max_displacement_mm"] == 6.0
        and derived["training_A"] == json.loads(source.read_text(encoding="utf-8"))["training_A"]
    )
    assert all(e["image"].startswith("distorted_CT_6mm_seed1/ct/") for e in derived["training_B"])
    for entry in derived["test"]:
        assert entry["gt_A2B"] == f"eval/ct/{entry['subject']}.nii.gz"
        assert entry["B"] == f"distorted_CT_6mm_seed1/eval/ct/{entry['subject']}.nii.gz"
        assert entry["gt_B2A"] == f"distorted_CT_6mm_seed1/eval/mr/{entry['subject']}.nii.gz"
        assert entry["mask_B"] == f"distorted_CT_6mm_seed1/eval/body/{entry['subject']}.nii.gz"
        mask = nib.load(folder_dataset / entry["mask_B"])
        assert mask.get_data_dtype() == np.uint8 and set(np.unique(mask.get_fdata())) <= {0.0, 1.0}
    distorted_ct = SimpleITK.ReadImage(str(folder_dataset / derived["training_B"][0]["image"]))
    assert distorted_ct.GetSize() == (12, 12, 8) and distorted_ct.GetPixelID() == SimpleITK.sitkInt16
    assert dl.validate_datalist(folder_dataset, output) == 3 + 2 + 3 * 6  # A, B, mask, gt_A2B, gt_B2A, mask_B
    with pytest.raises(FileExistsError, match="exists"):
        datasets.make_distorted_datalist(folder_dataset, max_displacement_mm=6.0, seed=1)
    with pytest.raises(ValueError, match="already distorted"):
        datasets.make_distorted_datalist(folder_dataset, output, "again.json")
    with pytest.raises(ValueError, match="would replace the input datalist"):
        datasets.make_distorted_datalist(folder_dataset, "datalist.json", "datalist.json")


def _load_cli():
    return importlib.import_module("scripts.make_datalist")


def test_cli_ixi_validate_and_clear_errors(ixi_dir, tmp_path, monkeypatch, capsys) -> None:
    cli = _load_cli()
    output = tmp_path / "ixi_datalist.json"
    assert cli.ixi(str(ixi_dir), output=str(output), n_train=20, n_test=10) == str(output)
    printed = capsys.readouterr().out
    assert "66 IXI subjects with both PD and T2" in printed and "all 60 volumes are readable" in printed
    monkeypatch.setattr(
        sys, "argv", ["make_datalist.py", "ixi", "--dataset_dir", str(ixi_dir), "--output", str(output)]
    )
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1 and "exists" in capsys.readouterr().err
    monkeypatch.setattr(
        sys, "argv", ["make_datalist.py", "validate", "--dataset_dir", str(tmp_path), "--datalist", "none.json"]
    )
    with pytest.raises(SystemExit):
        cli.main()
    assert "none.json does not exist" in capsys.readouterr().err
