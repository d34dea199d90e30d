"""Paired evaluation of synthesis: per-volume metrics, the paper's mean (sd) tables, and a figure per case.

For every paired entry of a datalist's ``test`` (or ``validation``) list and every requested direction, the source
is preprocessed like the training data (:func:`bundle.data.volume_preprocessing`: RAS, resampling, z-score over the
foreground for MR, the HU window scaled to [-1, 1] for CT), synthesized slice by slice with the undeformed pass of
the direction's generator, and compared with its ground truth preprocessed the same way for the target domain, so
MSE, PSNR and SSIM are on the intensity scale of the paper (Wang et al. 2018, Experiments):

- ``MSE``: MONAI's :class:`~monai.metrics.MSEMetric`;
- ``PSNR``: :class:`~bundle.metrics.VolumePSNRMetric`, ``10 log10(max_B^2 / MSE)`` with the ground truth's maximum;
- ``SSIM``: :class:`~bundle.metrics.GlobalSSIMMetric`, the paper's SSIM formula over the whole volume;
- ``SSIM_windowed``: :class:`~bundle.metrics.VolumeSSIMMetric`, MONAI's Gaussian-window (7 voxels, sigma 1.5) SSIM;
- ``MAE_HU`` (CT targets only): MONAI's :class:`~monai.metrics.MAEMetric` on the de-normalised volumes, in HU
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

Outputs (:func:`write_results`): ``metrics_<method>.csv`` (one row per volume and direction), ``summary.md`` (mean (sd)
per direction and method in the layout of the paper's tables, built from every ``metrics_*.csv`` of the folder, so
a CycleGAN run and a DicycleGAN run written to one folder give one table) and, per case, a PNG of the source, the
ground truth, the synthesis and the absolute error on one axial slice.

Example::

    python -m monai.bundle run --config_file configs/evaluate.json --dataset_dir demo_data --output_dir eval
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bundle import registration
from bundle.datalist import load_datalist, synthesis_pair
from bundle.metrics import (
    BONE_THRESHOLD_HU,
    GlobalSSIMMetric,
    VolumePSNRMetric,
    VolumeSSIMMetric,
    bone_dice,
    windowed_ssim,
)
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from monai.inferers import Inferer
from monai.metrics import MAEMetric, MSEMetric
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, Spacingd
from torch import nn

__all__ = [
    "BONE_THRESHOLD_HU",
    "CSV_COLUMNS",
    "DIRECTIONS",
    "METRICS",
    "OPTIONAL_METRICS",
    "PairedSynthesisEvaluator",
    "case_figure",
    "check_same_grid",
    "display_range",
    "load_generator",
    "mask_preprocessing",
    "mean_sd",
    "paired_cases",
    "parse_directions",
    "read_csv",
    "summary_markdown",
    "volume_metrics",
    "voxel_size",
    "write_csv",
    "write_results",
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
SSIM_KERNEL_SIZE = 7


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
    """The evaluation cases of a paired list: one per entry and direction, direction by direction.

    Args:
        dataset_dir: the dataset folder the datalist's paths are relative to.
        datalist: the datalist JSON, absolute or relative to ``dataset_dir``.
        key: the paired list (``"test"`` or ``"validation"``).
        directions: ``"A2B"`` and/or ``"B2A"``.

    Returns:
        ``{"subject", "direction", "source", "ground_truth", "mask"}`` per case (absolute paths; ``mask`` None when
        the entry has none). ``subject`` is the entry's ``subject``, else the name of its ``A`` file.

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
    cases = []
    for direction in directions:
        for subject, entry in zip(subjects, entries, strict=True):
            cases.append({"subject": subject, "direction": direction, **synthesis_pair(entry, direction)})
    return cases


