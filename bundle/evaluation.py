"""Paired evaluation of synthesis: per-volume metrics, the paper's mean (sd) tables, and a figure per case.

``configs/evaluate.json`` runs one MONAI ``SupervisedEvaluator`` per direction over the paired entries of a
datalist's ``test`` (or ``validation``) list (:func:`paired_cases`, :func:`paired_loader`): the source is
preprocessed like the training data by the direction's :class:`bundle.inference.Synthesis` (RAS, resampling,
z-score over the foreground for MR, the HU window scaled to [-1, 1] for CT) and synthesized by its inferer (the
undeformed pass over the axial slices; weights by MONAI's ``CheckpointLoader``), the ground truth is preprocessed
the same way for the target domain, and the metric handlers (:func:`metric_handlers`) measure on the paper's
intensity scale (Wang et al. 2018, Experiments):

- ``MSE``: :class:`~bundle.metrics.VolumeErrorMetric`;
- ``PSNR``: :class:`~bundle.metrics.VolumePSNRMetric`, ``10 log10(max_B^2 / MSE)`` with the ground truth's maximum;
- ``SSIM``: :class:`~bundle.metrics.GlobalSSIMMetric`, the paper's SSIM formula over the whole volume;
- ``SSIM_windowed``: :class:`~bundle.metrics.VolumeSSIMMetric`, MONAI's Gaussian-window (7 voxels, sigma 1.5) SSIM;
- ``MAE_HU`` (CT targets only): :class:`~bundle.metrics.VolumeErrorMetric` on the de-normalised volumes, in HU
  (within the HU window of the preprocessing, which clips the ground truth);
- ``bone_dice`` (CT targets only): :func:`~bundle.metrics.bone_dice`, the Dice overlap of bone (above
  :data:`~bundle.metrics.BONE_THRESHOLD_HU`) in the synthesis and in the ground truth: whether the bone is drawn
  where it is, the hard part of MR -> CT (bone and air are both dark in MR); NaN without bone in the mask;
- ``displacement_mm`` / ``displacement_p95_mm`` (optional, ``residual_displacement=True``): mean and 95th percentile
  of the displacement a B-spline registration finds between the synthesis and its ground truth
  (:func:`bundle.registration.residual_displacement`), over the mask: the misalignment itself, in mm.

Where the entry has a mask (``mask`` for A -> B, ``mask_B`` for B -> A, see :func:`bundle.datalist.synthesis_pair`)
every metric is computed over its non-zero voxels only (the paper computes abdominal metrics inside the aorta);
the windowed SSIM averages its SSIM map over the mask, so its windows still see up to 3 voxels beyond it.

Outputs: ``metrics_<method>.csv`` (:class:`VolumeMetricsSaver`, one row per volume and direction), ``summary.md``
(:func:`write_summary`: mean (sd) per direction and method in the layout of the paper's tables, built from every
``metrics_*.csv`` of the folder, so a CycleGAN run and a DicycleGAN run written to one folder give one table) and,
per case, a PNG of the source, the ground truth, the synthesis and the absolute error on one axial slice
(:class:`CaseFigures`).

Example::

    python -m monai.bundle run --config_file "['configs/train.json','configs/evaluate.json']" \\
        --dataset_dir demo_data --output_dir eval
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
import statistics
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bundle import registration
from bundle.datalist import load_datalist, read_datalist, synthesis_pair
from bundle.metrics import (
    BONE_THRESHOLD_HU,
    BoneDiceMetric,
    GlobalSSIMMetric,
    VolumeErrorMetric,
    VolumePSNRMetric,
    VolumeSSIMMetric,
    VoxelCountMetric,
    _VolumeMetric,
    global_ssim,
    volume_psnr,
    voxel_size,
)
from ignite.engine import Engine, Events
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from monai.data import DataLoader, Dataset
from monai.handlers import IgniteMetricHandler, MetricsSaver, from_engine
from monai.metrics import CumulativeIterationMetric
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, MapTransform, Orientationd, Spacingd

__all__ = [
    "BONE_THRESHOLD_HU",
    "CSV_COLUMNS",
    "DIRECTIONS",
    "METRICS",
    "OPTIONAL_METRICS",
    "CaseFigures",
    "PairedVolumesd",
    "ResidualDisplacementMetric",
    "VolumeMetricsSaver",
    "case_figure",
    "check_same_grid",
    "display_range",
    "mask_preprocessing",
    "mean_sd",
    "metric_functions",
    "metric_handlers",
    "paired_cases",
    "paired_loader",
    "parse_directions",
    "read_csv",
    "summary_markdown",
    "volume_metrics",
    "voxel_size",
    "write_csv",
    "write_results",
    "write_summary",
]

logger = logging.getLogger(__name__)

DIRECTIONS = ("A2B", "B2A")
# metric columns: (CSV name, Markdown header, decimals in the summary)
METRICS: tuple[tuple[str, str, int], ...] = (
    ("MSE", "MSE", 3),
    ("PSNR", "PSNR", 2),
    ("SSIM", "SSIM", 3),
    ("SSIM_windowed", "SSIM (windowed)", 3),
    ("MAE_HU", "MAE (HU)", 1),
    ("bone_dice", "Bone Dice", 3),
    ("displacement_mm", "Residual displacement (mm)", 2),
    ("displacement_p95_mm", "Displacement p95 (mm)", 2),
)
# columns left out of the summary when no row has a value (MAE, bone Dice: MR targets; displacement: not measured)
OPTIONAL_METRICS = ("MAE_HU", "bone_dice", "displacement_mm", "displacement_p95_mm")
CSV_COLUMNS = (
    "subject",
    "direction",
    "experiment",
    "method",
    *(name for name, _, _ in METRICS),
    "voxels",
    "masked",
    "source",
    "ground_truth",
    "mask",
)


# ------------------------------------------------------------------------------------------------------- cases


def parse_directions(direction: str) -> list[str]:
    """The synthesis directions of a run.

    Args:
        direction: ``"A2B"``, ``"B2A"`` or ``"both"``.

    Returns:
        ``["A2B"]``, ``["B2A"]`` or ``["A2B", "B2A"]``.

    Raises:
        ValueError: for any other value.
    """
    if direction == "both":
        return list(DIRECTIONS)
    if direction in DIRECTIONS:
        return [direction]
    raise ValueError(f'direction must be "A2B", "B2A" or "both", got {direction!r}.')


def _stem(path: str | os.PathLike) -> str:
    """File name without its image extension (``sub01-PD.nii.gz`` -> ``sub01-PD``)."""
    name = Path(path).name
    return re.sub(r"(\.nii(\.gz)?|\.nrrd|\.nhdr|\.mha|\.mhd|\.hdr|\.img(\.gz)?)$", "", name, flags=re.IGNORECASE)


def paired_cases(
    dataset_dir: str | os.PathLike,
    datalist: str | os.PathLike = "datalist.json",
    key: str = "test",
    directions: Sequence[str] = DIRECTIONS,
) -> list[dict[str, Any]]:
    """The evaluation items of a paired list: one per entry and direction, direction by direction.

    Args:
        dataset_dir: the dataset folder the datalist's paths are relative to.
        datalist: the datalist JSON, absolute or relative to ``dataset_dir``.
        key: the paired list (``"test"`` or ``"validation"``).
        directions: ``"A2B"`` and/or ``"B2A"``.

    Returns:
        ``{"image": source, "label": ground truth, "mask", "subject", "direction", "experiment", "source_name",
        "target_name"}`` per item (absolute paths; no ``mask`` when the entry has none). ``subject`` is the entry's
        ``subject``, else the name of its ``A`` file; the names are the datalist's ``domains`` (e.g. ``"PD"``).

    Raises:
        KeyError: if the datalist has no such list.
        ValueError: if the list is empty or unpaired, a direction is unknown, or two entries have the same subject.
    """
    entries = load_datalist(dataset_dir, datalist, key)
    if not entries:
        raise ValueError(f"the {key!r} list of datalist {datalist} (in {dataset_dir}) is empty: nothing to evaluate.")
    unpaired = [index for index, entry in enumerate(entries) if not {"A", "B"} <= set(entry)]
    if unpaired:
        raise ValueError(
            f'the {key!r} list of datalist {datalist} is not paired: entries {unpaired[:5]} have no "A" and "B" '
            '(evaluate a paired list such as "test" or "validation"; training lists are unpaired).'
        )
    subjects = [str(entry.get("subject") or _stem(entry["A"])) for entry in entries]
    repeated = sorted({s for s in subjects if subjects.count(s) > 1})
    if repeated:
        raise ValueError(
            f"the {key!r} list of datalist {datalist} names subjects {repeated} more than once; give each entry a "
            'distinct "subject" (it keys the CSV rows and the figures).'
        )
    names = {"A": "A", "B": "B", **read_datalist(dataset_dir, datalist).get("domains", {})}
    cases = []
    for direction in directions:
        source, target = ("A", "B") if direction == "A2B" else ("B", "A")
        for subject, entry in zip(subjects, entries, strict=True):
            pair = synthesis_pair(entry, direction)
            case = {"image": pair["source"], "label": pair["ground_truth"], "subject": subject, "direction": direction}
            case |= {"experiment": f"{names[source]} to {names[target]}", "source_name": names[source]}
            case |= {"target_name": names[target], **({"mask": pair["mask"]} if pair["mask"] else {})}
            cases.append(case)
    return cases


def mask_preprocessing(
    keys: str | Sequence[str] = "image", pixdim: Sequence[float] = (1.8, 1.8, 1.8), allow_missing_keys: bool = False
) -> Compose:
    """Geometry of :func:`bundle.data.volume_preprocessing` for masks: load, channel first, RAS, nearest resampling.

    Args:
        keys: keys of the masks.
        pixdim: voxel size in mm, the same as the volumes'.
        allow_missing_keys: skip items without a mask.

    Returns:
        The composed transform; the mask keeps its values (non-zero voxels are inside).
    """
    return Compose(
        [
            LoadImaged(keys, image_only=True, allow_missing_keys=allow_missing_keys),
            EnsureChannelFirstd(keys, allow_missing_keys=allow_missing_keys),
            Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")), allow_missing_keys=True),
            Spacingd(keys, pixdim=pixdim, mode="nearest", allow_missing_keys=allow_missing_keys),
        ]
    )


def check_same_grid(
    reference: torch.Tensor,
    other: torch.Tensor,
    reference_file: str | os.PathLike,
    other_file: str | os.PathLike,
    what: str = "ground truth",
    atol_mm: float = 1e-3,
) -> None:
    """Raise unless two preprocessed volumes lie on the same voxel grid (shape and affine).

    Paired volumes share the source's geometry by construction (:mod:`bundle.datalist`), so after the same
    orientation and resampling they must have the same shape and affine; anything else is a datalist error.

    Args:
        reference: the preprocessed source, channel first (a MetaTensor carries its affine).
        other: the preprocessed ground truth or mask.
        reference_file: the source's file (for the message).
        other_file: the other volume's file (for the message).
        what: what ``other`` is (for the message).
        atol_mm: tolerance on the affines' entries.

    Raises:
        ValueError: naming both files, their grids and what to do.
    """
    shapes = tuple(reference.shape[1:]), tuple(other.shape[1:])
    affines = [torch.as_tensor(getattr(v, "affine", torch.eye(4)), dtype=torch.float64) for v in (reference, other)]
    if shapes[0] == shapes[1] and torch.allclose(affines[0], affines[1], atol=atol_mm):
        return

    def grid(volume: torch.Tensor, shape: tuple[int, ...], affine: torch.Tensor) -> str:
        original = getattr(volume, "meta", {}).get("spatial_shape")
        size = "x".join(str(int(n)) for n in shape)
        file_size = "" if original is None else f" (file: {'x'.join(str(int(n)) for n in original)})"
        origin = ", ".join(f"{float(v):.2f}" for v in affine[:3, 3])
        spacing = ", ".join(f"{float(v):.2f}" for v in affine[:3, :3].norm(dim=0))
        return f"{size} voxels{file_size}, spacing ({spacing}) mm, origin ({origin})"

    raise ValueError(
        f"{what} {other_file} is not on the grid of its source {reference_file}:\n"
        f"  source: {grid(reference, shapes[0], affines[0])}\n"
        f"  {what}: {grid(other, shapes[1], affines[1])}\n"
        f"paired volumes must share the source's geometry (bundle.datalist: ground truth and masks are in the "
        f"source's geometry); resample the {what} onto the source before evaluating."
    )


class PairedVolumesd(MapTransform):
    """Check that the preprocessed ground truth (``label``) and ``mask`` lie on the source's (``image``) grid, and
    append the mask (all voxels where the item has none) to ``label`` as its last channel, the channel the masked
    metrics (:mod:`bundle.metrics`, ``masked=True``) read.

    Raises:
        ValueError: naming both files (:func:`check_same_grid`).
    """

    def __init__(self) -> None:
        super().__init__(("label", "mask"), allow_missing_keys=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        source, target = d["image"], d["label"]
        files = {key: getattr(d[key], "meta", {}).get("filename_or_obj", key) for key in self.key_iterator(d)}
        source_file = source.meta.get("filename_or_obj", "image") if hasattr(source, "meta") else "image"
        check_same_grid(source, target, source_file, files["label"], "ground truth")
        if "mask" in d:
            check_same_grid(source, d["mask"], source_file, files["mask"], "mask")
        d["masked"] = "mask" in d
        mask = (d.pop("mask")[:1] > 0) if "mask" in d else torch.ones_like(torch.as_tensor(target)[:1], dtype=bool)
        d["label"] = torch.cat([target, mask.to(target.dtype)])  # a MetaTensor keeps the ground truth's affine
        return d


def paired_loader(
    cases: Sequence[Mapping[str, Any]],
    direction: str,
    source_preprocessing: Compose,
    target_preprocessing: Compose,
    pixdim: Sequence[float],
) -> DataLoader:
    """The data loader of one direction's evaluator: its items of :func:`paired_cases`, source (``image``), ground
    truth (``label``) and mask preprocessed, :class:`PairedVolumesd`, one volume per batch.

    Args:
        cases: what :func:`paired_cases` returns.
        direction: ``"A2B"`` or ``"B2A"``.
        source_preprocessing: the source domain's preprocessing with key ``"image"`` (``Synthesis.preprocessing``).
        target_preprocessing: the target domain's preprocessing with key ``"label"``.
        pixdim: voxel size in mm (for the masks).

    Returns:
        A MONAI ``DataLoader``.
    """
    transform = Compose(
        [
            source_preprocessing,
            target_preprocessing,
            mask_preprocessing("mask", pixdim, allow_missing_keys=True),
            PairedVolumesd(),
        ]
    )
    items = [dict(case) for case in cases if case["direction"] == direction]
    return DataLoader(Dataset(items, transform), batch_size=1, shuffle=False, num_workers=0)


# ----------------------------------------------------------------------------------------------------- metrics


class ResidualDisplacementMetric(_VolumeMetric):
    """Mean and 95th percentile (mm) of the B-spline displacement that registers each synthesis onto its ground
    truth (:func:`bundle.registration.residual_displacement`, about 5 s per 100^3 volume on 2 cores), over the mask;
    NaN where a registration fails (one failure must not end the evaluation). ``y``'s affine gives the voxel size.
    """

    def _value(self, y_pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        rows = []
        for index in range(y.shape[0]):
            region = None if mask is None else mask[index, 0]
            try:
                result = registration.residual_displacement(y_pred[index, 0], y[index, 0], voxel_size(y), region)
                rows.append([result["mean_mm"], result["p95_mm"]])
            except (RuntimeError, ValueError) as error:
                logger.warning(f"no residual displacement: {error}")
                rows.append([float("nan")] * 2)
        return torch.tensor(rows, dtype=torch.float64)


def metric_functions(
    target_kind: str = "MR", hu_window: Sequence[float] = (-1000.0, 2000.0), residual_displacement: bool = False
) -> dict[str, CumulativeIterationMetric]:
    """The metrics of one direction, masked (``y``'s last channel is the mask): PSNR first (the key metric).

    Args:
        target_kind: ``"MR"`` or ``"CT"``; CT adds ``MAE_HU`` and ``bone_dice``.
        hu_window: the HU window the CT intensities were scaled from (``[-1, 1]`` -> window).
        residual_displacement: add ``displacement`` (:class:`ResidualDisplacementMetric`).

    Returns:
        Metric name (a CSV column, ``displacement`` two) -> metric.
    """
    metrics = {
        "PSNR": VolumePSNRMetric(masked=True),
        "MSE": VolumeErrorMetric(power=2, masked=True),
        "SSIM": GlobalSSIMMetric(masked=True),
        "SSIM_windowed": VolumeSSIMMetric(masked=True),
        "voxels": VoxelCountMetric(masked=True),
    }
    if target_kind == "CT":
        low, high = (float(v) for v in hu_window)
        metrics["MAE_HU"] = VolumeErrorMetric(power=1, scale=(high - low) / 2.0, masked=True)
        metrics["bone_dice"] = BoneDiceMetric(hu_window, masked=True)
    if residual_displacement:
        metrics["displacement"] = ResidualDisplacementMetric(masked=True)
    return metrics


def metric_handlers(
    target_kind: str = "MR", hu_window: Sequence[float] = (-1000.0, 2000.0), residual_displacement: bool = False
) -> dict[str, IgniteMetricHandler]:
    """:func:`metric_functions` as MONAI metric handlers keeping per-volume details (for :class:`VolumeMetricsSaver`):
    the ``key_val_metric`` of a direction's ``SupervisedEvaluator``."""
    return {
        name: IgniteMetricHandler(metric_fn=metric, output_transform=from_engine(["pred", "label"]), save_details=True)
        for name, metric in metric_functions(target_kind, hu_window, residual_displacement).items()
    }


def volume_metrics(
    prediction: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    target_kind: str = "MR",
    hu_window: Sequence[float] = (-1000.0, 2000.0),
) -> dict[str, float]:
    """The evaluator's metrics (:func:`metric_functions`) of one volume against its ground truth.

    Args:
        prediction: synthesized volume, channel first (C, X, Y, Z), on the network's scale.
        target: ground truth of the same shape.
        mask: optional mask of the same spatial shape; only its non-zero voxels count.
        target_kind: ``"MR"`` or ``"CT"``; CT adds ``MAE_HU`` and ``bone_dice``.
        hu_window: the HU window the CT intensities were scaled from.

    Returns:
        ``{"MSE", "PSNR", "SSIM", "SSIM_windowed", "MAE_HU", "bone_dice", "voxels"}``; ``MAE_HU`` and ``bone_dice``
        are NaN for MR targets (``bone_dice`` also where the ground truth has no bone inside the mask),
        ``SSIM_windowed`` NaN for a volume thinner than the 7-voxel window.

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


# ------------------------------------------------------------------------------------------------ handlers


class VolumeMetricsSaver(MetricsSaver):
    """MONAI's ``MetricsSaver`` writing ``metrics_<method>.csv`` (:data:`CSV_COLUMNS`): one row per volume, from the
    per-volume details of the metric handlers and the item's labels, for every evaluator it is attached to (one per
    direction; the file is rewritten with all rows so far after each).

    MONAI's own report is a ``<metric>_raw.csv`` per metric keyed by file name; the paper's tables read one row per
    volume with every metric and the case's labels, so this writes that instead (single process).

    Args:
        save_dir: the output folder.
        method: the method label of the rows (``"Dicycle"``, ``"Cycle"``), also in the file name.
        cases: what :func:`paired_cases` returns (the labels of each source file).
    """

    def __init__(self, save_dir: str | os.PathLike, method: str, cases: Sequence[Mapping[str, Any]]) -> None:
        super().__init__(
            str(save_dir), metrics=None, metric_details="*", batch_transform=lambda b: [i["image"].meta for i in b]
        )
        self.method = str(method)
        self.path = Path(save_dir) / f"metrics_{_safe(method)}.csv"
        self.cases = {str(c["image"]): c for c in cases}  # a source file is A or B: one direction
        self.rows: list[dict[str, Any]] = []

    def __call__(self, engine: Engine) -> None:
        count = len(self._filenames)
        details = {k: torch.as_tensor(v).reshape(count, -1).tolist() for k, v in engine.state.metric_details.items()}
        for index, source in enumerate(self._filenames):
            case = self.cases[source]
            values = {name: value[index][0] for name, value in details.items() if name != "displacement"}
            if "displacement" in details:
                values["displacement_mm"], values["displacement_p95_mm"] = details["displacement"][index]
            row = {key: case[key] for key in ("subject", "direction", "experiment")} | {"method": self.method}
            row |= values | {"voxels": int(values["voxels"]), "masked": "mask" in case}
            row |= {"source": str(case["image"]), "ground_truth": str(case["label"]), "mask": case.get("mask", "")}
            self.rows.append(row)
        write_csv(self.rows, self.path)


class CaseFigures:
    """Writes, per evaluated volume, :func:`case_figure` (source, ground truth, synthesis, error) as
    ``<subject>_<direction>_<method>.png``.

    Args:
        figure_dir: the folder of the PNGs.
        method: the method label (file names and titles).
    """

    def __init__(self, figure_dir: str | os.PathLike, method: str) -> None:
        self.figure_dir, self.method = Path(figure_dir), str(method)

    def attach(self, engine: Engine) -> None:
        """Register with an evaluator."""
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        for item, output in zip(engine.state.batch, engine.state.output, strict=True):
            image, pred = output["image"].float().cpu(), output["pred"].float().cpu()
            label, mask = output["label"][:-1].float().cpu(), output["label"][-1:].cpu() > 0
            psnr, ssim = (float(f(pred[None], label[None], mask[None])) for f in (volume_psnr, global_ssim))
            case_figure(
                self.figure_dir / f"{_safe(item['subject'])}_{item['direction']}_{_safe(self.method)}.png",
                image[0].numpy(),
                label[0].numpy(),
                pred[0].numpy(),
                mask[0].numpy() if bool(item["masked"]) else None,
                title=f"{item['subject']}: {item['experiment']}, {self.method} (PSNR {psnr:.2f} dB, SSIM {ssim:.3f})",
                names=(item["source_name"], item["target_name"]),
            )


# ------------------------------------------------------------------------------------------------------ figures


def _safe(text: str) -> str:
    """A file-name-safe version of a label."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


