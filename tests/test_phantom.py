"""Brain phantom: physics of the contrasts, geometry, co-registration, noise, beds, determinism, dataset writer."""

from __future__ import annotations

import builtins
import importlib
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi
from bundle.datalist import load_datalist, validate_datalist
from bundle.transforms import DomainDistortion
from scripts.tooling import phantom
from scripts.tooling.phantom import MR_SCALE, MR_SEQUENCES, TISSUE_LABELS, TISSUES, spin_echo_signal

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model() -> phantom.HeadModel:
    return phantom.build_head_model(keep_fractions=True)


@pytest.fixture(scope="module")
def grid() -> tuple[tuple[int, int, int], np.ndarray]:
    return phantom.ixi_geometry(downsample=2)  # 128 x 128 x 65, same field of view as IXI


@pytest.fixture(scope="module")
def subject(model, grid) -> dict[str, np.ndarray]:
    return phantom.simulate_subject(model, (0, 3), *grid, return_fractions=True)


@pytest.fixture(scope="module")
def clean_subject(model, grid) -> dict[str, np.ndarray]:
    """No noise, no bias field, no beds: every voxel is exactly its tissue mixture."""
    return phantom.simulate_subject(
        model, (0, 3), *grid, snr=np.inf, bias_field=0.0, ct_noise_hu=0.0, scanner_bed=False, return_fractions=True
    )