def mask_preprocessing(keys: str | Sequence[str] = "image", pixdim: Sequence[float] = (1.8, 1.8, 1.8)) -> Compose:
    """Geometry of :func:`bundle.data.volume_preprocessing` for masks: load, channel first, RAS, nearest resampling.

    Args:
        keys: keys of the masks.
        pixdim: voxel size in mm, the same as the volumes'.

    Returns:
        The composed transform; the mask keeps its values (non-zero voxels are inside).
    """
    return Compose(
        [
            LoadImaged(keys, image_only=True),
            EnsureChannelFirstd(keys),
            Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacingd(keys, pixdim=pixdim, mode="nearest"),
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


# ----------------------------------------------------------------------------------------------------- metrics


def volume_metrics(
    prediction: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    target_kind: str = "MR",
    hu_window: Sequence[float] = (-1000.0, 2000.0),
) -> dict[str, float]:
    """The paper's metrics of one synthesized volume against its ground truth, optionally inside a mask.

    Both volumes are on the network's intensity scale (z-scored MR, CT window in [-1, 1]). The voxel-wise metrics
    (MSE, PSNR, global SSIM, MAE) are computed by the metric classes on the voxels inside the mask; the windowed
    SSIM over the whole volume, or averaged over the mask (:func:`bundle.metrics.windowed_ssim`).

    Args:
        prediction: synthesized volume, channel first (C, X, Y, Z).
        target: ground truth of the same shape.
        mask: optional mask of the same spatial shape; only its non-zero voxels count.
        target_kind: ``"MR"`` or ``"CT"``; CT adds ``MAE_HU`` and ``bone_dice``.
        hu_window: the HU window the CT intensities were scaled from (``[-1, 1]`` -> window).

    Returns:
        ``{"MSE", "PSNR", "SSIM", "SSIM_windowed", "MAE_HU", "bone_dice", "voxels"}``; ``MAE_HU`` and ``bone_dice``
        are NaN for MR targets (``bone_dice`` also where the ground truth has no bone inside the mask),
        ``SSIM_windowed`` NaN for a volume thinner than the 7-voxel window, and ``voxels`` is the number of voxels
        compared.

    Raises:
        ValueError: if the shapes differ or the mask is empty.
    """
    p, t = torch.as_tensor(prediction).float()[None], torch.as_tensor(target).float()[None]
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {tuple(p.shape[1:])} differs from ground truth {tuple(t.shape[1:])}.")
    if mask is None:
        keep = torch.ones_like(t, dtype=torch.bool)
    else:
        keep = torch.broadcast_to(torch.as_tensor(mask)[None] > 0, t.shape)
        if not keep.any():
            raise ValueError("the mask has no voxel: nothing to compare.")
    # the voxels compared, as one batch item of shape (1, 1, n): the paper's formulas are over these voxels
    p_in, t_in = p[keep].reshape(1, 1, -1), t[keep].reshape(1, 1, -1)
    if min(t.shape[2:]) < SSIM_KERNEL_SIZE:  # a volume thinner than the window has no windowed SSIM
        logger.warning(f"volume of shape {tuple(t.shape[2:])} is thinner than the SSIM window: no windowed SSIM.")
        windowed = torch.tensor(float("nan"))
    elif mask is None:
        windowed = VolumeSSIMMetric()(p, t)
    else:
        windowed = windowed_ssim(p, t, mask=keep)
    values = {
        "MSE": MSEMetric()(p_in, t_in),
        "PSNR": VolumePSNRMetric()(p_in, t_in),
        "SSIM": GlobalSSIMMetric()(p_in, t_in),
        "SSIM_windowed": windowed,
    }
    if target_kind == "CT":
        low, high = (float(v) for v in hu_window)
        scale, shift = (high - low) / 2.0, (high + low) / 2.0
        values["MAE_HU"] = MAEMetric()(p_in * scale + shift, t_in * scale + shift)
        values["bone_dice"] = bone_dice(p_in, t_in, hu_window)
    result = {name: float(torch.as_tensor(value).reshape(-1)[0]) for name, value in values.items()}
    result.setdefault("MAE_HU", float("nan"))
    result.setdefault("bone_dice", float("nan"))
    result["voxels"] = int(keep.sum())
    return result


# --------------------------------------------------------------------------------------------------- evaluator


def load_generator(
    network: nn.Module, path: str | os.PathLike, device: torch.device | str = "cpu", direction: str = "A2B"
) -> nn.Module:
    """Load a generator's weights (a bare ``state_dict`` as ``configs/train.json`` writes them) for evaluation.

    Args:
        network: the generator built from the config.
        path: the weights file (``models/model.pt`` for A -> B, ``models/model_g_ba.pt`` for B -> A).
        device: where the network runs.
        direction: the direction it synthesizes (for the messages).

    Returns:
        The network on ``device``, in eval mode.

    Raises:
        FileNotFoundError: if the file does not exist.
        RuntimeError: if the file is not a state_dict or does not fit the network (the config's architecture differs
            from training's), with the missing, unexpected and reshaped parameters.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no {direction} generator weights at {path}: configs/train.json writes model.pt (A->B) and "
            "model_g_ba.pt (B->A) into ckpt_dir; pass --ckpt_dir (or --model_file / --model_ba_file)."
        )
    state = torch.load(path, map_location=device, weights_only=True)
    expected = network.state_dict()
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RuntimeError(f"{path} is not a bare state_dict of a generator (like models/model.pt).")
    problems = {
        "missing": [k for k in expected if k not in state],
        "unexpected": [k for k in state if k not in expected],
        "of another shape": [k for k in expected if k in state and state[k].shape != expected[k].shape],
    }
    if any(problems.values()):
        summary = "; ".join(f"{len(v)} {kind} (e.g. {', '.join(v[:2])})" for kind, v in problems.items() if v)
        raise RuntimeError(
            f"the {direction} weights {path} do not fit the generator of this config: parameters {summary}. "
            "Evaluate with the training run's architecture (--ngf, --n_blocks, --deformable, or its preset file)."
        )
    network.load_state_dict(state)
    return network.to(device).eval()


class PairedSynthesisEvaluator:
    """Synthesizes every paired case with the undeformed pass and measures it against its ground truth.

    Generators are loaded only for the directions the cases need, all before the first case. Each case's source
    and ground truth are preprocessed with their domain's transform, checked to lie on one grid
    (:func:`check_same_grid`), the source is synthesized by ``inferer`` (axial slices) and the pair measured by
    :func:`volume_metrics`.

    Args:
        generators: ``{"A2B": G_AB, "B2A": G_BA}`` as built by the config (weights not loaded yet).
        checkpoints: ``{"A2B": path, "B2A": path}`` of their weights.
        preprocessing: ``{"A": transform, "B": transform}``: :func:`bundle.data.volume_preprocessing` of each domain
            with key ``"image"``.
        mask_preprocessing: :func:`mask_preprocessing` with key ``"image"``.
        inferer: :class:`bundle.inference.AxialSliceInferer`, the synthesis pass of every stage (its ``amp`` is the
            precision).
        kinds: ``{"A": "MR" | "CT", "B": ...}``.
        names: ``{"A": "PD", "B": "T2"}``: the experiment label is ``"PD to T2"``.
        method: the method label of the rows (``"Dicycle"``, ``"Cycle"``).
        hu_window: the CT window of the preprocessing.
        device: where the generators run.
        figure_dir: where the per-case PNGs go; None for none.
        progress: called with a line per case (e.g. ``print``).
        residual_displacement: also register each synthesis onto its ground truth
            (:func:`bundle.registration.residual_displacement`, about 5 s per 100^3 volume on 2 cores) and report the
            displacement in mm.

    Example::

        evaluator = PairedSynthesisEvaluator({"A2B": g_ab}, {"A2B": "models/model.pt"}, {"A": pre, "B": pre},
                                             mask_preprocessing(), SliceInferer((-1, -1), spatial_dim=2),
                                             {"A": "MR", "B": "MR"}, {"A": "PD", "B": "T2"})
        rows = evaluator.run(paired_cases("demo_data", "datalist.json", "test", ["A2B"]))
    """

    def __init__(
        self,
        generators: Mapping[str, nn.Module],
        checkpoints: Mapping[str, str | os.PathLike | None],
        preprocessing: Mapping[str, Callable[[dict], dict]],
        mask_preprocessing: Callable[[dict], dict],
        inferer: Inferer,
        kinds: Mapping[str, str],
        names: Mapping[str, str],
        method: str = "Dicycle",
        hu_window: Sequence[float] = (-1000.0, 2000.0),
        device: torch.device | str = "cpu",
        figure_dir: str | os.PathLike | None = None,
        progress: Callable[[str], None] | None = None,
        residual_displacement: bool = False,
    ) -> None:
        self.generators = dict(generators)
        self.checkpoints = dict(checkpoints)
        self.preprocessing = dict(preprocessing)
        self.mask_preprocessing = mask_preprocessing
        self.inferer = inferer
        self.kinds = dict(kinds)
        self.names = dict(names)
        self.method = str(method)
        self.hu_window = tuple(float(v) for v in hu_window)
        self.device = torch.device(device)
        self.figure_dir = None if figure_dir is None else Path(figure_dir)
        self.progress = progress or logger.info
        self.residual_displacement = residual_displacement
        self._loaded: dict[str, nn.Module] = {}

    def _network(self, direction: str) -> nn.Module:
        """The undeformed pass of the direction's generator, its weights loaded on first use."""
        if direction not in self._loaded:
            if direction not in self.generators:
                raise ValueError(f"no generator configured for direction {direction!r}.")
            checkpoint = self.checkpoints.get(direction)
            generator = self.generators[direction]
            if checkpoint is not None:
                generator = load_generator(generator, checkpoint, self.device, direction)
            self._loaded[direction] = generator.to(self.device).eval()  # its plain call is the undeformed pass
        return self._loaded[direction]

    @torch.no_grad()
    def synthesize(self, direction: str, source: torch.Tensor) -> torch.Tensor:
        """Synthesize one preprocessed source volume.

        Args:
            direction: ``"A2B"`` or ``"B2A"``.
            source: channel-first volume (C, X, Y, Z).

        Returns:
            The synthesized volume (C, X, Y, Z), float32 on the CPU.
        """
        x = torch.as_tensor(source).float()[None].to(self.device)
        return torch.as_tensor(self.inferer(x, self._network(direction))).float()[0].cpu()

    def evaluate(self, case: Mapping[str, Any]) -> dict[str, Any]:
        """Synthesize and measure one case of :func:`paired_cases`.

        Args:
            case: ``{"subject", "direction", "source", "ground_truth", "mask"}``.

        Returns:
            The CSV row (:data:`CSV_COLUMNS`).

        Raises:
            ValueError: if the ground truth or the mask is not on the source's grid.
        """
        direction = case["direction"]
        if direction not in DIRECTIONS:
            raise ValueError(f"the direction of a case must be A2B or B2A, got {direction!r}.")
        source_domain, target_domain = ("A", "B") if direction == "A2B" else ("B", "A")
        source = self.preprocessing[source_domain]({"image": case["source"]})["image"]
        target = self.preprocessing[target_domain]({"image": case["ground_truth"]})["image"]
        check_same_grid(source, target, case["source"], case["ground_truth"], "ground truth")
        mask = None
        if case.get("mask"):
            mask = self.mask_preprocessing({"image": case["mask"]})["image"]
            check_same_grid(source, mask, case["source"], case["mask"], "mask")
            mask = torch.as_tensor(mask)[:1] > 0
        prediction = self.synthesize(direction, source)
        target_kind = self.kinds[target_domain]
        metrics = volume_metrics(prediction, torch.as_tensor(target), mask, target_kind, self.hu_window)
        if self.residual_displacement:
            try:
                displacement = registration.residual_displacement(
                    prediction[0], torch.as_tensor(target)[0], voxel_size(source), None if mask is None else mask[0]
                )
            except (RuntimeError, ValueError) as error:  # one failed registration must not end the evaluation
                logger.warning(f"{case['subject']} {direction}: no residual displacement: {error}")
                displacement = {"mean_mm": float("nan"), "p95_mm": float("nan")}
            metrics["displacement_mm"], metrics["displacement_p95_mm"] = displacement["mean_mm"], displacement["p95_mm"]
        experiment = f"{self.names[source_domain]} to {self.names[target_domain]}"
        row = {
            "subject": case["subject"],
            "direction": direction,
            "experiment": experiment,
            "method": self.method,
            **metrics,
            "masked": mask is not None,
            "source": str(case["source"]),
            "ground_truth": str(case["ground_truth"]),
            "mask": str(case["mask"]) if case.get("mask") else "",
        }
        self.progress(
            f"{case['subject']} {experiment} ({self.method}): MSE {metrics['MSE']:.4f}, PSNR {metrics['PSNR']:.2f}, "
            f"SSIM {metrics['SSIM']:.4f}"
            + (f", MAE {metrics['MAE_HU']:.1f} HU, bone Dice {metrics['bone_dice']:.3f}" if target_kind == "CT" else "")
            + (f", residual displacement {metrics['displacement_mm']:.2f} mm" if self.residual_displacement else "")
        )
        if self.figure_dir is not None:
            case_figure(
                self.figure_dir / f"{_safe(case['subject'])}_{direction}_{_safe(self.method)}.png",
                torch.as_tensor(source)[0].numpy(),
                torch.as_tensor(target)[0].numpy(),
                prediction[0].numpy(),
                None if mask is None else mask[0].numpy(),
                title=f"{case['subject']}: {experiment}, {self.method} (PSNR {metrics['PSNR']:.2f} dB, "
                f"SSIM {metrics['SSIM']:.3f})",
                names=(self.names[source_domain], self.names[target_domain]),
            )
        return row

    def run(self, cases: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Evaluate every case; the generators of all the cases' directions are loaded first (a missing or
        mismatched checkpoint fails before any work).

        Args:
            cases: what :func:`paired_cases` returns.

        Returns:
            One row per case, in order.
        """
        cases = list(cases)
        for direction in dict.fromkeys(case["direction"] for case in cases):
            self._network(direction)
        return [self.evaluate(case) for case in cases]


# ------------------------------------------------------------------------------------------------------ figures


def voxel_size(volume: torch.Tensor) -> tuple[float, float, float]:
    """Voxel size (mm) of a preprocessed channel-first volume, from its affine (1 mm when it has none).

    Args:
        volume: a MetaTensor (or any tensor with an ``affine``).

    Returns:
        The lengths of the affine's three columns.
    """
    affine = getattr(volume, "affine", None)
    if affine is None:
        return (1.0, 1.0, 1.0)
    matrix = np.asarray(torch.as_tensor(affine), dtype=np.float64)[:3, :3]
    return tuple(float(v) for v in np.sqrt((matrix**2).sum(axis=0)))


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
        rows: rows of :meth:`PairedSynthesisEvaluator.run`.
        path: the CSV file.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
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
        with Path(path).open(newline="") as file:
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


def write_results(rows: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike, method: str) -> dict[str, Path]:
    """Write this run's CSV, then the summary of every run in ``output_dir``, and print the summary.

    Args:
        rows: rows of :meth:`PairedSynthesisEvaluator.run`.
        output_dir: the output folder.
        method: the method label of this run (names its CSV, ``metrics_<method>.csv``).

    Returns:
        ``{"csv": path, "summary": path}``.
    """
    output_dir = Path(output_dir)
    csv_path = write_csv(rows, output_dir / f"metrics_{_safe(method)}.csv")
    runs = sorted(output_dir.glob("metrics_*.csv"))
    summary = summary_markdown(read_csv(runs))
    summary_path = output_dir / "summary.md"
    summary_path.write_text(summary)
    print(summary)
    print(f"per-volume metrics: {csv_path}; summary of {', '.join(p.name for p in runs)}: {summary_path}")
    return {"csv": csv_path, "summary": summary_path}
