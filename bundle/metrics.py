"""Volume metrics of the paper (Wang et al. 2018) on normalised intensities, optionally inside a mask, as MONAI
``CumulativeIterationMetric`` for ``IgniteMetricHandler`` (:func:`metric_handlers`). With ``masked=True`` the ground
truth ``y`` carries the mask as its last channel (:class:`bundle.pairing.PairedVolumesd`): only voxels inside count."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics import CumulativeIterationMetric, compute_dice
from monai.metrics.regression import compute_ssim_and_cs
from monai.utils import MetricReduction

__all__ = ["BONE_THRESHOLD_HU", "BoneDiceMetric", "GlobalSSIMMetric", "ResidualDisplacementMetric", "bone_dice"]
__all__ += ["VolumeErrorMetric", "VolumePSNRMetric", "VolumeSSIMMetric", "VoxelCountMetric", "global_ssim"]
__all__ += ["metric_functions", "metric_handlers", "volume_metrics", "volume_psnr", "voxel_size", "windowed_ssim"]

logger = logging.getLogger(__name__)

# bone in CT: above soft tissue and blood (< 100 HU) and the contrast-enhanced aorta; the usual 200-300 HU cut
BONE_THRESHOLD_HU = 300.0


def _masked(values: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
    """Per batch item, the float values inside ``mask`` (all of them without one), flattened."""
    rows = values.reshape(values.shape[0], -1).float()
    if mask is None:
        return list(rows)
    keep = torch.broadcast_to(mask, values.shape).reshape(values.shape[0], -1).float() > 0
    return [row[k] for row, k in zip(rows, keep, strict=True)]


def _pairs(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> Any:
    return zip(_masked(prediction, mask), _masked(target, mask), strict=True)


def volume_psnr(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's PSNR per batch item, ``10 log10(max(target)^2 / MSE)``: a tensor (N,) in dB.

    Args:
        prediction, target: synthesized volumes (N, C, *spatial) and ground truth of the same shape.
        mask: optional mask broadcastable to ``target``; only voxels where it is non-zero count.
    """
    pairs = _pairs(prediction, target, mask)
    return torch.stack([10.0 * torch.log10(t.max() ** 2 / torch.mean((p - t) ** 2).clamp_min(1e-12)) for p, t in pairs])


def global_ssim(
    prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, k1: float = 0.01, k2: float = 0.03
) -> torch.Tensor:
    """The paper's SSIM per batch item, a tensor (N,): ``(2 mu_p mu_t + c1)(2 s_pt + c2) / ((mu_p^2 + mu_t^2 + c1)
    (s_p^2 + s_t^2 + c2))`` over all voxels (no window), ``c = (k L)^2`` with ``L`` the target's intensity range.

    Args:
        prediction, target: synthesized volumes (N, C, *spatial) and ground truth of the same shape.
        mask: optional mask; only voxels where it is non-zero count.
        k1, k2: SSIM constants for the means and the (co)variances.
    """
    values = []
    for p, t in _pairs(prediction, target, mask):
        data_range = (t.max() - t.min()).clamp_min(1e-12)
        c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
        mu_p, mu_t = p.mean(), t.mean()
        var_p, var_t = p.var(unbiased=False), t.var(unbiased=False)
        cov = ((p - mu_p) * (t - mu_t)).mean()
        values.append(((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2)))
    return torch.stack(values)