@pytest.fixture(scope="module")
def dataset(model, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("phantom")
    return phantom.write_phantom_dataset(
        out, subjects=4, n_validation=1, n_test=1, downsample=8, workers=1, progress=None, model=model
    )


def _signal(tissue: str, contrast: str) -> float:
    p = TISSUES[tissue]
    return float(spin_echo_signal(p.pd, p.t1_ms, p.t2_ms, MR_SEQUENCES[contrast]))


def test_spin_echo_signal_formula() -> None:
    sequence = phantom.SpinEchoSequence(tr_ms=2000.0, te_ms=50.0)
    expected = 0.8 * (1 - np.exp(-2000 / 1000)) * np.exp(-50 / 100)
    assert spin_echo_signal(0.8, 1000.0, 100.0, sequence) == pytest.approx(expected)
    long_tr = phantom.SpinEchoSequence(tr_ms=1e9, te_ms=0.0)
    assert spin_echo_signal(0.6, 900.0, 80.0, long_tr) == pytest.approx(0.6)  # fully relaxed: proton density


def test_literature_contrast_ordering_of_the_parameters() -> None:
    assert _signal("csf", "T2") > _signal("gm", "T2") > _signal("wm", "T2")
    assert _signal("wm", "T1") > _signal("gm", "T1") > _signal("csf", "T1")
    assert _signal("csf", "PD") > _signal("gm", "PD") > _signal("wm", "PD")
    assert _signal("fat", "T1") > _signal("wm", "T1")  # scalp fat is the brightest tissue on T1
    for contrast in MR_SEQUENCES:
        assert _signal("bone_cortical", contrast) == _signal("air", contrast) == 0.0
    hu = {t: TISSUES[t].ct_hu for t in TISSUES}
    assert hu["bone_cortical"] > hu["bone_diploe"] > hu["gm"] > hu["wm"] > hu["csf"] > hu["fat"] > hu["air"]
    assert 1000 <= hu["bone_cortical"] <= 1600 and 20 <= hu["wm"] < hu["gm"] <= 45 and 5 <= hu["csf"] <= 15


def _tissue_medians(volume: np.ndarray, fractions: np.ndarray) -> dict[str, float]:
    """Median of ``volume`` over the nearly pure voxels (fraction >= 0.95) of each tissue present."""
    pure = fractions >= 0.95
    return {t: float(np.median(volume[pure[i]])) for i, t in enumerate(TISSUE_LABELS) if pure[i].sum() > 20}


def test_contrast_ordering_inside_tissue_masks(subject) -> None:
    fractions = subject["tissue_fractions"]
    pd, t2, t1, ct = (_tissue_medians(subject[k], fractions) for k in ("PD", "T2", "T1", "CT"))
    assert {"csf", "gm", "wm", "fat", "bone_cortical", "air"} <= set(ct)
    assert t2["csf"] > t2["gm"] > t2["wm"]
    assert t1["wm"] > t1["gm"] > t1["csf"]
    assert pd["csf"] > pd["gm"] > pd["wm"]
    assert t1["fat"] > t1["wm"] and pd["bone_cortical"] < 0.2 * pd["wm"]  # bright fat, dark skull on MR
    assert ct["bone_cortical"] > 1000 and ct["gm"] > ct["wm"] > ct["csf"] > ct["fat"] and ct["air"] < -950
    assert 20 < ct["wm"] < 45 and 0 < ct["csf"] < 20


def test_every_contrast_is_the_same_tissue_mixture_at_every_voxel(clean_subject) -> None:
    """Exact co-registration: each contrast equals sum_k f_k(x) S_k at every voxel, with the same fractions."""
    fractions = clean_subject["tissue_fractions"].reshape(len(TISSUE_LABELS), -1)
    np.testing.assert_allclose(fractions.sum(axis=0), 1.0, atol=1e-4)
    for contrast in MR_SEQUENCES:
        expected = MR_SCALE * np.array([_signal(t, contrast) for t in TISSUE_LABELS]) @ fractions
        np.testing.assert_allclose(clean_subject[contrast].ravel(), expected, atol=0.05)
    expected_ct = np.array([TISSUES[t].ct_hu for t in TISSUE_LABELS]) @ fractions
    np.testing.assert_allclose(np.clip(expected_ct, *phantom.CT_HU_RANGE), clean_subject["CT"].ravel(), atol=0.05)
    head = clean_subject["head_mask"].astype(bool).ravel()
    assert np.array_equal(head, fractions[TISSUE_LABELS.index("air")] <= 0.5)
    assert not np.any(clean_subject["brain_mask"].astype(bool) & ~clean_subject["head_mask"].astype(bool))


def test_rician_noise_matches_the_requested_snr(model, grid) -> None:
    volumes = phantom.simulate_subject(model, (1, 0), *grid, snr=20.0, bias_field=0.0, scanner_bed=False)
    brain = volumes["brain_mask"].astype(bool)
    air = ndi.binary_erosion(~volumes["head_mask"].astype(bool), iterations=3)
    for contrast in ("PD", "T2"):
        sigma = volumes[contrast][air].mean() / np.sqrt(np.pi / 2)  # Rayleigh mean in signal-free air
        assert volumes[contrast][brain].mean() / sigma == pytest.approx(20.0, rel=0.1)
    ct_air = volumes["CT"][air]
    assert ct_air.mean() == pytest.approx(-1000.0, abs=1.0) and ct_air.std() == pytest.approx(8.0, rel=0.1)


def test_bias_field_is_smooth_and_shared_by_the_mr_contrasts(model, grid) -> None:
    common = {"snr": np.inf, "ct_noise_hu": 0.0, "scanner_bed": False}
    flat = phantom.simulate_subject(model, (2, 0), *grid, bias_field=0.0, **common)
    biased = phantom.simulate_subject(model, (2, 0), *grid, bias_field=0.2, **common)
    head = flat["head_mask"].astype(bool) & (flat["T2"] > 50)
    gains = {c: biased[c][head] / flat[c][head] for c in ("PD", "T2", "T1")}
    np.testing.assert_allclose(gains["PD"], gains["T2"], rtol=1e-4)
    np.testing.assert_allclose(gains["T1"], gains["T2"], rtol=1e-4)
    assert 0.85 < gains["T2"].min() < 0.99 and 1.01 < gains["T2"].max() < 1.15


def test_scanner_beds_differ_between_mr_and_ct_and_stay_outside_the_head(model, grid) -> None:
    volumes = phantom.simulate_subject(model, (3, 0), *grid, snr=np.inf, ct_noise_hu=0.0)
    head = volumes["head_mask"].astype(bool)
    away = ~ndi.binary_dilation(head, iterations=2)  # beyond the scalp's partial-volume rim
    mr_bed = (volumes["T1"] > 100) & away
    ct_bed = (volumes["CT"] > -500) & away
    assert mr_bed.sum() > 500 and ct_bed.sum() > 500
    rows = lambda mask: np.nonzero(mask.any(axis=(0, 2)))[0]  # noqa: E731  (voxel axis 1 runs posterior -> anterior)
    assert rows(mr_bed).max() <= rows(head).min() + 1  # the flat pad lies under the occiput (supine)
    assert rows(ct_bed).max() > rows(head).min() + 5  # the curved holder rises along the sides of the head
    # the MR pad is invisible on CT and the CT holder on MR (away from where they cross)
    assert (volumes["CT"][mr_bed & ~ndi.binary_dilation(volumes["CT"] > -999)] < -999).all()
    assert (volumes["T1"][ct_bed & ~ndi.binary_dilation(volumes["T1"] > 1)] < 1).all()
    assert (mr_bed & ~ndi.binary_dilation(volumes["CT"] > -999)).sum() > 100
    no_bed = phantom.simulate_subject(model, (3, 0), *grid, snr=np.inf, ct_noise_hu=0.0, scanner_bed=False)
    assert (no_bed["T1"][away] < 1).all() and (no_bed["CT"][away] < -990).all()


def test_subjects_are_deterministic_and_differ(model) -> None:
    shape, affine = phantom.ixi_geometry(downsample=8)
    a = phantom.simulate_subject(model, (5, 1), shape, affine)
    b = phantom.simulate_subject(model, (5, 1), shape, affine)
    c = phantom.simulate_subject(model, (5, 2), shape, affine)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    dice = 2 * (a["brain_mask"] & c["brain_mask"]).sum() / (a["brain_mask"].sum() + c["brain_mask"].sum())
    assert 0.75 < dice < 0.99  # another anatomy and pose, still a brain in the same place


def test_out_of_range_parameters_are_refused(model) -> None:
    shape, affine = phantom.ixi_geometry(downsample=16)
    with pytest.raises(ValueError, match=r"anatomy_mm=20.*invertible"):
        phantom.simulate_subject(model, 0, shape, affine, anatomy_mm=20.0)
    with pytest.raises(ValueError, match="snr must be > 0"):
        phantom.simulate_subject(model, 0, shape, affine, snr=0.0)
    with pytest.raises(ValueError, match="axis-aligned"):
        phantom.simulate_subject(
            model, 0, shape, affine @ np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
        )
    with pytest.raises(ValueError, match="keep_fractions=True"):
        phantom.simulate_subject(phantom.HeadModel(model.maps, model.affine), 0, shape, affine, return_fractions=True)


def test_ixi_geometry() -> None:
    shape, affine = phantom.ixi_geometry()
    assert shape == (256, 256, 130)
    np.testing.assert_allclose(np.sqrt((affine[:3, :3] ** 2).sum(0)), (0.9375, 0.9375, 1.2))
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    centre = affine[:3, :3] @ ((np.array(shape) - 1) / 2) + affine[:3, 3]
    np.testing.assert_allclose(centre, phantom.IXI_FOV_CENTRE_MM)
    small_shape, small = phantom.ixi_geometry(downsample=4)
    fov = np.array(shape) * (0.9375, 0.9375, 1.2)
    np.testing.assert_allclose(np.array(small_shape) * np.diag(small)[:3], fov)
    with pytest.raises(ValueError, match="downsample"):
        phantom.ixi_geometry(0)


def test_dataset_files_geometry_and_datalists(dataset) -> None:
    out = Path(dataset["output_dir"])
    shape, affine = phantom.ixi_geometry(downsample=8)
    kinds = {
        "PD": np.int16,
        "T2": np.int16,
        "T1": np.int16,
        "CT": np.int16,
        "brainmask": np.uint8,
        "headmask": np.uint8,
    }
    for subject in dataset["subjects"]:
        paired = subject in dataset["split"]["validation"] + dataset["split"]["test"]
        extra = {"T2_distorted": np.int16} | (
            {"PD_distorted": np.int16, "brainmask_distorted": np.uint8} if paired else {}
        )
        for kind, dtype in (kinds | extra).items():
            image = nib.load(phantom.phantom_file(out, subject, kind))
            assert image.shape == shape and image.get_data_dtype() == dtype, kind
            np.testing.assert_allclose(image.affine, affine, atol=1e-5)
            assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
            assert image.header["qform_code"] == image.header["sform_code"] == 1
            assert image.header.get_xyzt_units()[0] == "mm"
    for name, domains in (
        ("datalist.json", {"A": "PD", "B": "T2"}),
        ("datalist_deformed_t2.json", {"A": "PD", "B": "T2"}),
        ("datalist_mr_ct.json", {"A": "T1", "B": "CT"}),
    ):
        content = json.loads((out / name).read_text(encoding="utf-8"))
        assert content["domains"] == domains
        assert validate_datalist(out, name) > 0
        paths = [
            v
            for key in ("training_A", "training_B", "validation", "test")
            for e in content[key]
            for k, v in e.items()
            if k != "subject"
        ]
        assert all(not Path(p).is_absolute() for p in paths)
        assert len(content["training_A"]) == len(content["training_B"]) == 2
        assert [e["subject"] for e in content["test"]] == dataset["split"]["test"]


def test_deformed_t2_datalist_ground_truths(dataset) -> None:
    out = Path(dataset["output_dir"])
    test = load_datalist(out, "datalist_deformed_t2.json", "test")[0]
    subject = test["subject"]
    assert Path(test["A"]) == phantom.phantom_file(out, subject, "PD")
    assert Path(test["B"]) == phantom.phantom_file(out, subject, "T2_distorted")
    assert Path(test["gt_A2B"]) == phantom.phantom_file(out, subject, "T2")  # aligned with the PD source
    assert Path(test["gt_B2A"]) == phantom.phantom_file(out, subject, "PD_distorted")  # aligned with distorted T2
    assert Path(test["mask_B"]) == phantom.phantom_file(out, subject, "brainmask_distorted")
    training_b = load_datalist(out, "datalist_deformed_t2.json", "training_B")
    assert all(p["image"].endswith("_T2_distorted.nii.gz") for p in training_b)
    # B and the B -> A ground truth come from one distortion (the recorded one) of the undistorted volumes
    record = json.loads((out / "datalist_deformed_t2.json").read_text(encoding="utf-8"))["distortion"]
    distortion = DomainDistortion(record["max_displacement_mm"], record["control_spacing_mm"], seed=record["seed"])
    for distorted, original, mode in (
        ("B", "gt_A2B", "bilinear"),
        ("gt_B2A", "A", "bilinear"),
        ("mask_B", "mask", "nearest"),
    ):
        image = nib.load(test[original])
        expected = distortion(image.get_fdata(dtype=np.float32)[None], affine=image.affine, mode=mode)[0]
        on_disk = nib.load(test[distorted]).get_fdata()
        assert np.abs(on_disk - expected).max() <= 0.5 + 1e-3  # integer rounding on disk
        assert np.abs(on_disk - image.get_fdata()).max() > 50 or mode == "nearest"  # it really moved


def test_training_lists_are_shuffled_independently(dataset) -> None:
    content = json.loads((Path(dataset["output_dir"]) / "datalist.json").read_text(encoding="utf-8"))
    subjects = lambda key: [Path(e["image"]).parent.name for e in content[key]]  # noqa: E731
    assert sorted(subjects("training_A")) == sorted(subjects("training_B")) == dataset["split"]["training"]


def test_rerun_with_same_parameters_is_skipped(dataset, model) -> None:
    again = phantom.write_phantom_dataset(
        dataset["output_dir"], subjects=4, n_validation=1, n_test=1, downsample=8, workers=1, progress=None, model=model
    )
    assert again["skipped"]


def test_worker_processes_give_the_same_data(dataset, model, tmp_path) -> None:
    parallel = phantom.write_phantom_dataset(
        tmp_path, subjects=4, n_validation=1, n_test=1, downsample=8, workers=2, progress=None, model=model
    )
    assert not parallel["skipped"]
    for subject in dataset["subjects"]:
        for kind in ("T1", "CT", "T2_distorted"):
            serial = np.asanyarray(nib.load(phantom.phantom_file(dataset["output_dir"], subject, kind)).dataobj)
            forked = np.asanyarray(nib.load(phantom.phantom_file(tmp_path, subject, kind)).dataobj)
            np.testing.assert_array_equal(serial, forked)
    for name in ("datalist.json", "datalist_deformed_t2.json", "datalist_mr_ct.json"):
        assert (tmp_path / name).read_text(encoding="utf-8") == (Path(dataset["output_dir"]) / name).read_text(
            encoding="utf-8"
        )


def test_missing_nilearn_names_the_install_command(monkeypatch) -> None:
    real_import = builtins.__import__

    def no_nilearn(name, *args, **kwargs):
        if name == "nilearn" or name.startswith("nilearn."):
            raise ImportError("No module named 'nilearn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_nilearn)
    with pytest.raises(ImportError, match=r"pip install nilearn"):
        phantom.load_mni152_probabilities()


def test_cli_builds_and_reports_time_and_memory(tmp_path, capsys) -> None:
    cli = importlib.import_module("scripts.make_demo_data")
    cli.main(output_dir=str(tmp_path), subjects=3, n_validation=1, n_test=1, downsample=16, workers=1)
    printed = capsys.readouterr().out
    assert "[  3/3] phantom003 written" in printed
    assert "done in" in printed and "peak memory" in printed
    assert len(load_datalist(tmp_path, "datalist_mr_ct.json", "training_A")) == 1


def test_cli_help_lists_the_phantom_options() -> None:
    command = [sys.executable, "-m", "scripts.make_demo_data", "--help"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    printed = result.stdout + result.stderr  # fire writes its help to stderr
    assert result.returncode == 0 and "Traceback" not in printed, printed
    for option in ("--output_dir", "--subjects", "--n_test", "--distortion_seed", "--workers", "--force"):
        assert option in printed
    assert "--progress" not in printed and "--model" not in printed
