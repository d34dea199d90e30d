"""bundle.registration.residual_displacement: recovers a known displacement, zero for aligned volumes, clear errors.

The volumes are a smooth synthetic head (ellipsoid with inner blobs) on a 2 mm grid, warped by an analytic smooth
displacement field whose length inside the mask is known exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from bundle.registration import residual_displacement
from scipy import ndimage

DATA = Path(__file__).parent / "data"

SPACING = (2.0, 2.0, 2.0)
SHAPE = (48, 44, 36)


def _head() -> tuple[np.ndarray, np.ndarray]:
    """A smooth head-like volume and its mask."""
    rng = np.random.default_rng(0)
    axes = [np.arange(n) - (n - 1) / 2 for n in SHAPE]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    radius = np.sqrt((x / 20) ** 2 + (y / 18) ** 2 + (z / 14) ** 2)
    image = np.where(radius < 1.0, 1.0, 0.0) + np.where(radius < 0.8, 0.5, 0.0)
    for _ in range(12):  # inner structures, so the interior has something to register
        centre = rng.uniform(-0.5, 0.5, 3) * np.array([36, 32, 24])
        size = rng.uniform(2.0, 4.0)
        image += rng.uniform(-0.8, 0.8) * np.exp(
            -((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) / (2 * size**2)
        )
    image = ndimage.gaussian_filter(image, 1.0)
    return image.astype(np.float32), radius < 0.95


def _displacement_mm() -> np.ndarray:
    """A smooth field (3, X, Y, Z) in mm: up to 4 mm, varying over the ~90 mm field of view."""
    x, y, z = np.meshgrid(*[np.arange(n) * SPACING[0] for n in SHAPE], indexing="ij")
    return np.stack(
        [
            3.0 * np.sin(2 * np.pi * y / 96.0),
            2.0 * np.cos(2 * np.pi * x / 96.0),
            1.5 * np.sin(2 * np.pi * (x + z) / 120.0),
        ]
    )


def _warp(image: np.ndarray, displacement_mm: np.ndarray) -> np.ndarray:
    """image(x + u(x)), linear interpolation."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")).astype(np.float64)
    coordinates = grid + displacement_mm / np.asarray(SPACING)[:, None, None, None]
    return ndimage.map_coordinates(image, coordinates, order=1, mode="nearest").astype(np.float32)


def test_aligned_volumes_have_no_residual_displacement() -> None:
    image, mask = _head()
    result = residual_displacement(image, image, SPACING, mask)
    assert result["mean_mm"] < 0.1 and result["max_mm"] < 0.3


def test_another_contrast_of_aligned_anatomy_is_not_displaced() -> None:
    image, mask = _head()
    remapped = np.exp(-image)  # an invertible intensity remap: what a synthesis with off intensities looks like
    assert residual_displacement(remapped, image, SPACING, mask)["mean_mm"] < 0.5  # a quarter of a voxel


def test_recovers_a_known_displacement_inside_the_mask() -> None:
    image, mask = _head()
    displacement = _displacement_mm()
    warped = _warp(image, displacement)
    truth = np.linalg.norm(displacement, axis=0)[mask]
    result = residual_displacement(torch.from_numpy(warped)[None], torch.from_numpy(image)[None], SPACING, mask)
    assert result["mean_mm"] == pytest.approx(truth.mean(), rel=0.2)
    assert result["p95_mm"] == pytest.approx(np.percentile(truth, 95), rel=0.25)
    half = residual_displacement(_warp(image, 0.5 * displacement), image, SPACING, mask)
    assert half["mean_mm"] == pytest.approx(0.5 * truth.mean(), rel=0.25)
    again = residual_displacement(warped, image, SPACING, mask)
    # seeded sampling: a repeat agrees up to the order of the metric's multi-threaded sums
    assert again["mean_mm"] == pytest.approx(result["mean_mm"], rel=1e-9)


def test_bad_inputs_raise_clear_errors() -> None:
    image, mask = _head()
    with pytest.raises(ValueError, match="one grid"):
        residual_displacement(image[:-1], image, SPACING)
    with pytest.raises(ValueError, match="3-D"):
        residual_displacement(image[..., 0], image[..., 0], SPACING)
    nan = image.copy()
    nan[3, 3, 3] = np.nan
    with pytest.raises(ValueError, match="moving volume contains NaN"):
        residual_displacement(nan, image, SPACING)
    with pytest.raises(ValueError, match="fixed volume is constant"):
        residual_displacement(image, np.zeros_like(image), SPACING)
    with pytest.raises(ValueError, match="mask has no voxel"):
        residual_displacement(image, image, SPACING, np.zeros_like(mask))
    with pytest.raises(ValueError, match="mask of shape"):
        residual_displacement(image, image, SPACING, mask[:-1])
    with pytest.raises(ValueError, match="seed must be at least 1"):
        residual_displacement(image, image, SPACING, seed=0)
    with pytest.raises(ValueError, match="spacing"):
        residual_displacement(image, image, (2.0, 0.0, 2.0))


def test_recovers_a_large_distortion_of_a_phantom_volume() -> None:
    """The dose-response study's 20 mm level (scripts/dose_response.py instrument, T2 to PD, phantom004): the
    undistorted PD registered onto its distorted copy. Run as the levels of one SimpleITK registration, L-BFGS-B
    ended the full-resolution level near the identity (0.30 mm here) whatever the coarse levels had recovered."""
    case = np.load(DATA / "registration_phantom004_pd_20mm.npz")
    shape = tuple(int(n) for n in case["shape"])
    mask = np.unpackbits(case["mask"])[: np.prod(shape)].reshape(shape).astype(bool)
    moving, fixed = (case[name].astype(np.float32) for name in ("moving", "fixed"))
    applied_mean_mm = 11.129  # the distortion's analytic field on the mask (dose_response.applied_means)
    result = residual_displacement(moving, fixed, (2.4, 2.4, 2.4), mask)
    assert result["mean_mm"] == pytest.approx(applied_mean_mm, rel=0.05)


def test_the_evaluation_metric_registers_with_its_iterations(monkeypatch: pytest.MonkeyPatch) -> None:
    import bundle.registration
    from bundle.metrics import metric_functions
    from monai.data import MetaTensor

    calls = []

    def fake(moving, fixed, spacing, mask, **kwargs) -> dict:
        calls.append((tuple(moving.shape), list(spacing), kwargs))
        return {"mean_mm": 1.5, "p95_mm": 2.5, "max_mm": 3.0}

    monkeypatch.setattr(bundle.registration, "residual_displacement", fake)
    metric = metric_functions("MR", residual_displacement=True, registration_iterations=3)["displacement"]
    image, mask = _head()
    affine = torch.diag(torch.tensor([*SPACING, 1.0]))
    y = MetaTensor(torch.stack([torch.from_numpy(image), torch.from_numpy(mask).float()])[None], affine=affine)
    value = metric(y_pred=torch.from_numpy(image)[None, None], y=y)
    assert calls == [(SHAPE, list(SPACING), {"iterations": 3})]
    assert value.tolist() == [[1.5, 2.5]]


def test_the_smoke_preset_evaluates_with_fewer_registration_iterations(tmp_path: Path) -> None:
    from scripts.tooling.study import EXPERIMENTS, PRESETS, Run, evaluation_parser

    for name, expected in (("smoke", 5), ("cpu", None)):
        parser = evaluation_parser(Run("x", EXPERIMENTS["undeformed"]), PRESETS[name], tmp_path, tmp_path / "run")
        assert parser.get_parsed_content("registration_iterations") == expected
