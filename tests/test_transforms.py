"""Domain-specific distortion: magnitude, invertibility, physical-space behaviour, MONAI conventions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bundle.transforms import BSplineField, DomainDistortion, DomainDistortiond, cubic_bspline, resample_volume
from monai.data import MetaTensor
from monai.transforms import Compose


def _axis_aligned(shape: tuple[int, int, int], spacing: tuple[float, float, float], flip: bool = False) -> np.ndarray:
    """Affine centring a grid on world (0, 10, 20) mm; ``flip`` stores it as L-P-S instead of R-A-S."""
    signs = np.array([-1.0, -1.0, 1.0]) if flip else np.ones(3)
    affine = np.diag([*(signs * spacing), 1.0])
    affine[:3, 3] = np.array([0.0, 10.0, 20.0]) - affine[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    return affine


def _world(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """World coordinates (3, X, Y, Z) of every voxel."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).reshape(3, -1)
    return (affine[:3, :3] @ index + affine[:3, 3:]).reshape(3, *shape)


def test_cubic_bspline_partition_of_unity() -> None:
    t = np.linspace(-0.5, 0.5, 11)
    total = sum(cubic_bspline(t - m) for m in range(-3, 4))
    np.testing.assert_allclose(total, 1.0, atol=1e-12)
    assert cubic_bspline(np.array([2.0, -2.5])).tolist() == [0.0, 0.0]


def test_bspline_derivative_matches_finite_difference() -> None:
    field = BSplineField(np.random.default_rng(1).uniform(-5, 5, (2, 6, 5, 7)), (30.0, 40.0, 35.0))
    axes = [np.linspace(-60, 60, 9), np.linspace(-50, 50, 7), np.linspace(-70, 70, 8)]
    step = 1e-4
    for axis in range(3):
        shifted = [a + step if k == axis else a for k, a in enumerate(axes)]
        numeric = (field.on_grid(shifted, dtype=np.float64) - field.on_grid(axes, dtype=np.float64)) / step
        analytic = field.on_grid(axes, derivative_axis=axis, dtype=np.float64)
        np.testing.assert_allclose(analytic, numeric, atol=1e-4)


@pytest.mark.parametrize("magnitude", [3.0, 8.0])
def test_max_displacement_is_the_requested_magnitude(magnitude: float) -> None:
    distortion = DomainDistortion(max_displacement_mm=magnitude, seed=3)
    axis = np.arange(-200.0, 200.0, 2.5)  # finer than the normalisation grid
    u = distortion.field.on_grid([axis, axis, axis], dtype=np.float64)
    length = np.sqrt((u**2).sum(axis=0))
    assert magnitude * 0.98 <= length.max() <= magnitude * 1.02


def test_jacobian_is_positive_analytically_and_numerically() -> None:
    distortion = DomainDistortion(max_displacement_mm=10.0, seed=5)  # close to the injectivity limit
    shape, affine = (60, 60, 50), _axis_aligned((60, 60, 50), (3.0, 3.0, 3.0))
    analytic = distortion.jacobian_determinant(shape, affine)
    assert analytic.min() > 0.0
    assert analytic.max() > 1.05 and analytic.min() < 0.95  # it is a real, non-trivial deformation

    # numerically, from the sampling positions x + u(x) that the transform actually uses
    position = np.indices(shape).astype(np.float64) + distortion.displacement_voxels(shape, affine)
    gradients = np.stack([np.stack(np.gradient(position[c]), axis=0) for c in range(3)])  # d pos_c / d index_k
    numeric = np.linalg.det(np.moveaxis(gradients, (0, 1), (-2, -1)))[2:-2, 2:-2, 2:-2]
    assert numeric.min() > 0.0
    np.testing.assert_allclose(numeric, analytic[2:-2, 2:-2, 2:-2], atol=0.02)


def test_magnitude_beyond_the_injectivity_bound_is_refused() -> None:
    with pytest.raises(ValueError, match=r"injectivity bound.*control_spacing_mm"):
        DomainDistortion(max_displacement_mm=20.0, control_spacing_mm=40.0)
    DomainDistortion(max_displacement_mm=20.0, control_spacing_mm=90.0)  # smoother field: allowed