def display_range(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> tuple[float, float]:
    """Grey-level window of an image for display: its ``low`` and ``high`` percentiles (never an empty window)."""
    lo, hi = np.percentile(image, [low, high])
    return float(lo), float(max(hi, lo + 1e-6))


def case_figure(
    path: str | os.PathLike,
    source: np.ndarray,
    ground_truth: np.ndarray,
    prediction: np.ndarray,
    mask: np.ndarray | None = None,
    title: str = "",
    names: tuple[str, str] = ("source", "target"),
) -> Path:
    """Save source, ground truth, synthesis and absolute error on one axial slice as a PNG (Agg, no pyplot state).

    The slice is the middle of the mask's axial extent when there is a mask, else the middle axial slice; images
    are shown with anterior up on the preprocessed (RAS) grid, ground truth and synthesis on one grey scale, the
    mask's outline in yellow.

    Args:
        path: the PNG to write (folders are created).
        source: preprocessed source (X, Y, Z).
        ground_truth: preprocessed ground truth (X, Y, Z).
        prediction: synthesized volume (X, Y, Z).
        mask: optional mask (X, Y, Z).
        title: the figure's title.
        names: names of the source and target domains.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mask is not None and mask.any():
        z_extent = np.nonzero(mask.any(axis=(0, 1)))[0]
        z = int((z_extent[0] + z_extent[-1]) // 2)
    else:
        z = source.shape[-1] // 2

    def axial(volume: np.ndarray) -> np.ndarray:
        return np.rot90(np.asarray(volume, dtype=np.float32)[..., z])  # rows: anterior at the top

    error = np.abs(prediction - ground_truth)
    target_range = display_range(ground_truth)
    panels = (
        (f"source ({names[0]})", axial(source), "gray", display_range(source)),
        (f"ground truth ({names[1]})", axial(ground_truth), "gray", target_range),
        ("synthesis", axial(prediction), "gray", target_range),
        ("|synthesis - ground truth|", axial(error), "magma", (0.0, display_range(error)[1])),
    )
    figure = Figure(figsize=(13, 3.8), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 4)
    for ax, (label, image, cmap, (vmin, vmax)) in zip(axes, panels, strict=True):
        shown = ax.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        if mask is not None and axial(mask).any():
            ax.contour(axial(mask) > 0, levels=[0.5], colors="yellow", linewidths=0.6)
        ax.set_title(label, fontsize=10)
        ax.axis("off")
    figure.colorbar(shown, ax=axes[-1], fraction=0.046, pad=0.04)
    figure.suptitle(f"{title}  (axial slice {z})".strip(), fontsize=11)
    figure.savefig(path, bbox_inches="tight")
    return path


# ------------------------------------------------------------------------------------------------ CSV and tables


def _format_cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.8g}"
    return str(value)


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write per-volume rows (:data:`CSV_COLUMNS`); NaN (no MAE for MR targets) is an empty cell.

    Args:
        rows: per-volume rows (:data:`CSV_COLUMNS`).
        path: the CSV file.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({column: _format_cell(row.get(column, "")) for column in CSV_COLUMNS})
    return path


def read_csv(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """Read per-volume CSVs (one or several runs) back into rows with numeric metrics (NaN for empty cells).

    Args:
        paths: one CSV or several.

    Returns:
        The rows of all files, in order.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    rows = []
    for path in paths:
        with Path(path).open(newline="", encoding="utf-8") as file:
            for row in csv.DictReader(file):
                for name, _, _ in METRICS:
                    row[name] = float(row[name]) if row.get(name) else float("nan")
                rows.append(row)
    return rows


def mean_sd(values: Sequence[float], decimals: int) -> str:
    """``mean (sd)`` with the sample standard deviation; ``mean (-)`` for a single value; ``-`` for none."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    sd = f"{statistics.stdev(values):.{decimals}f}" if len(values) > 1 else "-"
    return f"{mean:.{decimals}f} ({sd})"


def summary_markdown(rows: Sequence[Mapping[str, Any]], title: str = "Synthesis results") -> str:
    """The paper's table layout (Tables 1-3): a block of rows per experiment, one row per method, mean (sd).

    Experiments are ordered A -> B first, methods alphabetically (so ``Cycle`` precedes ``Dicycle``). The MAE
    column appears when some target is CT.

    Args:
        rows: per-volume rows of one or several runs (:func:`read_csv`).
        title: the heading.

    Returns:
        Markdown text.
    """
    present = {name for name in OPTIONAL_METRICS if any(not math.isnan(float(r.get(name, "nan"))) for r in rows)}
    has_mae, has_bone, has_displacement = ("MAE_HU" in present, "bone_dice" in present, "displacement_mm" in present)
    metrics = [m for m in METRICS if m[0] not in OPTIONAL_METRICS or m[0] in present]
    groups: dict[tuple[str, str], dict[str, list[Mapping[str, Any]]]] = {}
    for row in sorted(rows, key=lambda r: (DIRECTIONS.index(r["direction"]), r["experiment"], r["method"])):
        groups.setdefault((row["direction"], row["experiment"]), {}).setdefault(row["method"], []).append(row)
    header = "| Experiment | | " + " | ".join(label for _, label, _ in metrics) + " | n |"
    lines = [f"# {title}", "", header, "| --- | --- | " + " | ".join("---:" for _ in metrics) + " | ---: |"]
    for (_, experiment), methods in groups.items():
        for index, (method, group) in enumerate(methods.items()):
            cells = [mean_sd([float(r[name]) for r in group], decimals) for name, _, decimals in metrics]
            label = experiment if index == 0 else ""
            lines.append(f"| {label} | {method} | " + " | ".join(cells) + f" | {len(group)} |")
    masked = sum(str(r["masked"]) == "True" for r in rows)
    lines += [
        "",
        "mean (sample sd) over the volumes of each row; n: number of volumes. MSE, PSNR and SSIM on the paper's "
        "intensity scale (MR z-scored over the foreground, CT's HU window scaled to [-1, 1]); PSNR = "
        "10 log10(max_B^2 / MSE) with the ground truth's maximum; SSIM: the paper's formula over the volume; "
        "SSIM (windowed): Gaussian 7-voxel window"
        + ("; MAE (HU): on the de-normalised volumes, ground truth clipped to the HU window" if has_mae else "")
        + (f"; bone Dice: overlap of the voxels above {BONE_THRESHOLD_HU:g} HU" if has_bone else "")
        + (
            "; residual displacement: mean (and 95th percentile) length of the B-spline displacement that registers "
            "the synthesis onto its ground truth, over the mask"
            if has_displacement
            else ""
        )
        + f". {masked} of {len(rows)} volumes measured inside their mask, the others over the whole volume.",
        "",
    ]
    return "\n".join(lines)


def write_summary(output_dir: str | os.PathLike) -> Path:
    """Write and print ``summary.md``: the tables of every run's ``metrics_*.csv`` in ``output_dir``.

    Args:
        output_dir: the output folder.

    Returns:
        The path of ``summary.md``.
    """
    output_dir = Path(output_dir)
    runs = sorted(output_dir.glob("metrics_*.csv"))
    summary = summary_markdown(read_csv(runs))
    summary_path = output_dir / "summary.md"
    summary_path.write_text(summary, encoding="utf-8")
    print(summary)
    print(f"summary of {', '.join(p.name for p in runs)}: {summary_path}")
    return summary_path


def write_results(rows: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike, method: str) -> dict[str, Path]:
    """Write rows as the CSV of a run (``metrics_<method>.csv``), then :func:`write_summary`.

    Args:
        rows: per-volume rows (:data:`CSV_COLUMNS`).
        output_dir: the output folder.
        method: the method label of this run.

    Returns:
        ``{"csv": path, "summary": path}``.
    """
    csv_path = write_csv(rows, Path(output_dir) / f"metrics_{_safe(method)}.csv")
    return {"csv": csv_path, "summary": write_summary(output_dir)}
