"""configs/inference.json: volumes in, synthesized volumes out in the input's geometry and the target's units."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK
import torch
from bundle.data import ForegroundZScored, volume_preprocessing
from bundle.inference import AxialSliceInferer, DenormalizeIntensityd, find_inputs
from bundle.networks import DicycleGenerator
from monai.bundle import run

ROOT = Path(__file__).resolve().parents[1]
INFERENCE = [str(ROOT / "configs" / "inference.json")]
TINY = {"ngf": 4, "n_blocks": 1, "pixdim": [2.0, 2.0, 2.0], "sw_batch_size": 8}
REFERENCE = {"A": {"kind": "MR", "mean": 100.0, "std": 20.0}, "B": {"kind": "MR", "mean": 500.0, "std": 50.0}}


def _head(shape=(24, 28, 12), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = (x / 0.8) ** 2 + (y / 0.8) ** 2 + (z / 0.8) ** 2 <= 1
    return (np.where(inside, 100 + 50 * x, 0.0) + np.abs(rng.normal(0, 3, shape))).astype(np.float32)


def _models(ckpt_dir: Path, target_kinds=("MR", "MR")) -> dict[str, DicycleGenerator]:
    """Tiny G_AB and G_BA with non-zero offsets (so the deformed pass would differ) and the intensity reference."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    generators = {}
    for seed, (name, kind) in enumerate(zip(("model.pt", "model_g_ba.pt"), target_kinds, strict=True)):
        torch.manual_seed(seed)
        g = DicycleGenerator(ngf=4, n_blocks=1, out_activation=None if kind == "MR" else "tanh", backend="torch")
        with torch.no_grad():
            for p in g.offset_parameters():
                p.normal_(0, 0.1)
        torch.save(g.state_dict(), ckpt_dir / name)
        generators[name] = g
    reference = {
        domain: REFERENCE[domain] if kind == "MR" else {"kind": "CT", "hu_window": [-1000.0, 2000.0]}
        for domain, kind in zip(("B", "A"), target_kinds, strict=True)  # model.pt's target is B
    }
    (ckpt_dir / "intensity_reference.json").write_text(json.dumps(reference), encoding="utf-8")
    return generators


def aligned_pass(generator: torch.nn.Module, volume: torch.Tensor, amp: bool = False) -> torch.Tensor:
    """The generator's plain (aligned) call over every axial slice of a preprocessed volume, fp32 or bfloat16."""
    with torch.no_grad():
        return AxialSliceInferer(sw_batch_size=8, amp=amp)(volume[None], generator.eval())[0]


def infer(tmp_path: Path, **overrides) -> None:
    run(
        config_file=INFERENCE,
        bundle_root=str(ROOT),
        ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "out"),
        **{**TINY, **overrides},
    )


def test_output_is_the_undeformed_synthesis_in_target_units(tmp_path):
    generators = _models(tmp_path / "models")
    source = tmp_path / "in" / "subject_PD.nii.gz"
    source.parent.mkdir()
    nib.save(nib.Nifti1Image(_head(), np.diag([2.0, 2.0, 2.0, 1.0])), source)  # RAS, on the 2 mm grid already
    infer(tmp_path, input_file=str(source))
    written = nib.load(tmp_path / "out" / "subject_PD_T2.nii.gz")
    preprocessed = volume_preprocessing("image", "MR", pixdim=(2.0, 2.0, 2.0))({"image": str(source)})["image"]
    expected = aligned_pass(generators["model.pt"], preprocessed.as_tensor())[0] * 50.0 + 500.0
    np.testing.assert_allclose(written.get_fdata(), expected.numpy(), rtol=0, atol=1e-3)


