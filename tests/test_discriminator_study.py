"""scripts/discriminator_study.py: the discriminators' geometry, the decisions, the scalp measure and the study."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from bundle.networks import patch_discriminator
from bundle.pairing import mask_preprocessing
from scripts import discriminator_study as study
from scripts.tooling.study import PRESETS

pytestmark = pytest.mark.filterwarnings("ignore")


def test_receptive_field_is_70_for_3_layers_and_the_hand_derived_values_otherwise() -> None:
    # strides 2, 2, 2, 1, 1 (3 layers), kernel 4, from the logit back: r -> s * r + 4 - s
    assert study.receptive_field(3) == 70
    assert study.receptive_field(2) == 34  # 1 -> 4 -> 7 -> 16 -> 34
    assert study.receptive_field(4) == 142  # 2 * 70 + 2
    with pytest.raises(ValueError, match="at least 1"):
        study.receptive_field(0)


@pytest.mark.parametrize(("layers", "size"), [(2, 64), (3, 128), (4, 256)])
def test_receptive_field_and_centre_match_the_gradient_of_one_logit(layers: int, size: int) -> None:
    torch.manual_seed(0)
    # batch norm in eval mode is per pixel (instance norm would couple every pixel of the input)
    discriminator = patch_discriminator(channels=2, num_layers_d=layers, norm="BATCH").eval()
    image = torch.randn(1, 1, size, size, requires_grad=True)
    logits = discriminator(image)[-1]
    assert logits.shape[-1] == size // 2**layers - 2
    j = 6
    logits[0, 0, j, j].backward()
    rows = np.nonzero(image.grad[0, 0].abs().sum(dim=1).numpy())[0]
    stride, offset = study.logit_centres(layers)
    assert rows[-1] - rows[0] + 1 == study.receptive_field(layers)
    assert (rows[0] + rows[-1]) / 2 == stride * j + offset


def test_logits_inside_the_mask_and_their_mean_per_slice() -> None:
    masks = torch.zeros(2, 1, 64, 64, dtype=torch.bool)
    masks[0, :, 16:40] = True  # 3 layers: logit j centred on 8 j + 11.5, i.e. pixels 8 j + 11 and 8 j + 12
    masks[1, :, 16:36] = True  # pixel 35 in, 36 out: half of logit 3's centre is inside, which counts
    inside = study.logits_inside(masks, 3, (6, 6))
    assert inside[0, 0, :, 0].tolist() == [False, True, True, True, False, False]
    assert inside[1, 0, :, 0].tolist() == [False, True, True, True, False, False]
    assert bool((inside == inside[..., :1]).all())  # the masks span every column
    logits = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).expand(2, 1, 2, 2)
    region = torch.tensor([[[[True, False], [True, True]]], [[[False, False], [False, False]]]])
    scores = study.slice_scores(logits, region)
    assert scores[0] == pytest.approx(8.0 / 3.0) and np.isnan(scores[1])


def test_classify_counts_above_the_threshold_as_real() -> None:
    result = study.classify([0.9, 0.4, 0.7, 0.5], [0.1, 0.6, 0.5])  # 0.5 itself is called fake
    assert result["real called real"] == pytest.approx(2 / 4)
    assert result["fake called fake"] == pytest.approx(2 / 3)
    assert result["balanced accuracy"] == pytest.approx((2 / 4 + 2 / 3) / 2)
    assert (result["n real"], result["n fake"]) == (4, 3)
    with pytest.raises(ValueError, match="need real and fake"):
        study.classify([], [0.1])


def test_remapped_t1_keeps_the_ct_outside_and_its_histogram_inside() -> None:
    rng = np.random.default_rng(0)
    t1, ct = rng.normal(size=(8, 9, 3)), rng.uniform(-1, 1, size=(8, 9, 3))
    mask = np.zeros(t1.shape, dtype=bool)
    mask[2:6, 2:7] = True
    fake = study.remapped_t1(t1, ct, mask)
    np.testing.assert_allclose(np.sort(fake[mask]), np.sort(ct[mask]), rtol=1e-6)
    np.testing.assert_allclose(fake[~mask], ct[~mask], rtol=1e-6)
    assert np.all(np.diff(fake[mask][np.argsort(t1[mask])]) >= 0)
    constant = study.remapped_t1(t1, ct, mask, background="constant")
    np.testing.assert_allclose(constant[~mask], ct[~mask].mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="background must be"):
        study.remapped_t1(t1, ct, mask, background="air")


def _toy_subjects(count: int) -> list[study.Subject]:
    """Dark noisy 'CTs' against bright 'fakes': a separable problem."""
    rng = np.random.default_rng(1)
    subjects = []
    for index in range(count):
        ct = (-0.5 + 0.1 * rng.normal(size=(40, 44, 6))).astype(np.float32)
        mask = np.zeros(ct.shape, dtype=bool)
        mask[8:32, 8:36, 1:5] = True
        fake = np.where(mask, ct + 1.0, ct).astype(np.float32)
        subjects.append(study.Subject(f"toy{index}", ct, mask, {study.FAKES[0]: fake}))
    return subjects


def test_training_is_seeded_and_learns_a_separable_fake() -> None:
    subjects = _toy_subjects(3)
    runs = [study.train_discriminator(subjects, study.FAKES[0], 3, 4, 48, 30, seed=5) for _ in range(2)]
    assert runs[0][1] == runs[1][1]  # same seed, same draws and losses
    _, other = study.train_discriminator(subjects, study.FAKES[0], 3, 4, 48, 30, seed=6)
    assert other != runs[0][1]
    result = study.measure(runs[0][0], 3, subjects[:1], study.FAKES[0])
    assert result["balanced accuracy"] == 1.0 and result["n real"] == len(study.middle_slices(subjects[0].mask))
    with pytest.raises(ValueError, match="crop must be at least 48 for 4 layers"):
        study.train_discriminator(subjects, study.FAKES[0], 4, 4, 32, 1)


def _head(spacing: tuple[float, ...], lower_mm: float = 6.0) -> tuple[np.ndarray, np.ndarray]:
    """A skull (a bone shell of radii 40-46 mm) under 6 mm of soft tissue above its equator, ``lower_mm`` below."""
    axes = [(np.arange(int(120 / s) | 1) - (int(120 / s) | 1) // 2) * s for s in spacing]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    radius = np.sqrt(x**2 + y**2 + z**2)
    outer = np.where(z > 0, 52.0, 46.0 + lower_mm)
    ct = np.select([radius < 40, radius < 46, radius < outer], [30.0, 1400.0, 40.0], -1000.0)
    return ct, radius < outer


def test_scalp_thickness_of_a_6_mm_shell_over_the_vault_only() -> None:
    values = study.scalp_thickness(*_head((1.0, 1.0, 1.0)), (1.0, 1.0, 1.0))
    assert abs(np.median(values) - 6.0) < 1.0 and values.max() <= 15.0
    # a thicker scalp below the skull's widest slice is not the vault: the same values
    np.testing.assert_array_equal(study.scalp_thickness(*_head((1.0, 1.0, 1.0), 12.0), (1.0, 1.0, 1.0)), values)
    anisotropic = _head((1.0, 1.0, 2.0))
    assert abs(np.median(study.scalp_thickness(*anisotropic, (1.0, 1.0, 2.0))) - 6.0) < 1.0
    assert np.median(study.scalp_thickness(*anisotropic, (1.0, 1.0, 1.0))) < 5.0  # the spacing is used
    with pytest.raises(ValueError, match="no voxel of the head is above"):
        study.scalp_thickness(np.zeros((9, 9, 9)), np.ones((9, 9, 9)), (1.0, 1.0, 1.0))


def _table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith(f"| {first_cell}")
    ]


def test_main_on_the_phantom_reports_both_discriminators_at_both_resolutions(phantom: Path, tmp_path: Path) -> None:
    path = study.main(
        output_dir=str(tmp_path / "out"),
        dataset_dir=str(phantom),
        iterations=3,
        preset="smoke",
        paper_crop=48,
        publish_dir=str(tmp_path / "docs"),
    )
    text = Path(path).read_text(encoding="utf-8")
    assert text.startswith(study.TITLE) and "--iterations 3" in text and "(c) not measured" in text
    demo_mm = PRESETS["smoke"].pixdim()[0]
    rows = _table_rows(text, "demo") + _table_rows(text, "paper")
    expected = {
        (resolution, f"{name} ({study.receptive_field(layers)} px = {study.receptive_field(layers) * mm:.0f} mm)")
        for resolution, mm in ((f"demo ({demo_mm:g} mm)", demo_mm), ("paper (1.8 mm)", 1.8))
        for name, layers in study.DISCRIMINATORS.items()
    }
    assert {(row[0], row[1]) for row in rows} == expected and len(rows) == 4
    test_mask = study.subject_files(phantom, "test")[0]["mask"]
    for row in rows:
        assert row[2] == study.FAKES[0]
        balanced, hit, rejection = (float(v) for v in row[3:6])
        assert balanced == pytest.approx((hit + rejection) / 2, abs=1e-3)
        mm = demo_mm if row[0].startswith("demo") else 1.8
        mask = mask_preprocessing("image", [mm] * 3)({"image": test_mask})["image"][0].numpy() > 0
        assert int(row[6]) == len(study.middle_slices(mask))
    scalp = _table_rows(text, "phantom") + _table_rows(text, "pooled")
    assert len(scalp) == 2 * (PRESETS["smoke"].data["n_test"] + 1)
    assert all(0.0 < float(row[4]) < 15.0 for row in scalp)
    published = (tmp_path / "docs" / "results.md").read_text(encoding="utf-8")
    assert f"<!-- {study.SECTION} -->" in published and study.TITLE in published


def test_missing_inputs_are_named(phantom: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"model\.pt: no trained CycleGAN in --cyclegan_run"):
        study.main(output_dir=str(tmp_path), dataset_dir=str(phantom), cyclegan_run=str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match=r"datalist_mr_ct\.json: no phantom in --dataset_dir"):
        study.main(output_dir=str(tmp_path), dataset_dir=str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="iterations must be a whole number"):
        study.main(output_dir=str(tmp_path), dataset_dir=str(phantom), iterations=0)