def test_displacement_is_physical_the_same_at_any_spacing() -> None:
    """On images equal to the world coordinates, trilinear sampling is exact: I'(x) - I(x) = u(x) in mm."""
    distortion = DomainDistortion(max_displacement_mm=6.0, seed=2)
    inner = (slice(None), *(slice(8, -8),) * 3)  # away from the border, where padding repeats the edge
    results = {}
    for spacing, n in ((1.0, 129), (2.0, 65)):  # same field of view, every other fine voxel coincides
        shape = (n, n, n // 2 + 1)
        spacings = (spacing, spacing, 2 * spacing)
        affine = _axis_aligned(shape, spacings)
        image = MetaTensor(torch.from_numpy(_world(shape, affine).astype(np.float32)), affine=affine)
        moved = (distortion(image) - image).numpy()
        # the field in mm, evaluated directly at each voxel's position relative to the field-of-view centre
        expected = distortion.field.on_grid(
            [(np.arange(m) - (m - 1) / 2) * s for m, s in zip(shape, spacings, strict=True)]
        )
        np.testing.assert_allclose(moved[inner], expected[inner], atol=2e-3)
        results[spacing] = moved
    np.testing.assert_allclose(results[1.0][:, ::2, ::2, ::2][inner], results[2.0][inner], atol=2e-3)
    assert 2.0 < np.abs(results[2.0][inner]).max() <= 6.0 + 1e-3


def test_same_anatomy_in_another_orientation_gets_the_same_distortion() -> None:
    distortion = DomainDistortion(max_displacement_mm=6.0, seed=4)
    shape = (40, 44, 36)
    ras, lps = _axis_aligned(shape, (2.0, 2.0, 3.0)), _axis_aligned(shape, (2.0, 2.0, 3.0), flip=True)
    x = _world(shape, ras)
    image = (np.sin(x[0] / 15) + np.cos(x[1] / 11) + x[2] / 50).astype(np.float32)[None]
    out_ras = distortion(image, affine=ras)
    out_lps = distortion(image[:, ::-1, ::-1].copy(), affine=lps)  # same world content, flipped storage
    np.testing.assert_allclose(out_lps[:, ::-1, ::-1], out_ras, atol=1e-5)


def test_metatensor_geometry_and_identity() -> None:
    shape = (20, 22, 18)
    affine = _axis_aligned(shape, (1.5, 1.5, 2.0))
    image = MetaTensor(torch.rand(2, *shape), affine=affine)
    out = DomainDistortion(max_displacement_mm=4.0)(image)
    assert isinstance(out, MetaTensor) and out.shape == image.shape
    np.testing.assert_array_equal(out.affine.numpy(), affine)
    assert not torch.equal(out.as_tensor(), image.as_tensor())
    identity = DomainDistortion(max_displacement_mm=0.0)(image)
    torch.testing.assert_close(identity.as_tensor(), image.as_tensor(), atol=1e-5, rtol=0)


def test_seed_fixes_the_distortion() -> None:
    shape, affine = (16, 16, 12), _axis_aligned((16, 16, 12), (4.0, 4.0, 4.0))
    a = DomainDistortion(seed=7).displacement_voxels(shape, affine)
    np.testing.assert_array_equal(a, DomainDistortion(seed=7).displacement_voxels(shape, affine))
    assert np.abs(a - DomainDistortion(seed=8).displacement_voxels(shape, affine)).max() > 0.5


def test_dictionary_transform_distorts_image_and_mask_alike() -> None:
    shape = (48, 48, 40)
    affine = _axis_aligned(shape, (2.0, 2.0, 2.0))
    x = _world(shape, affine)
    ball = (np.sqrt(x[0] ** 2 + (x[1] - 10) ** 2 + (x[2] - 20) ** 2) < 25).astype(np.uint8)
    data = {
        "image": MetaTensor(torch.from_numpy(ball[None].astype(np.float32) * 100), affine=affine),
        "mask": MetaTensor(torch.from_numpy(ball[None]), affine=affine),
    }
    transform = Compose([DomainDistortiond(["image", "mask"], max_displacement_mm=8.0, mode=["bilinear", "nearest"])])
    out = transform(data)
    mask = out["mask"].as_tensor()
    assert mask.dtype == torch.uint8 and set(torch.unique(mask).tolist()) == {0, 1}
    assert not torch.equal(mask, data["mask"].as_tensor())
    # the nearest-neighbour mask is the image's 50 % level set, up to one voxel along the boundary
    agreement = ((out["image"].as_tensor() >= 50).to(torch.uint8) == mask).float().mean()
    assert agreement > 0.995


def test_bad_inputs_are_named() -> None:
    distortion = DomainDistortion()
    with pytest.raises(ValueError, match="affine"):
        distortion(np.zeros((1, 8, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(C, X, Y, Z\).*\(1, 8, 8\)"):
        distortion(np.zeros((1, 8, 8), dtype=np.float32), affine=np.eye(4))
    with pytest.raises(ValueError, match="max_displacement_mm must be >= 0"):
        DomainDistortion(max_displacement_mm=-1.0)


def test_resample_volume_matches_trilinear_reference() -> None:
    volume = torch.from_numpy(np.random.default_rng(0).random((1, 9, 10, 11), dtype=np.float32))
    coords = np.array([[1.25], [2.5], [3.75]], dtype=np.float32).reshape(3, 1, 1, 1)
    i, j, k = 1.25, 2.5, 3.75
    v = volume[0].numpy().astype(np.float64)
    expected = sum(
        (1 - abs(i - a)) * (1 - abs(j - b)) * (1 - abs(k - c)) * v[a, b, c]
        for a in (1, 2)
        for b in (2, 3)
        for c in (3, 4)
    )
    assert resample_volume(volume, coords).item() == pytest.approx(expected, rel=1e-5)