def test_bf16_runs_the_network_in_bfloat16_on_the_cpu_and_stays_close(tmp_path):
    generators = _models(tmp_path / "models")
    source = tmp_path / "in" / "subject_PD.nii.gz"
    source.parent.mkdir()
    nib.save(nib.Nifti1Image(_head(), np.diag([2.0, 2.0, 2.0, 1.0])), source)
    infer(tmp_path, input_file=str(source), bf16=True)
    written = nib.load(tmp_path / "out" / "subject_PD_T2.nii.gz").get_fdata()
    preprocessed = volume_preprocessing("image", "MR", pixdim=(2.0, 2.0, 2.0))({"image": str(source)})["image"]
    fp32 = aligned_pass(generators["model.pt"], preprocessed.as_tensor())[0] * 50.0 + 500.0
    bf16 = aligned_pass(generators["model.pt"], preprocessed.as_tensor(), amp=True)[0] * 50.0 + 500.0
    np.testing.assert_allclose(written, bf16.numpy(), rtol=0, atol=1e-2)  # the bfloat16 path was taken ...
    assert np.abs(written - fp32.numpy()).max() > 1e-3
    # ... and stays close to the float32 synthesis: mean difference under 3 % of the target's sd (50)
    assert np.abs(written - fp32.numpy()).mean() < 0.03 * 50.0


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_output_geometry_equals_oblique_non_ras_input(tmp_path, suffix):
    _models(tmp_path / "models")
    rotation = SimpleITK.Euler3DTransform((0, 0, 0), 0.2, -0.1, 0.3).GetMatrix()
    image = SimpleITK.GetImageFromArray(_head().transpose(2, 1, 0))  # sitk arrays are z, y, x
    image.SetSpacing((1.5, 2.5, 3.0))
    image.SetOrigin((-20.0, 15.0, 7.0))
    image.SetDirection(
        tuple((np.array(rotation).reshape(3, 3) @ np.diag([-1.0, 1.0, -1.0])).ravel())
    )  # oblique, LPI-ish
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / f"scan{suffix}"
    SimpleITK.WriteImage(image, str(path))
    infer(tmp_path, input_dir=str(tmp_path / "in"))
    written = SimpleITK.ReadImage(str(tmp_path / "out" / "scan_T2.nii.gz"))
    assert written.GetSize() == image.GetSize()
    np.testing.assert_allclose(written.GetSpacing(), image.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(written.GetOrigin(), image.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(written.GetDirection(), image.GetDirection(), atol=1e-5)
    assert np.isfinite(SimpleITK.GetArrayFromImage(written)).all()


def test_bad_files_are_listed_and_good_files_still_written(tmp_path):
    _models(tmp_path / "models")
    folder = tmp_path / "in"
    folder.mkdir()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(_head(), affine), folder / "good1.nii.gz")
    nib.save(nib.Nifti1Image(_head(seed=1), affine), folder / "good2.nii")
    nib.save(nib.Nifti1Image(np.ones((8, 8), np.float32), affine), folder / "flat.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 2), np.float32), affine), folder / "series.nii.gz")
    nan = _head()
    nan[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, affine), folder / "nan.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), affine), folder / "empty.nii.gz")
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b this is not gzip")
    (folder / "notes.txt").write_text("not an image", encoding="utf-8")
    with pytest.raises(RuntimeError) as caught:
        infer(tmp_path, input_dir=str(folder))
    error = caught.value
    while error.__cause__ is not None:  # the bundle runner wraps the error of the "finalize" expression
        error = error.__cause__
    message = str(error)
    assert "6 of 8 inputs could not be synthesized (2 written)" in message
    for name, reason in [
        ("flat.nii.gz", "is 2-D"),
        ("series.nii.gz", "4-D with 2 volumes"),
        ("nan.nii.gz", "NaN"),
        ("empty.nii.gz", "is empty"),
        ("broken.nii.gz", "unreadable"),
        ("notes.txt", "not an image"),
    ]:
        assert f"{folder / name}: " in message and reason in message.split(name, 1)[1].splitlines()[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good1_T2.nii.gz", "good2_T2.nii.gz"]


def test_pseudo_ct_is_in_hounsfield_units(tmp_path):
    _models(tmp_path / "models", target_kinds=("CT", "MR"))
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(_head() * 40, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "in" / "mr.nii.gz")
    infer(tmp_path, input_dir=str(tmp_path / "in"), domain_b="CT", name_b="CT", hu_window=[-1000, 2000])
    hu = nib.load(tmp_path / "out" / "mr_CT.nii.gz").get_fdata()
    assert hu.min() >= -1000 - 1e-3 and hu.max() <= 2000 + 1e-3
    assert hu.std() > 1.0  # not a constant


def test_b_to_a_uses_the_other_generator_and_names_the_output_after_domain_a(tmp_path):
    generators = _models(tmp_path / "models")
    (tmp_path / "in").mkdir()
    source = tmp_path / "in" / "subject_T2.nii.gz"
    nib.save(nib.Nifti1Image(_head(), np.diag([2.0, 2.0, 2.0, 1.0])), source)
    infer(tmp_path, input_file=str(source), direction="B2A")
    written = nib.load(tmp_path / "out" / "subject_T2_PD.nii.gz").get_fdata()
    preprocessed = volume_preprocessing("image", "MR", pixdim=(2.0, 2.0, 2.0))({"image": str(source)})["image"]
    expected = aligned_pass(generators["model_g_ba.pt"], preprocessed.as_tensor())[0] * 20.0 + 100.0
    np.testing.assert_allclose(written, expected.numpy(), rtol=0, atol=1e-3)


def test_an_input_is_never_overwritten(tmp_path):
    _models(tmp_path / "models")
    folder = tmp_path / "in"
    folder.mkdir()
    source = folder / "scan.nii.gz"
    nib.save(nib.Nifti1Image(_head(), np.diag([2.0, 2.0, 2.0, 1.0])), source)
    before = source.read_bytes()
    run(
        config_file=INFERENCE,
        bundle_root=str(ROOT),
        ckpt_dir=str(tmp_path / "models"),
        output_dir=str(folder),
        input_file=str(source),
        **TINY,
    )
    assert source.read_bytes() == before
    assert (folder / "scan_T2.nii.gz").exists()


def test_mr_normalisation_round_trip(tmp_path):
    volume = torch.as_tensor(_head())[None]
    normalised = ForegroundZScored("image")({"image": volume})["image"]
    reference = tmp_path / "reference.json"
    stats = volume[volume > 0.1 * torch.quantile(volume.flatten(), 0.99)]
    mean, std = float(stats.mean()), float(stats.std())
    reference.write_text(json.dumps({"B": {"kind": "MR", "mean": mean, "std": std}}), encoding="utf-8")
    restored = DenormalizeIntensityd("image", "MR", reference, "B")({"image": normalised})["image"]
    torch.testing.assert_close(torch.as_tensor(restored), volume, rtol=0, atol=1e-3)


def test_ct_denormalisation_maps_the_unit_range_to_the_hu_window():
    out = DenormalizeIntensityd("x", "CT", None, hu_window=(-1000, 2000))({"x": torch.tensor([-1.0, 0.0, 1.0])})["x"]
    torch.testing.assert_close(out, torch.tensor([-1000.0, 500.0, 2000.0]))


def test_exactly_one_input_source_is_required(tmp_path):
    with pytest.raises(ValueError, match="exactly one of input_dir, input_file, datalist"):
        find_inputs()
    with pytest.raises(ValueError, match="exactly one"):
        find_inputs(input_dir=str(tmp_path), input_file=str(tmp_path / "x.nii.gz"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_inputs(input_dir=str(tmp_path / "missing"))


def _write_dicom_series(image: SimpleITK.Image, folder: Path) -> None:
    """One file per axial slice with the tags a DICOM reader needs to rebuild the volume's geometry."""
    folder.mkdir(parents=True)
    writer = SimpleITK.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    series = "1.2.826.0.1.3680043.2.1125.1.42"
    for z in range(image.GetDepth()):
        slice_ = image[:, :, z]
        for tag, value in {
            "0008|0060": "MR",
            "0020|000d": series + ".1",
            "0020|000e": series + ".2",
            "0008|0018": f"{series}.3.{z}",
            "0020|0013": str(z + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, z))),
            "0020|0037": "\\".join(f"{v:.6f}" for v in (*direction[0::3], *direction[1::3])),
            "0018|0050": f"{image.GetSpacing()[2]:.6f}",
        }.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(slice_)


def test_dicom_series_folder_is_synthesized_in_its_geometry(tmp_path):
    _models(tmp_path / "models")
    image = SimpleITK.GetImageFromArray((_head() * 10).astype(np.int16).transpose(2, 1, 0))
    image.SetSpacing((1.8, 1.6, 2.5))
    image.SetOrigin((-30.0, -20.0, 10.0))
    _write_dicom_series(image, tmp_path / "in" / "series1")
    infer(tmp_path, input_dir=str(tmp_path / "in"))
    written = SimpleITK.ReadImage(str(tmp_path / "out" / "series1_T2.nii.gz"))
    assert written.GetSize() == image.GetSize()
    np.testing.assert_allclose(written.GetSpacing(), image.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(written.GetOrigin(), image.GetOrigin(), atol=1e-3)
