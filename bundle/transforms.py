"""Domain-specific distortion (the paper's deformed-T2 experiment): every volume ``I`` of a domain becomes
``I'(x) = I(x + u(x))``, ``u`` a seeded uniform cubic B-spline free-form deformation in mm along the volume's voxel
axes relabelled to R, A, S (``io_orientation``; origin at the field-of-view centre: apply it before ``Spacingd`` or
``CropForegroundd``), with largest displacement ``max_displacement_mm`` and every control point below
``spacing / 2.48`` (Choi & Lee 2000), so the Jacobian determinant is positive everywhere and the warp invertible."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import ClassVar

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection, SequenceStr
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import GridSampleMode, GridSamplePadMode, TransformBackends, ensure_tuple_rep

__all__ = ["INJECTIVITY_FACTOR", "BSplineField", "DomainDistortion", "DomainDistortiond", "cubic_bspline"]
__all__ += ["cubic_bspline_derivative", "resample_volume"]

INJECTIVITY_FACTOR = 1.0 / 2.48  # Choi & Lee (2000); Rueckert et al. (2006) round it to 0.4


def cubic_bspline(t: np.ndarray) -> np.ndarray:
    """Uniform cubic B-spline kernel beta3(t) (support (-2, 2), partition of unity) at ``t``, in units of the
    control-point spacing relative to the control point; same shape as ``t``."""
    a = np.abs(t)
    return np.where(a < 1.0, 2.0 / 3.0 - a**2 + 0.5 * a**3, np.where(a < 2.0, (2.0 - a) ** 3 / 6.0, 0.0))


def cubic_bspline_derivative(t: np.ndarray) -> np.ndarray:
    """Derivative d beta3 / dt of :func:`cubic_bspline` at ``t``; same shape as ``t``."""
    a = np.abs(t)
    return np.sign(t) * np.where(a < 1.0, -2.0 * a + 1.5 * a**2, np.where(a < 2.0, -0.5 * (2.0 - a) ** 2, 0.0))


class BSplineField:
    """A smooth (scalar or vector) field of uniform cubic B-spline coefficients on a lattice centred at 0: control
    point ``m`` of an axis of ``n`` sits at ``(m - (n - 1) / 2) * spacing`` mm; zero two spacings beyond the lattice.

    Args:
        coefficients, spacing_mm: array ``(components, n0, n1, n2)``; control-point spacing (mm), one or one per axis.

    Raises:
        ValueError: if ``coefficients`` is not 4-D or a spacing is not positive.
    """

    def __init__(self, coefficients: np.ndarray, spacing_mm: float | Sequence[float]) -> None:
        coefficients = np.asarray(coefficients, dtype=np.float64)
        if coefficients.ndim != 4:
            raise ValueError(f"coefficients must be (components, n0, n1, n2), got shape {coefficients.shape}.")
        self.coefficients, self.spacing_mm = coefficients, np.asarray(ensure_tuple_rep(spacing_mm, 3), dtype=np.float64)
        if np.any(self.spacing_mm <= 0):
            raise ValueError(f"spacing_mm must be positive, got {spacing_mm}.")

    def basis_matrix(self, positions_mm: np.ndarray, axis: int, derivative: bool = False) -> np.ndarray:
        """float64 basis matrix ``B`` ``(len(positions_mm), n_axis)`` of lattice ``axis`` (0, 1 or 2) at coordinates
        ``positions_mm`` (mm): ``field = sum_m B[i, m] c[m]``; with ``derivative``, that of d/dx (per mm)."""
        n = self.coefficients.shape[1 + axis]
        t = np.asarray(positions_mm, dtype=np.float64)[:, None] / self.spacing_mm[axis] - (np.arange(n) - (n - 1) / 2)
        return cubic_bspline_derivative(t) / self.spacing_mm[axis] if derivative else cubic_bspline(t)

    def on_grid(
        self,
        axes_mm: Sequence[np.ndarray],
        derivative_axis: int | None = None,
        axis_order: Sequence[int] = (0, 1, 2),
        dtype: np.dtype | type = np.float32,
    ) -> np.ndarray:
        """The field on the grid ``axes_mm[0] x axes_mm[1] x axes_mm[2]``: ``(components, *map(len, axes_mm))``.

        Args:
            axes_mm, axis_order: per output axis ``k``, coordinates (mm) along lattice axis ``axis_order[k]``.
            derivative_axis, dtype: lattice axis to differentiate along (per mm), or None for the field; output dtype.
        """
        bases = [
            self.basis_matrix(positions, lattice_axis, derivative=lattice_axis == derivative_axis)
            for positions, lattice_axis in zip(axes_mm, axis_order, strict=True)
        ]
        coefficients = np.transpose(self.coefficients, (0, *[1 + a for a in axis_order]))
        # contract the two last axes on the small lattice first, then one matmul writes the full grid
        partial = np.einsum("jb,kc,mabc->majk", bases[1], bases[2], coefficients, optimize=True).astype(dtype)
        components, n0, n1, n2 = partial.shape
        out = np.matmul(bases[0].astype(dtype)[None], partial.reshape(components, n0, n1 * n2))
        return out.reshape(components, len(bases[0]), n1, n2)


def resample_volume(
    volume: np.ndarray | torch.Tensor,
    voxel_coordinates: np.ndarray | torch.Tensor,
    mode: str = GridSampleMode.BILINEAR,
    padding_mode: str = GridSamplePadMode.BORDER,
) -> torch.Tensor:
    """Sample a volume at fractional voxel coordinates (pull-back); returns float32 ``(C, *out_shape)``.

    Args:
        volume, voxel_coordinates: channel-first ``(C, X, Y, Z)``; ``(3, *out_shape)`` in index space (0: first voxel).
        mode, padding_mode: ``"bilinear"`` (trilinear) or ``"nearest"``; ``"border"``, ``"zeros"`` or ``"reflection"``.
    """
    values = torch.as_tensor(volume, dtype=torch.float32).as_subclass(torch.Tensor)
    coords = torch.as_tensor(voxel_coordinates, dtype=torch.float32)
    sizes = values.shape[1:]
    # grid_sample wants (x, y, z) = (last, middle, first) axis, normalised to [-1, 1] with align_corners=True.
    grid = torch.empty((*coords.shape[1:], 3), dtype=torch.float32)
    for k, d in enumerate((2, 1, 0)):
        torch.add(coords[d], -0.5 * max(sizes[d] - 1, 1), alpha=1.0, out=grid[..., k])
        grid[..., k].mul_(2.0 / max(sizes[d] - 1, 1))
    out = F.grid_sample(values[None], grid[None], mode=str(mode), padding_mode=str(padding_mode), align_corners=True)
    return out[0]


class DomainDistortion(Transform):
    """Apply one fixed, smooth, invertible distortion (in mm, see the module) to channel-first 3-D volumes; not
    ``Randomizable`` on purpose, so ``CacheDataset`` caches it and no random state changes it.

    Args:
        max_displacement_mm, control_spacing_mm: largest displacement (mm), at most ~0.28 x control-point spacing (mm).
        support_mm, seed: edge of the cube (centred on the field of view) covered by control points; their seed.
        mode, padding_mode: ``"bilinear"``, or ``"nearest"`` for masks; ``"border"``, ``"zeros"`` or ``"reflection"``.

    Raises:
        ValueError: if a parameter is out of range or the field would violate the injectivity bound.
    """

    backend: ClassVar[list[TransformBackends]] = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        max_displacement_mm: float = 8.0,
        control_spacing_mm: float = 40.0,
        support_mm: float = 400.0,
        seed: int = 0,
        mode: str = GridSampleMode.BILINEAR,
        padding_mode: str = GridSamplePadMode.BORDER,
    ) -> None:
        if max_displacement_mm < 0:
            raise ValueError(f"max_displacement_mm must be >= 0, got {max_displacement_mm}.")
        if control_spacing_mm <= 0 or support_mm <= 0:
            raise ValueError("control_spacing_mm and support_mm must be positive.")
        self.max_displacement_mm, self.control_spacing_mm = float(max_displacement_mm), float(control_spacing_mm)
        self.support_mm, self.seed, self.mode, self.padding_mode = float(support_mm), int(seed), mode, padding_mode
        n = 2 * int(np.ceil(0.5 * support_mm / control_spacing_mm)) + 1
        coefficients = np.random.default_rng(seed).uniform(-1.0, 1.0, (3, n, n, n))
        half = (n - 1) / 2.0 * self.control_spacing_mm
        axis = np.linspace(-half, half, 8 * (n - 1) + 1)  # the whole support at 1/8 of the spacing
        u = BSplineField(coefficients, control_spacing_mm).on_grid([axis, axis, axis], dtype=np.float64)
        peak = float(np.sqrt((u**2).sum(axis=0)).max())  # largest displacement length
        scale = self.max_displacement_mm / peak if peak > 0 else 0.0
        self.field = BSplineField(coefficients * scale, control_spacing_mm)
        largest = float(np.abs(self.field.coefficients).max())
        bound = INJECTIVITY_FACTOR * self.control_spacing_mm
        if largest >= bound:
            raise ValueError(
                f"max_displacement_mm={max_displacement_mm} needs a control-point displacement of {largest:.1f} mm, "
                f"above the injectivity bound {bound:.1f} mm (spacing / 2.48) for control_spacing_mm="
                f"{control_spacing_mm}: lower the magnitude or increase control_spacing_mm."
            )

    @staticmethod
    def _frame(shape: Sequence[int], affine: np.ndarray) -> tuple[list[np.ndarray], list[int], np.ndarray]:
        """Coordinates (mm) of each voxel axis in the anatomical frame, the frame axis of each voxel axis, and
        the factor converting a frame displacement (mm) into voxels along each voxel axis."""
        affine = np.asarray(affine, dtype=np.float64)
        spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        orientation = nib.orientations.io_orientation(affine)
        frame_axis, sign = [int(a) for a in orientation[:, 0]], orientation[:, 1]
        axes_mm = [sign[d] * spacing[d] * (np.arange(shape[d]) - (shape[d] - 1) / 2.0) for d in range(3)]
        return axes_mm, frame_axis, sign / spacing

    def displacement_voxels(self, shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
        """float32 ``(3, X, Y, Z)`` displacement ``d`` in voxels along the axes of a volume of spatial ``shape``
        ``(X, Y, Z)`` and 4 x 4 voxel-to-world ``affine``: voxel ``i`` of the output samples ``i + d[:, i]``."""
        axes_mm, frame_axis, mm_to_voxels = self._frame(shape, affine)
        u = self.field.on_grid(axes_mm, axis_order=frame_axis)
        if frame_axis != [0, 1, 2]:
            u = u[frame_axis]  # component of each voxel axis
        u *= mm_to_voxels.astype(np.float32)[:, None, None, None]
        return u

    def jacobian_determinant(self, shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
        """float64 ``(X, Y, Z)`` analytic Jacobian determinant of ``x -> x + u(x)`` at the voxel centres of a volume
        (``shape``, ``affine``: as for :meth:`displacement_voxels`): positive for an invertible distortion."""
        axes_mm, frame_axis, _ = self._frame(shape, affine)
        jac = np.empty((3, 3, *shape))
        for k in range(3):  # d u / d (frame axis k)
            jac[:, k] = self.field.on_grid(axes_mm, derivative_axis=k, axis_order=frame_axis, dtype=np.float64)
        jac += np.eye(3)[:, :, None, None, None]
        return np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))

    def __call__(
        self,
        img: np.ndarray | torch.Tensor,
        affine: np.ndarray | torch.Tensor | None = None,
        mode: str | None = None,
        padding_mode: str | None = None,
    ) -> np.ndarray | torch.Tensor:
        """Distort a channel-first volume ``(C, X, Y, Z)``: same type and geometry as ``img``, float32 after
        bilinear interpolation, the input dtype after nearest-neighbour interpolation.

        Args:
            img, affine: the volume and its voxel-to-world affine (required unless ``img`` is a ``MetaTensor``).
            mode, padding_mode: override ``self.mode`` and ``self.padding_mode`` for this call.

        Raises:
            ValueError: without an affine, or if ``img`` is not 4-D.
        """
        if affine is None:
            if not isinstance(img, MetaTensor):
                raise ValueError("DomainDistortion needs the volume's affine: pass a MetaTensor or affine=.")
            affine = img.affine
        affine = np.asarray(affine.cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
        if img.ndim != 4:
            raise ValueError(f"expected a channel-first 3-D volume (C, X, Y, Z), got shape {tuple(img.shape)}.")
        mode = self.mode if mode is None else mode
        shape = tuple(img.shape[1:])
        coords = self.displacement_voxels(shape, affine)
        for d in range(3):
            coords[d] += np.arange(shape[d], dtype=np.float32).reshape([-1 if k == d else 1 for k in range(3)])
        data = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
        out = resample_volume(data.cpu(), coords, mode=mode, padding_mode=padding_mode or self.padding_mode)
        out = out.to(data.device, data.dtype if str(mode) == GridSampleMode.NEAREST else torch.float32)
        if isinstance(img, MetaTensor):
            return MetaTensor(out, meta=img.meta, applied_operations=img.applied_operations)
        return out.numpy() if isinstance(img, np.ndarray) else out


class DomainDistortiond(MapTransform):
    """Dictionary wrapper of :class:`DomainDistortion`: the same distortion for every key (channel-first
    ``MetaTensor`` values; masks with ``mode="nearest"``).

    Args:
        keys, allow_missing_keys: keys of the volumes to distort, and whether to skip missing keys.
        max_displacement_mm, control_spacing_mm, support_mm, seed: see :class:`DomainDistortion`.
        mode, padding_mode: interpolation and padding, one value or one per key.
    """

    backend = DomainDistortion.backend

    def __init__(
        self,
        keys: KeysCollection,
        max_displacement_mm: float = 8.0,
        control_spacing_mm: float = 40.0,
        support_mm: float = 400.0,
        seed: int = 0,
        mode: SequenceStr = GridSampleMode.BILINEAR,
        padding_mode: SequenceStr = GridSamplePadMode.BORDER,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.distortion = DomainDistortion(max_displacement_mm, control_spacing_mm, support_mm, seed)
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.padding_mode = ensure_tuple_rep(padding_mode, len(self.keys))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key, mode, padding_mode in self.key_iterator(d, self.mode, self.padding_mode):
            d[key] = self.distortion(d[key], mode=mode, padding_mode=padding_mode)
        return d
