"""Domain-specific distortion: one fixed, smooth, invertible non-linear warp applied to every volume of a domain.

The paper's deformed-T2 experiment (Wang et al. 2018, "Experiments Setup") applies "an arbitrary non-linear
distortion" to every T2-weighted volume of IXI; the ground truth of a distorted source is the other contrast
distorted the same way. :class:`DomainDistortion` (array) and :class:`DomainDistortiond` (dictionary) reproduce
that distortion on any volume, real or phantom.

The displacement field is a uniform cubic B-spline free-form deformation (Rueckert et al. 1999) defined in
millimetres, so the same anatomy is displaced by the same amount at any voxel spacing:

* its frame is the volume's anatomical frame: voxel axes relabelled to R, A, S by nibabel's ``io_orientation``
  (flips and permutations are honoured; an oblique acquisition carries the field with its few degrees of tilt),
  with the origin at the centre of the field of view, which is close to the scanner isocentre about which
  scanner-specific distortions (gradient non-linearity) are fixed, and which does not depend on where a file
  puts its world origin. Volumes on one grid (a subject's co-registered contrasts and masks) therefore get the
  identical distortion; apply it before steps that move the field-of-view centre (``Spacingd`` shifts it by up
  to half a voxel, ``CropForegroundd`` by more);
* the control points are random (seeded, uniform per component) and scaled so that the largest displacement
  anywhere in the field is ``max_displacement_mm``;
* every control-point displacement is kept below ``spacing / 2.48``, the sufficient condition of Choi & Lee (2000)
  for an injective 3-D cubic B-spline deformation (used as the diffeomorphism constraint of Rueckert et al. 2006),
  so the Jacobian determinant of ``x -> x + u(x)`` is positive everywhere and the warp is invertible.

A volume ``I`` becomes ``I'(x) = I(x + u(x))`` (pull-back), resampled with ``torch.nn.functional.grid_sample``.

References:
    Rueckert D, Sonoda LI, Hayes C, Hill DLG, Leach MO, Hawkes DJ. Nonrigid registration using free-form
    deformations: application to breast MR images. IEEE TMI 18(8):712-721, 1999.
    Choi Y, Lee S. Injectivity conditions of 2D and 3D uniform cubic B-spline functions. Graphical Models
    62(6):411-427, 2000.
    Rueckert D, Aljabar P, Heckemann RA, Hajnal JV, Hammers A. Diffeomorphic registration using B-splines.
    MICCAI 2006, LNCS 4191:702-709.
"""

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

__all__ = [
    "INJECTIVITY_FACTOR",
    "BSplineField",
    "DomainDistortion",
    "DomainDistortiond",
    "cubic_bspline",
    "cubic_bspline_derivative",
    "resample_volume",
]

# Choi & Lee (2000): a 3-D uniform cubic B-spline deformation is injective if every control-point displacement
# component is below spacing / 2.48 (Rueckert et al. 2006 round it to 0.4 x spacing).
INJECTIVITY_FACTOR = 1.0 / 2.48


def cubic_bspline(t: np.ndarray) -> np.ndarray:
    """Uniform cubic B-spline kernel beta3(t), support (-2, 2), partition of unity.

    Args:
        t: positions in units of the control-point spacing, relative to the control point.

    Returns:
        beta3(t), same shape as ``t``.
    """
    a = np.abs(t)
    return np.where(a < 1.0, 2.0 / 3.0 - a**2 + 0.5 * a**3, np.where(a < 2.0, (2.0 - a) ** 3 / 6.0, 0.0))


def cubic_bspline_derivative(t: np.ndarray) -> np.ndarray:
    """Derivative d beta3 / dt of :func:`cubic_bspline`.

    Args:
        t: positions in units of the control-point spacing.

    Returns:
        d beta3(t) / dt, same shape as ``t``.
    """
    a = np.abs(t)
    return np.sign(t) * np.where(a < 1.0, -2.0 * a + 1.5 * a**2, np.where(a < 2.0, -0.5 * (2.0 - a) ** 2, 0.0))