def windowed_ssim(
    prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, kernel_size: int = 7
) -> torch.Tensor:
    """MONAI's windowed (Gaussian, sigma 1.5) SSIM per batch item (N,), the mean over the map or the mask's voxels at
    least ``kernel_size // 2`` from the border (NaN if none); data range: the target's range inside the mask.

    Args:
        prediction, target: synthesized volumes (N, C, *spatial), 2 or 3 spatial dimensions, and the ground truth.
        mask: optional mask broadcastable to ``target``.
        kernel_size: window size.

    Raises:
        ValueError: if a mask has no voxel at all.
    """
    spatial_dims, margin = target.ndim - 2, kernel_size // 2
    kernel, sigma = [kernel_size] * spatial_dims, [1.5] * spatial_dims
    inner = (slice(None), slice(None), *[slice(margin, n - margin) for n in target.shape[2:]])
    present = torch.as_tensor(mask) > 0 if mask is not None else torch.ones((), dtype=torch.bool)
    keep = torch.broadcast_to(present, target.shape)
    values = []
    for p, t, k in zip(prediction.float().split(1), target.float().split(1), keep.split(1), strict=True):
        inside = t[k]
        if inside.numel() == 0:
            raise ValueError("the mask has no voxel: nothing to compare.")
        data_range = float((inside.max() - inside.min()).clamp_min(1e-12))
        ssim_map, _ = compute_ssim_and_cs(p, t, spatial_dims, kernel, sigma, data_range, "gaussian", k1=0.01, k2=0.03)
        selected = ssim_map if mask is None else ssim_map[torch.broadcast_to(k[inner], ssim_map.shape)]
        values.append(selected.mean() if selected.numel() else torch.tensor(float("nan")))
    return torch.stack(values)