class BSplineField:
    """A smooth field (scalar or vector) given by uniform cubic B-spline coefficients on a lattice centred at 0.

    Control point ``m`` of an axis with ``n`` points sits at ``(m - (n - 1) / 2) * spacing`` mm; the field is zero
    beyond two spacings outside the lattice. Evaluation on a rectilinear grid is a tensor product of three small
    basis matrices, so a 256 x 256 x 130 field costs a few BLAS calls.

    Args:
        coefficients: array ``(components, n0, n1, n2)``.
        spacing_mm: control-point spacing in mm, one value or one per axis.

    Example::

        field = BSplineField(np.random.default_rng(0).standard_normal((3, 9, 9, 9)), spacing_mm=40.0)
        u = field.on_grid([np.linspace(-100, 100, 64)] * 3)  # (3, 64, 64, 64), mm
    """

    def __init__(self, coefficients: np.ndarray, spacing_mm: float | Sequence[float]) -> None:
        coefficients = np.asarray(coefficients, dtype=np.float64)
        if coefficients.ndim != 4:
            raise ValueError(f"coefficients must be (components, n0, n1, n2), got shape {coefficients.shape}.")
        self.coefficients = coefficients
        self.spacing_mm = np.asarray(ensure_tuple_rep(spacing_mm, 3), dtype=np.float64)
        if np.any(self.spacing_mm <= 0):
            raise ValueError(f"spacing_mm must be positive, got {spacing_mm}.")

    def basis_matrix(self, positions_mm: np.ndarray, axis: int, derivative: bool = False) -> np.ndarray:
        """Basis functions of one axis at the given positions: ``(len(positions), n_axis)``.

        Args:
            positions_mm: coordinates along ``axis`` in mm.
            axis: lattice axis (0, 1 or 2).
            derivative: return d/dx of the basis (per mm) instead of the basis.

        Returns:
            float64 matrix B with ``field = sum_m B[i, m] c[m]`` along that axis.
        """
        n = self.coefficients.shape[1 + axis]
        centres = np.arange(n) - (n - 1) / 2.0
        t = np.asarray(positions_mm, dtype=np.float64)[:, None] / self.spacing_mm[axis] - centres[None, :]
        if derivative:
            return cubic_bspline_derivative(t) / self.spacing_mm[axis]
        return cubic_bspline(t)

    def on_grid(
        self,
        axes_mm: Sequence[np.ndarray],
        derivative_axis: int | None = None,
        axis_order: Sequence[int] = (0, 1, 2),
        dtype: np.dtype | type = np.float32,
    ) -> np.ndarray:
        """Evaluate the field on the rectilinear grid ``axes_mm[0] x axes_mm[1] x axes_mm[2]``.

        Args:
            axes_mm: for each output axis, the coordinates (mm) along the lattice axis ``axis_order[k]``.
            derivative_axis: lattice axis to differentiate along (per mm), or None for the field itself.
            axis_order: lattice axis evaluated along each output axis, to follow a permuted voxel order.
            dtype: output dtype.

        Returns:
            array ``(components, len(axes_mm[0]), len(axes_mm[1]), len(axes_mm[2]))``.
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
    """Sample a channel-first 3-D volume at fractional voxel coordinates (pull-back resampling).

    Args:
        volume: ``(C, X, Y, Z)`` values.
        voxel_coordinates: ``(3, *out_shape)`` voxel coordinates into ``volume`` (index space, 0 = first voxel).
        mode: ``"bilinear"`` (trilinear) or ``"nearest"``.
        padding_mode: ``"border"``, ``"zeros"`` or ``"reflection"`` for coordinates outside the volume.

    Returns:
        float32 tensor ``(C, *out_shape)``.
    """
    values = torch.as_tensor(volume, dtype=torch.float32)
    coords = torch.as_tensor(voxel_coordinates, dtype=torch.float32)
    sizes = values.shape[1:]
    # grid_sample wants (x, y, z) = (last, middle, first) axis, normalised to [-1, 1] with align_corners=True.
    grid = torch.empty((*coords.shape[1:], 3), dtype=torch.float32)
    for k, d in enumerate((2, 1, 0)):
        torch.add(coords[d], -0.5 * max(sizes[d] - 1, 1), alpha=1.0, out=grid[..., k])
        grid[..., k].mul_(2.0 / max(sizes[d] - 1, 1))
    out = F.grid_sample(
        values.as_subclass(torch.Tensor)[None],
        grid[None],
        mode=str(mode),
        padding_mode=str(padding_mode),
        align_corners=True,
    )
    return out[0]


class DomainDistortion(Transform):
    """Apply one fixed, smooth, invertible non-linear distortion (in mm) to channel-first 3-D volumes.

    The same instance (same ``seed``) distorts every volume of a domain identically relative to its anatomical
    frame (see the module docstring), whatever the voxel spacing. The transform is deterministic on purpose: it is
    not ``Randomizable``, so ``CacheDataset`` caches its output and ``Compose.set_random_state`` cannot change the
    domain's distortion between epochs.

    Args:
        max_displacement_mm: largest displacement length of the field, in mm.
        control_spacing_mm: B-spline control-point spacing in mm; larger is smoother. The injectivity bound
            limits ``max_displacement_mm`` to about ``0.28 x control_spacing_mm`` (11 mm for 40 mm).
        support_mm: edge length of the cube (centred on the field of view) covered by control points; the field
            fades to zero within two spacings outside it.
        seed: seed of the control-point displacements.
        mode: interpolation, ``"bilinear"`` for images, ``"nearest"`` for label maps and masks.
        padding_mode: ``"border"`` (default: repeats the background at the volume edge), ``"zeros"`` or
            ``"reflection"``.

    Raises:
        ValueError: if the field would violate the injectivity bound.

    Example::

        distort = DomainDistortion(max_displacement_mm=8.0, seed=0)
        t2_distorted = distort(t2)  # t2: MetaTensor (1, X, Y, Z) with its affine
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
        self.max_displacement_mm = float(max_displacement_mm)
        self.control_spacing_mm = float(control_spacing_mm)
        self.support_mm = float(support_mm)
        self.seed = int(seed)
        self.mode = mode
        self.padding_mode = padding_mode

        n = 2 * int(np.ceil(0.5 * support_mm / control_spacing_mm)) + 1
        # bounded (uniform) control points: the field's peak is 0.7-0.9 of the largest control point, so the
        # injectivity bound still leaves room for ~0.28 x spacing of displacement
        coefficients = np.random.default_rng(seed).uniform(-1.0, 1.0, (3, n, n, n))
        unit = BSplineField(coefficients, control_spacing_mm)
        peak = self._peak_length(unit)
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
    def _peak_length(field: BSplineField) -> float:
        """Largest displacement length of ``field`` over its whole support, sampled at 1/8 of the spacing."""
        n = field.coefficients.shape[1]
        half = (n - 1) / 2.0 * field.spacing_mm[0]
        axis = np.linspace(-half, half, 8 * (n - 1) + 1)
        u = field.on_grid([axis, axis, axis], dtype=np.float64)
        return float(np.sqrt((u**2).sum(axis=0)).max())

    @staticmethod
    def _frame(shape: Sequence[int], affine: np.ndarray) -> tuple[list[np.ndarray], list[int], np.ndarray]:
        """Coordinates (mm) of each voxel axis in the anatomical frame, the frame axis of each voxel axis, and
        the factor converting a frame displacement (mm) into voxels along each voxel axis."""
        affine = np.asarray(affine, dtype=np.float64)
        spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        orientation = nib.orientations.io_orientation(affine)
        frame_axis = [int(a) for a in orientation[:, 0]]
        sign = orientation[:, 1]
        axes_mm = [sign[d] * spacing[d] * (np.arange(shape[d]) - (shape[d] - 1) / 2.0) for d in range(3)]
        return axes_mm, frame_axis, sign / spacing

    def displacement_voxels(self, shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
        """Displacement of every voxel of a volume, in voxels along its own axes.

        Args:
            shape: spatial shape ``(X, Y, Z)``.
            affine: 4 x 4 voxel-to-world affine of the volume.

        Returns:
            float32 ``(3, X, Y, Z)``; voxel ``i`` of the distorted volume samples the input at ``i + d[:, i]``.
        """
        axes_mm, frame_axis, mm_to_voxels = self._frame(shape, affine)
        u = self.field.on_grid(axes_mm, axis_order=frame_axis)
        if frame_axis != [0, 1, 2]:
            u = u[frame_axis]  # component of each voxel axis
        for d in range(3):
            u[d] *= np.float32(mm_to_voxels[d])
        return u

    def jacobian_determinant(self, shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
        """Analytic Jacobian determinant of ``x -> x + u(x)`` at every voxel centre.

        Args:
            shape: spatial shape ``(X, Y, Z)``.
            affine: 4 x 4 voxel-to-world affine.

        Returns:
            float64 ``(X, Y, Z)``; positive everywhere for an invertible distortion.
        """
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
        """Distort a channel-first volume ``(C, X, Y, Z)``.

        Args:
            img: the volume; a ``MetaTensor`` carries its own affine.
            affine: voxel-to-world affine; required when ``img`` is not a ``MetaTensor``.
            mode: overrides ``self.mode`` for this call.
            padding_mode: overrides ``self.padding_mode`` for this call.

        Returns:
            the distorted volume, same type and geometry (affine, shape) as ``img``; float32 after bilinear
            interpolation, the input dtype after nearest-neighbour interpolation.
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
        if str(mode) == GridSampleMode.NEAREST:
            out = out.to(data.dtype)
        out = out.to(data.device)
        if isinstance(img, MetaTensor):
            return MetaTensor(out, meta=img.meta, applied_operations=img.applied_operations)
        if isinstance(img, np.ndarray):
            return out.numpy()
        return out


class DomainDistortiond(MapTransform):
    """Dictionary wrapper of :class:`DomainDistortion`: the same distortion for every key.

    Use it on all volumes of the distorted domain, and on the ground truth derived from the other domain (the
    paper's deformed-T2 experiment), with ``mode="nearest"`` for masks.

    Args:
        keys: keys of the volumes to distort.
        max_displacement_mm: see :class:`DomainDistortion`.
        control_spacing_mm: see :class:`DomainDistortion`.
        support_mm: see :class:`DomainDistortion`.
        seed: see :class:`DomainDistortion`.
        mode: interpolation per key (one value or one per key).
        padding_mode: padding per key (one value or one per key).
        allow_missing_keys: do not raise if a key is missing.

    Example::

        DomainDistortiond(keys=["image", "mask"], max_displacement_mm=8.0, seed=0, mode=["bilinear", "nearest"])
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
        """Distort every key of ``data``; each value must be a channel-first ``MetaTensor``.

        Args:
            data: dictionary of volumes.

        Returns:
            a new dictionary with the distorted volumes.
        """
        d = dict(data)
        for key, mode, padding_mode in self.key_iterator(d, self.mode, self.padding_mode):
            d[key] = self.distortion(d[key], mode=mode, padding_mode=padding_mode)
        return d