def bone_dice(
    prediction: torch.Tensor,
    target: torch.Tensor,
    hu_window: Sequence[float] = (-1000.0, 2000.0),
    threshold_hu: float = BONE_THRESHOLD_HU,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dice overlap of bone (above ``threshold_hu``) in synthesized and true CT per item (N,); NaN without true bone.

    Args:
        prediction, target: synthesized and true CT (N, C, *spatial) on the network's scale (HU window -> [-1, 1]).
        hu_window: the HU window that [-1, 1] stands for.
        threshold_hu: bone threshold in HU.
        mask: optional mask; only voxels where it is non-zero count.
    """
    low, high = (float(v) for v in hu_window)
    threshold = (threshold_hu - (high + low) / 2.0) / ((high - low) / 2.0)  # on the [-1, 1] scale
    values = []
    for p, t in _pairs(prediction, target, mask):
        bone_p, bone_t = (p > threshold).float()[None, None], (t > threshold).float()[None, None]
        values.append(compute_dice(bone_p, bone_t, include_background=True)[0, 0])
    return torch.stack(values)


def voxel_size(volume: torch.Tensor) -> tuple[float, float, float]:
    """Voxel size (mm) of a channel-first volume: the lengths of its ``affine``'s columns, 1 mm without one."""
    affine = getattr(volume, "affine", None)
    if affine is None:
        return (1.0, 1.0, 1.0)
    matrix = np.asarray(torch.as_tensor(affine), dtype=np.float64)[:3, :3]
    return tuple(float(v) for v in np.sqrt((matrix**2).sum(axis=0)))


class _VolumeMetric(CumulativeIterationMetric):
    """Buffers one value (or row) per volume; ``aggregate`` reduces them (``reduction``: ``"mean"``, ``"sum"`` or
    ``"none"``) leaving NaN out. ``masked``: ``y``'s last channel is the mask."""

    def __init__(self, masked: bool = False, reduction: MetricReduction | str = MetricReduction.MEAN) -> None:
        super().__init__()
        self.masked, self.reduction = masked, reduction

    def _value(self, y_pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if y is None:
            raise ValueError(f"{type(self).__name__} needs the ground truth y.")
        mask = None
        if self.masked:
            y, mask = y[:, :-1], y[:, -1:] > 0
            if not mask.reshape(mask.shape[0], -1).any(dim=1).all():
                raise ValueError("the mask has no voxel: nothing to compare.")
        if y_pred.shape != y.shape:
            raise ValueError(f"prediction shape {tuple(y_pred.shape)} differs from ground truth {tuple(y.shape)}.")
        value = self._value(y_pred.float(), y.float(), mask)
        return value.reshape(value.shape[0], -1)

    def aggregate(self, reduction: MetricReduction | str | None = None) -> torch.Tensor:
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the metric has no values yet.")
        reduction = self.reduction if reduction is None else reduction
        if reduction in (MetricReduction.NONE, "none"):
            return data
        return data.nanmean() if reduction in (MetricReduction.MEAN, "mean") else data.nansum()


class VolumePSNRMetric(_VolumeMetric):
    """:func:`volume_psnr` for MONAI evaluators (``IgniteMetricHandler(metric_fn=VolumePSNRMetric())``)."""

    _value = staticmethod(volume_psnr)


class VolumeSSIMMetric(_VolumeMetric):
    """:func:`windowed_ssim` (window ``kernel_size``) for MONAI evaluators; NaN for a volume thinner than the window.
    ``kwargs``: ``masked``, ``reduction``."""

    def __init__(self, kernel_size: int = 7, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kernel_size = kernel_size

    def _value(self, y_pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if min(y.shape[2:]) < self.kernel_size:
            logger.warning(f"volume of shape {tuple(y.shape[2:])} is thinner than the SSIM window: no windowed SSIM.")
            return torch.full((y.shape[0],), float("nan"))
        return windowed_ssim(y_pred, y, mask, self.kernel_size)


class GlobalSSIMMetric(_VolumeMetric):
    """:func:`global_ssim` (the paper's formula) for MONAI evaluators."""

    _value = staticmethod(global_ssim)


class VolumeErrorMetric(_VolumeMetric):
    """Mean squared (``power=2``) or absolute (``power=1``) error per volume inside the mask, times ``scale**power``
    (``scale``: intensity per network unit; 1500: HU from [-1000, 2000]); ``kwargs``: ``masked``, ``reduction``."""

    def __init__(self, power: int = 2, scale: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.power, self.scale = power, scale

    def _value(self, y_pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        errors = [((p - t).abs() * self.scale).pow(self.power).mean() for p, t in _pairs(y_pred, y, mask)]
        return torch.stack(errors)


class VoxelCountMetric(_VolumeMetric):
    """The number of voxels each volume is compared on (inside the mask)."""

    def _value(self, y_pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return torch.tensor([float(row.numel()) for row in _masked(y, mask)])


class BoneDiceMetric(_VolumeMetric):
    """:func:`bone_dice` (same ``hu_window``, ``threshold_hu``) for MONAI evaluators; volumes without bone are left
    out of the mean. ``kwargs``: ``masked``, ``reduction``."""

    def __init__(
        self, hu_window: Sequence[float] = (-1000.0, 2000.0), threshold_hu: float = BONE_THRESHOLD_HU, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.hu_window, self.threshold_hu = tuple(hu_window), threshold_hu

    def _value(self, y_pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return bone_dice(y_pred, y, self.hu_window, self.threshold_hu, mask)


class ResidualDisplacementMetric(_VolumeMetric):
    """Mean and 95th percentile (mm) over the mask of the B-spline displacement registering each synthesis onto its
    ground truth (:func:`bundle.registration.residual_displacement`, voxel size from ``y``'s affine); NaN on failure.

    Args:
        masked, reduction: as for the other volume metrics.
        iterations: L-BFGS-B iterations per pyramid level of the registration (None: its default).
    """

    def __init__(
        self,
        masked: bool = False,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        iterations: int | None = None,
    ) -> None:
        super().__init__(masked, reduction)
        self.registration = {} if iterations is None else {"iterations": int(iterations)}

    def _value(self, y_pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        from bundle.registration import residual_displacement  # loads SimpleITK: not on every ``import bundle``

        rows = []
        for index in range(y.shape[0]):
            region = None if mask is None else mask[index, 0]
            try:
                result = residual_displacement(
                    y_pred[index, 0], y[index, 0], voxel_size(y), region, **self.registration
                )
                rows.append([result["mean_mm"], result["p95_mm"]])
            except (RuntimeError, ValueError) as error:
                logger.warning(f"no residual displacement: {error}")
                rows.append([float("nan")] * 2)
        return torch.tensor(rows, dtype=torch.float64)


def metric_functions(
    target_kind: str = "MR",
    hu_window: Sequence[float] = (-1000.0, 2000.0),
    residual_displacement: bool = False,
    registration_iterations: int | None = None,
) -> dict[str, CumulativeIterationMetric]:
    """The masked metrics of one direction, name (a CSV column; ``displacement``: two) -> metric, PSNR first.

    Args:
        target_kind: ``"MR"`` or ``"CT"``; CT adds ``MAE_HU`` and ``bone_dice``.
        hu_window: the HU window the CT intensities were scaled from (``[-1, 1]`` -> window).
        residual_displacement: add ``displacement`` (:class:`ResidualDisplacementMetric`).
        registration_iterations: its registration's iterations per pyramid level (None: the registration's default).
    """
    metrics = {"PSNR": VolumePSNRMetric(masked=True), "MSE": VolumeErrorMetric(power=2, masked=True)}
    metrics |= {"SSIM": GlobalSSIMMetric(masked=True), "SSIM_windowed": VolumeSSIMMetric(masked=True)}
    metrics["voxels"] = VoxelCountMetric(masked=True)
    if target_kind == "CT":
        low, high = (float(v) for v in hu_window)
        metrics["MAE_HU"] = VolumeErrorMetric(power=1, scale=(high - low) / 2.0, masked=True)
        metrics["bone_dice"] = BoneDiceMetric(hu_window, masked=True)
    if residual_displacement:
        metrics["displacement"] = ResidualDisplacementMetric(masked=True, iterations=registration_iterations)
    return metrics


def metric_handlers(
    target_kind: str = "MR",
    hu_window: Sequence[float] = (-1000.0, 2000.0),
    residual_displacement: bool = False,
    registration_iterations: int | None = None,
) -> dict[str, IgniteMetricHandler]:
    """:func:`metric_functions` (same arguments) as ``IgniteMetricHandler`` on the engine's ``pred`` and ``label``,
    keeping per-volume details for :class:`bundle.reports.VolumeMetricsSaver`: a direction's ``key_val_metric``."""
    return {
        name: IgniteMetricHandler(metric_fn=metric, output_transform=from_engine(["pred", "label"]), save_details=True)
        for name, metric in metric_functions(
            target_kind, hu_window, residual_displacement, registration_iterations
        ).items()
    }


def volume_metrics(
    prediction: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    target_kind: str = "MR",
    hu_window: Sequence[float] = (-1000.0, 2000.0),
) -> dict[str, float]:
    """The evaluator's metrics (:func:`metric_functions`) of one volume against its ground truth:
    ``{"MSE", "PSNR", "SSIM", "SSIM_windowed", "MAE_HU", "bone_dice", "voxels"}``, ``MAE_HU`` and ``bone_dice`` NaN
    for MR targets (``bone_dice`` also without bone in the mask), ``SSIM_windowed`` for a volume thinner than 7 voxels.

    Args:
        prediction, target: synthesized volume (C, X, Y, Z) on the network's scale and ground truth of that shape.
        mask: optional mask of the same spatial shape; only its non-zero voxels count.
        target_kind, hu_window: as for :func:`metric_functions`.

    Raises:
        ValueError: if the shapes differ or the mask is empty.
    """
    target = torch.as_tensor(target).float()
    keep = torch.ones_like(target[:1]) if mask is None else (torch.as_tensor(mask)[:1] > 0).float()
    y = torch.cat([target, torch.broadcast_to(keep, (1, *target.shape[1:]))])[None]
    values = {"MAE_HU": float("nan"), "bone_dice": float("nan")}
    for name, metric in metric_functions(target_kind, hu_window).items():
        values[name] = float(metric(torch.as_tensor(prediction).float()[None], y).reshape(-1)[0])
    values["voxels"] = int(values["voxels"])
    return values
