"""Does CycleGAN copy the distortion? A dose-response study of the paper's central claim.

Usage (from the repository root)::

    python -m scripts.dose_response instrument --output_dir study_dose   # the measuring instrument first
    python -m scripts.dose_response study --output_dir study_dose --budget 1 [--dry_run]

T2 is distorted by one fixed smooth field (:class:`bundle.transforms.DomainDistortion`, same seed and 80 mm
control-point spacing at every level) scaled to peaks of 0, 5, 10 and 20 mm.

``instrument``: registers each test subject's ground truth against its distorted copy as the evaluation does (both
directions) and compares the recovered mean displacement with the analytic one of the B-spline field on the mask.

``study``: trains CycleGAN and DicycleGAN at every level (more seeds at ``--replicate_levels_mm``) at a preset of
:mod:`scripts.tooling.study`, evaluates them on the held-out subjects and reports the copy fraction (OLS slope of
residual against applied mean displacement, 95 % CI) per method and direction, with PSNR/SSIM per level and figures.
Finished runs and measured metrics are reused, so the command can be repeated.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import platform
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import fire
import nibabel as nib
import numpy as np
import torch
from bundle.datalist import load_datalist, read_datalist
from bundle.pairing import mask_preprocessing
from bundle.reports import mean_sd
from bundle.transforms import BSplineField, DomainDistortion
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats
from scripts.tooling.datasets import make_distorted_datalist
from scripts.tooling.report import command_line, comparison_figure, publish
from scripts.tooling.study import (
    DIRECTIONS,
    METHOD_COLOURS,
    METHODS,
    PRESETS,
    Experiment,
    as_list,
    check_concurrent,
    distorted_copies,
    hardware,
    log,
    on_device,
    prepare_data,
    select_preset,
    train_and_evaluate,
)
from scripts.tooling.study import Run as StudyRun

__all__ = ["applied_displacement", "copy_fraction", "field_at_points", "instrument", "inverse_displacement", "study"]

LEVELS_MM = (0.0, 5.0, 10.0, 20.0)
REPLICATE_LEVELS_MM = (10.0,)
SEEDS = (0, 1, 2)
# one lattice for every level: 80 mm admits a 20 mm peak (40 mm stops near 11 mm, DomainDistortion's bound)
DISTORTION_SPACING_MM = 80.0
DISTORTION_SEED = 0
INSTRUMENT_TOLERANCE = 0.10
SECTION = "dose-response-study"  # the study's marked section of docs/results.md
# wall time (s) of one cpu-preset run on the 2-core reference machine, for the estimate before any run finished
DEFAULT_TRAIN_S = 445.0
DEFAULT_EVALUATE_S = 78.0


def field_at_points(field: BSplineField, points_mm: np.ndarray) -> np.ndarray:
    """``(N, components)`` float64 values of a B-spline field at ``(N, 3)`` points (mm) of its own frame."""
    points_mm = np.asarray(points_mm, dtype=np.float64)
    bases = [field.basis_matrix(points_mm[:, axis], axis) for axis in range(3)]
    # one axis at a time keeps the intermediate at (N, components, n, n), not (N, n, n, n)
    partial = np.einsum("nc,mabc->nmab", bases[2], field.coefficients)
    partial = np.einsum("nb,nmab->nma", bases[1], partial)
    return np.einsum("na,nma->nm", bases[0], partial)


def _grid_frame_points(
    distortion: DomainDistortion, source_shape: Sequence[int], source_affine: np.ndarray, grid: torch.Tensor
) -> np.ndarray:
    """Frame coordinates (mm) ``(X, Y, Z, 3)`` of every voxel of ``grid`` (MetaTensor ``(C, X, Y, Z)``), in the frame
    where ``distortion`` distorted a volume of ``source_shape`` and ``source_affine``."""
    axes_mm, frame_axis, _ = distortion._frame(source_shape, source_affine)
    shape = tuple(grid.shape[1:])
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    grid_affine = np.asarray(torch.as_tensor(grid.affine), dtype=np.float64)
    to_source = np.linalg.inv(np.asarray(source_affine, dtype=np.float64)) @ grid_affine
    source_index = index @ to_source[:3, :3].T + to_source[:3, 3]
    points = np.empty_like(source_index)
    for d in range(3):  # axes_mm[d] is linear in the source index
        step = axes_mm[d][1] - axes_mm[d][0] if len(axes_mm[d]) > 1 else 0.0
        points[..., frame_axis[d]] = axes_mm[d][0] + step * source_index[..., d]
    return points


def applied_displacement(
    distortion: DomainDistortion,
    source_shape: Sequence[int],
    source_affine: np.ndarray,
    grid: torch.Tensor,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Length (mm) of the distortion's displacement ``u`` at every voxel of a preprocessed grid, from its field.

    The distorted volume samples the original at ``x + u(x)``: registering the original (moving) onto the distorted
    copy (fixed) recovers ``u`` on the fixed grid.

    Args:
        distortion: the distortion that was applied.
        source_shape: spatial shape of the volume it was applied to (the file on disk).
        source_affine: that volume's voxel-to-world affine.
        grid: a volume preprocessed by the evaluation (MetaTensor ``(C, X, Y, Z)`` with its affine).
        mask: ``(X, Y, Z)`` voxels to evaluate (None: all).

    Returns:
        ``(X, Y, Z)`` float64 lengths in mm, NaN outside ``mask``.

    Raises:
        ValueError: if ``mask`` does not match the grid's shape.
    """
    points, where = _masked_points(distortion, source_shape, source_affine, grid, mask)
    lengths = np.full(where.shape, np.nan)
    lengths[where] = np.linalg.norm(field_at_points(distortion.field, points), axis=1)
    return lengths


def inverse_displacement(
    distortion: DomainDistortion,
    source_shape: Sequence[int],
    source_affine: np.ndarray,
    grid: torch.Tensor,
    mask: np.ndarray | None = None,
    iterations: int = 30,
) -> np.ndarray:
    """Length (mm) of the inverse displacement ``v(x) = -u(x + v(x))`` (distorted copy onto the original), solved by
    fixed-point iteration (a contraction: DomainDistortion's injectivity bound keeps the field's gradient below 1).

    Args and Returns as :func:`applied_displacement`; ``iterations``: fixed-point iterations.
    """
    points, where = _masked_points(distortion, source_shape, source_affine, grid, mask)
    v = np.zeros_like(points)
    for _ in range(iterations):
        v = -field_at_points(distortion.field, points + v)
    lengths = np.full(where.shape, np.nan)
    lengths[where] = np.linalg.norm(v, axis=1)
    return lengths


def _masked_points(
    distortion: DomainDistortion,
    source_shape: Sequence[int],
    source_affine: np.ndarray,
    grid: torch.Tensor,
    mask: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Frame coordinates ``(N, 3)`` of the voxels of ``mask`` (all voxels when None), and the boolean mask."""
    points = _grid_frame_points(distortion, source_shape, source_affine, grid)
    where = np.ones(points.shape[:3], dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if where.shape != points.shape[:3]:
        raise ValueError(f"mask of shape {where.shape} does not match the grid's {points.shape[:3]}.")
    return points[where], where


def level_datalist(data_dir: Path, level_mm: float, control_spacing_mm: float = DISTORTION_SPACING_MM) -> str:
    """The file name (inside ``data_dir``) of one level's datalist, derived once from the phantom's ``datalist.json``
    by :func:`scripts.tooling.datasets.make_distorted_datalist` (0 mm too, so every level is interpolated alike)."""
    name = f"datalist_dose_{level_mm:g}mm.json"
    if not (data_dir / name).is_file():
        log(f"distorting T2 by {level_mm:g} mm (peak) -> {name}")
        make_distorted_datalist(
            data_dir,
            "datalist.json",
            output=name,
            folder=f"dose_T2_{level_mm:g}mm",
            max_displacement_mm=level_mm,
            control_spacing_mm=control_spacing_mm,
            seed=DISTORTION_SEED,
            overwrite=True,
        )
    return name


def applied_means(data_dir: Path, datalist: str, pixdim: Sequence[float]) -> dict[tuple[str, str], float]:
    """Analytic mean displacement (mm) over the evaluation's mask, per (subject, direction) of the test pairs.

    A2B (synthesis against the real T2, undistorted mask): the inverse field; B2A (undistorted PD against the
    distorted PD, distorted mask): the field itself.
    """
    recipe = read_datalist(data_dir, datalist)["distortion"]
    distortion = DomainDistortion(recipe["max_displacement_mm"], recipe["control_spacing_mm"], seed=recipe["seed"])
    masks = mask_preprocessing("image", pixdim)
    means = {}
    for entry in load_datalist(data_dir, datalist, "test"):
        for direction, moved, _, mask_key in DIRECTIONS:
            region = masks({"image": entry[mask_key]})["image"]
            inside = region[0].numpy() > 0
            header = nib.load(entry[moved])
            lengths = (inverse_displacement if direction == "A2B" else applied_displacement)(
                distortion, header.shape[:3], header.affine, region, inside
            )
            means[entry["subject"], direction] = float(lengths[inside].mean())
    return means


def measure_instrument(
    data_dir: Path, datalist: str, pixdim: Sequence[float], registration: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Each test subject's ground truth registered against its distorted copy as the evaluation does
    (:func:`scripts.tooling.study.distorted_copies`), beside the analytic displacement: a row per subject and
    direction."""
    content = read_datalist(data_dir, datalist)
    names, level = content["domains"], float(content["distortion"]["max_displacement_mm"])
    applied = applied_means(data_dir, datalist, pixdim)
    rows = []
    for copy in distorted_copies(data_dir, datalist, pixdim, **(registration or {})):
        subject, direction, result = copy["entry"]["subject"], copy["direction"], copy["displacement"]
        source, target = ("A", "B") if direction == "A2B" else ("B", "A")
        row = {
            "level_mm": level,
            "subject": subject,
            "direction": direction,
            "experiment": f"{names[source]} to {names[target]}",
            "applied_mm": applied[subject, direction],
            "recovered_mm": result["mean_mm"],
            "recovered_p95_mm": result["p95_mm"],
            "seconds": copy["seconds"],
        }
        rows.append(row)
        log(
            f"{level:g} mm {subject} {row['experiment']}: applied {row['applied_mm']:.3f} mm, "
            f"recovered {result['mean_mm']:.3f} mm ({row['seconds']:.1f} s)"
        )
    return rows


def _group(rows: Sequence[Mapping[str, Any]], key: Any) -> dict[Any, list[Mapping[str, Any]]]:
    """``rows`` by ``key(row)``, in order of appearance."""
    groups: dict[Any, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return groups


def _mean(group: Sequence[Mapping[str, Any]], name: str) -> float:
    return statistics.fmean(float(r[name]) for r in group)


def instrument_table(rows: Sequence[Mapping[str, Any]], tolerance: float = INSTRUMENT_TOLERANCE) -> str:
    """Markdown: per level and direction, the analytic and the recovered mean displacement (mean over the test
    subjects) and their ratio, which passes within ``tolerance`` of 1 (at 0 mm: the instrument's floor, in mm)."""
    lines = [
        "| peak (mm) | direction | applied mean (mm) | recovered mean (mm) | recovered / applied | n | within "
        f"{tolerance:.0%} |",
        "| ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    groups = _group(rows, lambda r: (float(r["level_mm"]), str(r["experiment"])))
    for (level, experiment), group in sorted(groups.items()):
        applied, recovered = _mean(group, "applied_mm"), _mean(group, "recovered_mm")
        if applied > 0:
            ratio = f"{recovered / applied:.3f}"
            verdict = "yes" if abs(recovered / applied - 1.0) <= tolerance else "**no**"
        else:
            ratio, verdict = "-", f"floor {recovered:.3f} mm"
        lines.append(
            f"| {level:g} | {experiment} | {applied:.3f} | {recovered:.3f} | {ratio} | {len(group)} | {verdict} |"
        )
    return "\n".join(lines)


def _mm_list(levels: Sequence[float], separator: str = ",") -> str:
    return separator.join(f"{v:g}" for v in levels)


def instrument(
    output_dir: str = "study_dose",
    preset: str = "cpu",
    levels: str | Sequence[float] = LEVELS_MM,
    dataset_dir: str | None = None,
    control_spacing_mm: float = DISTORTION_SPACING_MM,
    tolerance: float = INSTRUMENT_TOLERANCE,
) -> dict[str, Any]:
    """Check the measuring instrument: does the registration recover the applied distortion at each level? Writes
    ``OUTPUT_DIR/instrument.md``, ``instrument.json`` and ``metrics/instrument.csv``.

    Args:
        output_dir: the study folder (its ``data/`` is shared with ``study``).
        preset: a preset of :data:`scripts.tooling.study.PRESETS`: the phantom and the evaluation's voxel size.
        levels: peak distortions in mm (comma-separated or a list).
        dataset_dir: an existing phantom folder to use instead of ``OUTPUT_DIR/data``.
        control_spacing_mm: control-point spacing of the distortion.
        tolerance: largest relative error of a level's recovered mean displacement.

    Returns:
        ``{"rows", "table", "passed", "seconds"}``; ``passed``: every non-zero level is within ``tolerance``.
    """
    start = time.perf_counter()
    output = Path(output_dir).resolve()
    settings = select_preset(preset)
    data_dir, _ = prepare_data(output, settings, dataset_dir, seed=0)
    pixdim = settings.pixdim()
    levels = as_list(levels, float)
    rows = []
    for level in levels:
        rows += measure_instrument(data_dir, level_datalist(data_dir, level, control_spacing_mm), pixdim)
    table = instrument_table(rows, tolerance)
    (output / "metrics").mkdir(parents=True, exist_ok=True)
    with (output / "metrics" / "instrument.csv").open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    seconds = time.perf_counter() - start
    passed = all(
        abs(_mean(group, "recovered_mm") / _mean(group, "applied_mm") - 1.0) <= tolerance
        for group in _group(rows, lambda r: (float(r["level_mm"]), str(r["direction"]))).values()
        if _mean(group, "applied_mm") > 0
    )
    text = (
        f"Instrument check at pixdim {pixdim} mm, preset {preset}, distortion lattice {control_spacing_mm:g} mm, "
        f"{len(rows)} registrations in {seconds:.0f} s (whole command, data included).\n\n{table}\n"
    )
    (output / "instrument.md").write_text(text, encoding="utf-8")
    (output / "instrument.json").write_text(
        json.dumps({"passed": passed, "tolerance": tolerance, "levels": levels}), encoding="utf-8"
    )
    print(text)
    print("instrument check " + ("PASSED" if passed else "FAILED") + f" (tolerance {tolerance:.0%})")
    return {"rows": rows, "table": table, "passed": passed, "seconds": seconds}


def copy_fraction(
    applied_mm: Sequence[float],
    residual_mm: Sequence[float],
    confidence: float = 0.95,
    groups: Sequence[Any] | None = None,
) -> dict:
    """Least-squares line of residual against applied displacement; its slope is the copy fraction.

    Args:
        applied_mm: applied mean displacement of each run (x).
        residual_mm: residual displacement of each run's syntheses (y); runs at one x are replicates.
        confidence: level of the two-sided Student t confidence interval of the slope.
        groups: each point's block (its training seed): one intercept per block, the slope fitted within blocks
            (analysis of covariance); None: one line through all points.

    Returns:
        ``{"slope", "intercept", "se", "ci_low", "ci_high", "n"}``; ``intercept`` is the mean point's; ``se`` and
        the interval (n - blocks - 1 degrees of freedom) are NaN where no degree of freedom is left.

    Raises:
        ValueError: if the lengths differ or the applied displacements do not vary (within a block).
    """
    x, y = np.asarray(applied_mm, dtype=np.float64), np.asarray(residual_mm, dtype=np.float64)
    block = np.zeros(len(x), dtype=int) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    if x.shape != y.shape or x.ndim != 1 or block.shape != x.shape:
        raise ValueError(
            f"applied and residual displacements (and groups) must be lists of one length, got {x.shape}, "
            f"{y.shape}" + ("" if groups is None else f", {block.shape}") + "."
        )
    counts = np.bincount(block)
    x_within = x - (np.bincount(block, weights=x) / counts)[block]
    y_within = y - (np.bincount(block, weights=y) / counts)[block]
    sxx = float((x_within**2).sum())
    if len(x) < 2 or sxx <= 1e-12 * max(1.0, float((x**2).sum())):
        raise ValueError(
            "the applied displacements must take at least two different values"
            + ("." if groups is None else " within a group.")
        )
    slope = float((x_within * y_within).sum() / sxx)
    intercept = float(y.mean() - slope * x.mean())
    n, dof = len(x), len(x) - len(counts) - 1
    se = half = float("nan")
    if dof > 0:
        se = math.sqrt(float(((y_within - slope * x_within) ** 2).sum()) / dof / sxx)
        half = float(stats.t.ppf(0.5 + confidence / 2.0, dof)) * se
    return {"slope": slope, "intercept": intercept, "se": se, "ci_low": slope - half, "ci_high": slope + half, "n": n}


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the study: T2's peak distortion (mm), training seed, ``"Cycle"`` or ``"Dicycle"``."""

    level_mm: float
    seed: int
    method: str

    @property
    def name(self) -> str:
        return f"{self.level_mm:g}mm_seed{self.seed}_{self.method}"

    def experiment(self, datalist: str) -> Experiment:
        return Experiment(
            f"dose_{self.level_mm:g}mm", "Table 2", f"PD <-> T2, T2 distorted by {self.level_mm:g} mm (peak)", datalist
        )


def planned_runs(
    levels: Sequence[float],
    seeds: Sequence[int],
    replicate_levels_mm: Sequence[float],
    methods: Sequence[str] = METHODS,
) -> list[Run]:
    """Each method at every level with the first seed, and with every seed at the ``replicate_levels_mm``."""
    return [
        Run(level, seed, method)
        for level in levels
        for seed in (seeds if level in replicate_levels_mm else seeds[:1])
        for method in methods
    ]


def estimate_seconds(runs: Sequence[Run], runs_dir: Path, budget: int) -> tuple[float, int]:
    """Wall time left for the runs not yet trained (their mean recorded time, else the reference machine's), and
    how many are left."""
    done = [
        json.loads((runs_dir / run.name / "run.json").read_text(encoding="utf-8"))["seconds"]
        for run in runs
        if _trained(runs_dir, run)
    ]
    per_run = statistics.fmean(done) if done else DEFAULT_TRAIN_S * budget
    left = len(runs) - len(done)
    return left * per_run + len(runs) * DEFAULT_EVALUATE_S, left


def _trained(runs_dir: Path, run: Run) -> bool:
    return (runs_dir / run.name / "run.json").is_file()


def run_means(rows: Sequence[Mapping[str, Any]], metric: str = "displacement_mm") -> dict[tuple, float]:
    """Mean of ``metric`` over each run's test volumes: ``{(method, direction, level_mm, seed): mean}``; NaN values
    (a failed registration) are left out, and so is a run with none left."""
    groups = _group(rows, lambda r: (r["method"], r["direction"], float(r["level_mm"]), int(r["seed"])))
    values = {
        key: [v for v in (float(r.get(metric, "nan")) for r in group) if math.isfinite(v)]
        for key, group in groups.items()
    }
    return {key: statistics.fmean(v) for key, v in values.items() if v}


def copy_fractions(
    rows: Sequence[Mapping[str, Any]], applied: Mapping[tuple[float, str], float], within_seeds: bool = False
) -> dict[tuple[str, str], dict]:
    """The copy fraction (:func:`copy_fraction`) per (method, direction), one point per run: x the level's applied
    mean displacement, y the run's mean residual displacement; ``within_seeds``: one intercept per training seed.
    NaN where there is no slope to take (no variation, no measured volume)."""
    # every (method, direction) of the rows, also one whose registrations all failed
    points: dict[tuple[str, str], list[tuple[float, float, int]]] = {(r["method"], r["direction"]): [] for r in rows}
    for (method, direction, level, seed), residual in sorted(run_means(rows).items()):
        points[method, direction].append((applied[level, direction], residual, seed))
    fits = {}
    nan = float("nan")
    for key, values in points.items():
        try:
            x, y, seeds = zip(*values, strict=True) if values else ((), (), ())
            fits[key] = copy_fraction(x, y, groups=seeds if within_seeds else None)
        except ValueError:
            fits[key] = {"slope": nan, "intercept": nan, "se": nan, "ci_low": nan, "ci_high": nan, "n": len(values)}
    return fits


def _percent(fit: Mapping[str, float]) -> str:
    """``"X ± Y %"``: the slope in percent, ± the half-width of its 95 % confidence interval (when it has one)."""
    slope = round(100.0 * fit["slope"]) if math.isfinite(fit["slope"]) else fit["slope"]  # an int: no "-0"
    if math.isnan(fit["se"]):
        return f"{slope} %"
    return f"{slope} ± {round(100.0 * (fit['ci_high'] - fit['slope']))} %"


def _copies(fits: Mapping[tuple[str, str], Mapping[str, float]], within_seeds: Mapping | None, *key: str) -> str:
    """``"<method>GAN copies X ± Y %"``, and ``" (... within seeds)"`` where given."""
    within = f" ({_percent(within_seeds[key])} within seeds)" if within_seeds else ""
    return f"{key[0]}GAN copies {_percent(fits[key])}{within}"


def copy_fraction_table(
    fits: Mapping[tuple[str, str], Mapping[str, float]],
    labels: Mapping[str, str],
    within_seeds: Mapping[tuple[str, str], Mapping[str, float]] | None = None,
) -> str:
    """Markdown: each (direction, method)'s copy fraction with its 95 % CI, and within seeds where given."""

    def interval(fit: Mapping[str, float]) -> str:
        return "-" if math.isnan(fit["se"]) else f"{fit['ci_low']:.3f} to {fit['ci_high']:.3f}"

    extra = " slope within seeds | 95 % CI |" if within_seeds else ""
    lines = [
        f"| direction | method | copy fraction (slope) | 95 % CI | intercept (mm) | runs |{extra}",
        "| --- | --- | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if within_seeds else ""),
    ]
    for (method, direction), fit in sorted(fits.items(), key=lambda item: (item[0][1], item[0][0])):
        line = (
            f"| {labels[direction]} | {method} | {fit['slope']:.3f} | {interval(fit)} | {fit['intercept']:.2f} | "
            f"{fit['n']} |"
        )
        if within_seeds:
            within = within_seeds[method, direction]
            line += f" {within['slope']:.3f} | {interval(within)} |"
        lines.append(line)
    return "\n".join(lines)


def seed_spread(
    rows: Sequence[Mapping[str, Any]],
    applied: Mapping[tuple[float, str], float],
    replicate_levels_mm: Sequence[float],
    baseline: tuple[float, int],
) -> dict[tuple[str, str, float], dict[str, Any]]:
    """The spread between training seeds at each replicate level: ``{(method, direction, level_mm): {"residual":
    {seed: mm}, "copy": {seed: slope or None}}}``, for the (method, direction) pairs with a baseline run.

    Each seed's copy fraction is the two-point slope to its run from the same seed's run at the baseline level
    (``baseline = (level_mm, first_seed)``), or from the first seed's run there when that seed has none; at the
    baseline level itself it is ``None``.
    """
    baseline_mm = baseline[0]
    means = run_means(rows)
    spread: dict[tuple[str, str, float], dict[str, Any]] = {}
    for (method, direction, level, seed), residual in sorted(means.items()):
        start = means.get((method, direction, baseline_mm, seed), means.get((method, direction, *baseline)))
        if level not in replicate_levels_mm or start is None:
            continue
        entry = spread.setdefault((method, direction, level), {"residual": {}, "copy": {}})
        entry["residual"][seed] = residual
        rise = applied[level, direction] - applied[baseline_mm, direction]
        entry["copy"][seed] = None if level == baseline_mm else (residual - start) / rise
    return spread


def seed_table(spread: Mapping[tuple[str, str, float], Mapping[str, Any]], labels: Mapping[str, str]) -> str:
    """Markdown: each seed's residual displacement and copy fraction at each replicate level, mean (sd) over seeds
    ("-" where there is no slope: the baseline level)."""
    lines = [
        "| direction | peak (mm) | method | residual displacement per seed (mm) | mean (sd) | copy fraction per seed "
        "| mean (sd) |",
        "| --- | ---: | --- | --- | ---: | --- | ---: |",
    ]
    for (method, direction, level), entry in sorted(spread.items(), key=lambda item: (item[0][1], item[0][2])):
        residual, copy = list(entry["residual"].values()), [v for v in entry["copy"].values() if v is not None]
        copies = f"{', '.join(f'{v:.3f}' for v in copy)} | {mean_sd(copy, 3)}" if copy else "- | -"
        lines.append(
            f"| {labels[direction]} | {level:g} | {method} | {', '.join(f'{v:.2f}' for v in residual)} | "
            f"{mean_sd(residual, 2)} | {copies} |"
        )
    return "\n".join(lines)


def level_table(rows: Sequence[Mapping[str, Any]], applied: Mapping[tuple[float, str], float]) -> str:
    """Table 2 at every level: MSE, PSNR, SSIM (the paper's scale) and residual displacement, mean (sd) over the
    test volumes (at a replicate level, the volumes of every seed together)."""
    metrics = [("MSE", 3), ("PSNR", 2), ("SSIM", 3), ("displacement_mm", 2)]
    lines = [
        "| peak (mm) | applied mean (mm) | direction | method | MSE | PSNR (dB) | SSIM | residual displacement (mm) "
        "| n |",
        "| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    groups = _group(rows, lambda r: (float(r["level_mm"]), r["direction"], r["method"]))
    for (level, direction, method), group in sorted(groups.items()):
        cells = [mean_sd([float(r[name]) for r in group], decimals) for name, decimals in metrics]
        head = f"| {level:g} | {applied[level, direction]:.2f} | {group[0]['experiment']} | {method} | "
        lines.append(head + " | ".join(cells) + f" | {len(group)} |")
    return "\n".join(lines)


def dose_figure(
    path: Path,
    rows: Sequence[Mapping[str, Any]],
    applied: Mapping[tuple[float, str], float],
    fits: Mapping[tuple[str, str], Mapping[str, float]],
    labels: Mapping[str, str],
) -> Path:
    """Residual against applied displacement, a panel per direction, the OLS fit per method; points are the mean
    over the seeds of each level's run means, error bars their sample sd (where there are seeds)."""
    means = run_means(rows)
    directions = sorted({direction for _, direction, _, _ in means})
    figure = Figure(figsize=(6 * len(directions), 4.6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(directions), squeeze=False)[0]
    for ax, direction in zip(axes, directions, strict=True):
        top = max(applied[level, d] for level, d in applied if d == direction)
        ax.plot([0, top], [0, top], color="grey", linestyle=":", label="full copy (slope 1)")
        for method in METHODS:
            by_level: dict[float, list[float]] = {}
            for (m, d, level, _), value in means.items():
                if m == method and d == direction:
                    by_level.setdefault(level, []).append(value)
            if not by_level:
                continue
            levels = sorted(by_level)
            x = [applied[level, direction] for level in levels]
            y = [statistics.fmean(by_level[level]) for level in levels]
            sd = [statistics.stdev(by_level[level]) if len(by_level[level]) > 1 else 0.0 for level in levels]
            colour, fit = METHOD_COLOURS[method], fits[method, direction]
            ax.errorbar(x, y, yerr=sd, fmt="o", color=colour, capsize=4)
            ends = [fit["intercept"], fit["intercept"] + fit["slope"] * top]
            ax.plot([0, top], ends, color=colour, label=f"{method}GAN: copies {_percent(fit)}")
        ax.set_title(labels[direction])
        ax.set_xlabel("applied mean displacement on the mask (mm, analytic)")
        ax.set_ylabel("residual displacement of the synthesis (mm)")
        ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, bbox_inches="tight")
    return path


def study(
    output_dir: str = "study_dose",
    preset: str = "cpu",
    levels: str | Sequence[float] = LEVELS_MM,
    seeds: str | Sequence[int] = SEEDS,
    replicate_levels_mm: str | float | Sequence[float] = REPLICATE_LEVELS_MM,
    budget: int = 1,
    dataset_dir: str | None = None,
    dry_run: bool = False,
    skip_instrument_check: bool = False,
    publish_dir: str | None = None,
    methods: str | Sequence[str] = METHODS,
    device: str | None = None,
    concurrent: int = 1,
    time_limit_s: float | None = None,
    check_instrument: bool = False,
) -> dict[str, Any]:
    """Train CycleGAN and DicycleGAN at every distortion level, evaluate them and report the copy fractions.

    On one GPU, e.g. ``--preset gpu --device cuda --concurrent 8 --time_limit_s 240 --check_instrument``.

    Args:
        output_dir: where the data, runs, metrics, figures and ``results.md`` go.
        preset: a preset of :data:`scripts.tooling.study.PRESETS` (``smoke``: tests).
        levels: peak distortions of T2 in mm (comma-separated or a list).
        seeds: training seeds used at the ``replicate_levels_mm``; the other levels use the first.
        replicate_levels_mm: the levels trained with every seed (comma-separated or a list).
        budget: train ``budget`` times the preset's epochs, all runs alike.
        dataset_dir: an existing phantom folder to use instead of building ``OUTPUT_DIR/data``.
        dry_run: print the planned runs and the estimate, train nothing.
        skip_instrument_check: train even without a passed instrument check at every level in
            ``OUTPUT_DIR/instrument.json``.
        publish_dir: also put the text into its marked section of ``PUBLISH_DIR/results.md`` (another budget has
            one of its own) and copy the figures to ``PUBLISH_DIR/figures``.
        methods: the methods to train (``Cycle``, ``Dicycle``; comma-separated or a list).
        device: train and evaluate on this device (e.g. ``cuda``); None: the config's (CUDA when present).
        concurrent: runs trained side by side, each in its own process (its output in ``runs/<run>/train.log``).
        time_limit_s: stop each run's training after this many seconds (its epochs otherwise).
        check_instrument: run ``instrument`` at the study's levels first unless a passed check is recorded.

    Returns:
        ``{"results", "fits", "within_seeds", "rows", "runs"}``; a dry run: ``results`` None, no ``within_seeds``.

    Raises:
        ValueError: for a bad budget, fewer than two levels, a replicate level that is not one of the levels, or
            an unknown method.
        RuntimeError: if the instrument check has not passed at every level (unless ``skip_instrument_check``).
    """
    settings = on_device(select_preset(preset, budget), device, time_limit_s)
    levels, seeds = as_list(levels, float), as_list(seeds, int)
    if len(set(levels)) < 2:
        raise ValueError(f"a slope needs at least two distortion levels, got {levels}.")
    replicate_levels_mm = as_list(replicate_levels_mm, float)
    if not replicate_levels_mm or not set(replicate_levels_mm) <= set(levels):
        raise ValueError(f"replicate_levels_mm={replicate_levels_mm} must be some of the levels {levels}.")
    methods = as_list(methods)
    if not methods or not set(methods) <= set(METHODS):
        raise ValueError(f"methods must be some of {list(METHODS)}, got {methods}.")
    check_concurrent(concurrent)
    start = time.perf_counter()
    output = Path(output_dir).resolve()
    runs = planned_runs(levels, seeds, replicate_levels_mm, methods)
    runs_dir = output / "runs"
    seconds, left = estimate_seconds(runs, runs_dir, budget)
    log(f"{len(runs)} runs planned ({left} left to train), preset {preset}, budget {budget}:")
    for run in runs:
        log(f"  {run.name}{' (trained)' if _trained(runs_dir, run) else ''}")
    log(f"estimated wall time: {seconds / 60:.0f} min (training and evaluation; data build extra)")
    if dry_run:
        return {"results": None, "fits": {}, "rows": [], "runs": runs}
    record = output / "instrument.json"
    check = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {}
    if check_instrument and not (check.get("passed") and set(levels) <= set(check.get("levels", []))):
        instrument(output_dir, preset, levels, dataset_dir)
        check = json.loads(record.read_text(encoding="utf-8"))
    if not skip_instrument_check and not (check.get("passed") and set(levels) <= set(check.get("levels", []))):
        raise RuntimeError(
            f"the instrument check has not passed at levels {levels} ({record}): run `python -m scripts.dose_response "
            f"instrument --output_dir {output_dir}` first and fix the registration if it fails, or pass "
            "--skip_instrument_check to train anyway."
        )

    data_dir, _ = prepare_data(output, settings, dataset_dir, seed=0)
    datalists = {level: level_datalist(data_dir, level) for level in levels}
    study_runs = [StudyRun(run.name, run.experiment(datalists[run.level_mm]), run.method, run.seed) for run in runs]
    trained = train_and_evaluate(output, study_runs, settings, data_dir, concurrent)
    rows = [
        {**row, "method": run.method, "level_mm": run.level_mm, "seed": run.seed}
        for run in runs
        for row in trained.rows[run.name]
    ]
    applied: dict[tuple[float, str], float] = {}
    pixdim = settings.pixdim()
    for level in levels:
        by_subject = applied_means(data_dir, datalists[level], pixdim)
        for direction, *_ in DIRECTIONS:
            applied[level, direction] = statistics.fmean(v for (_, d), v in by_subject.items() if d == direction)
    labels = {row["direction"]: row["experiment"] for row in rows}
    fits = copy_fractions(rows, applied)
    within_seeds = copy_fractions(rows, applied, within_seeds=True) if len(seeds) > 1 else None
    suffix = "" if budget == 1 else f"_{budget}x"  # another budget: figures and published section of its own
    figures = {"dose": dose_figure(output / "figures" / f"dose_response{suffix}.png", rows, applied, fits, labels)}
    top = max(levels)
    panel = {run.method: trained.parsers[run.name] for run in runs if run.level_mm == top and run.seed == seeds[0]}
    if set(panel) == set(METHODS):
        path = output / "figures" / f"fig4_{top:g}mm{suffix}.png"
        figures["fig4"] = comparison_figure(path, Run(top, seeds[0], "Dicycle").experiment(datalists[top]), panel)
    spread = seed_spread(rows, applied, replicate_levels_mm, (min(levels), seeds[0]))
    records = [trained.records[run.name] for run in runs]
    flags = {  # the study's own flags, those left at their defaults omitted
        "output_dir": output_dir,
        "dataset_dir": dataset_dir,
        "methods": ",".join(methods) if methods != list(METHODS) else None,
        "levels": _mm_list(levels) if levels != list(LEVELS_MM) else None,
        "seeds": ",".join(map(str, seeds)) if seeds != list(SEEDS) else None,
        "replicate_levels_mm": _mm_list(replicate_levels_mm)
        if replicate_levels_mm != list(REPLICATE_LEVELS_MM)
        else None,
        "preset": preset,
        "budget": budget,
        "device": device,
        "concurrent": concurrent if concurrent != 1 else None,
        "time_limit_s": f"{time_limit_s:g}" if time_limit_s is not None else None,
        "check_instrument": True if check_instrument else None,
    }
    instrument_md = output / "instrument.md"
    instrument_text = instrument_md.read_text(encoding="utf-8") if instrument_md.is_file() else None
    text = results_markdown(
        command_line("scripts.dose_response study", flags),
        preset,
        budget,
        runs,
        rows,
        applied,
        fits,
        spread,
        labels,
        figures,
        records,
        replicate_levels_mm,
        instrument_text,
        within_seeds,
        hardware(settings.value("device"), concurrent),
    )
    minutes = (time.perf_counter() - start) / 60
    text += f"\nWall time of this call: {minutes:.1f} min (runs trained and measured by earlier calls are reused).\n"
    results = output / "results.md"
    results.write_text(text, encoding="utf-8")
    log(f"wrote {results}")
    if publish_dir:
        publish(publish_dir, text, figures.values(), section=SECTION + suffix.replace("_", "-"))
    for method, direction in sorted(fits):
        print(f"{labels[direction]}: {_copies(fits, within_seeds, method, direction)} of the distortion")
    return {"results": str(results), "fits": fits, "within_seeds": within_seeds, "rows": rows, "runs": runs}


def results_markdown(
    command: str,
    preset: str,
    budget: int,
    runs: Sequence[Run],
    rows: Sequence[Mapping[str, Any]],
    applied: Mapping[tuple[float, str], float],
    fits: Mapping[tuple[str, str], Mapping[str, float]],
    spread: Mapping[tuple[str, str, float], Mapping[str, Any]],
    labels: Mapping[str, str],
    figures: Mapping[str, Path],
    records: Sequence[Mapping[str, Any]],
    replicate_levels_mm: Sequence[float],
    instrument_text: str | None = None,
    within_seeds: Mapping[tuple[str, str], Mapping[str, float]] | None = None,
    machine: str = "",
) -> str:
    """The text of the study's ``results.md`` (every figure in it comes from ``rows``, ``applied``, ``fits``,
    ``within_seeds``, ``spread`` and the instrument check's own text)."""
    training_min = sum(record["seconds"] for record in records) / 60.0
    claim = "; ".join(
        f"{labels[direction]}: "
        + ", ".join(_copies(fits, within_seeds, method, direction) for method in METHODS if (method, direction) in fits)
        for direction in sorted(labels)
    )
    seeds = sorted({run.seed for run in runs})
    at_budget = "" if budget == 1 else f" at {budget}x the preset's budget"
    lines = [
        f"## Dose-response study{at_budget}: how much of a T2 distortion do the syntheses copy?\n",
        f"```bash\n{command}\n```\n",
        f"Preset `{preset}` ({PRESETS[preset].description}), budget {budget}; {len(runs)} runs "
        f"(seeds {', '.join(map(str, seeds))} at {_mm_list(replicate_levels_mm, ', ')} mm, the "
        f"first seed elsewhere), training {training_min:.1f} min in all on {machine or platform.machine()} "
        "(runs may share it: then each takes longer). T2 distorted by one "
        f"smooth field ({DISTORTION_SPACING_MM:g} mm lattice, seed {DISTORTION_SEED}) scaled to each peak; applied "
        "mean displacement evaluated analytically on the evaluation's mask. Every run is evaluated on the held-out "
        "subjects by `configs/evaluate.json`.\n",
        f"**Headline** (copy fraction ± the half-width of its 95 % CI): {claim}.\n",
        "### The measuring instrument\n",
        "Each test subject's undistorted ground truth registered against its distorted copy exactly as the "
        "evaluation registers a synthesis (`python -m scripts.dose_response instrument`, same output folder):\n",
        (instrument_text.strip() if instrument_text else "Not run in this output folder.") + "\n",
        "### Copy fraction\n",
        "OLS slope of each run's mean residual displacement against the level's applied mean displacement (one point "
        "per run, the seeds of a replicate level as replicates), 95 % CI from Student's t with n - 2 degrees of "
        "freedom. The intercept is the residual displacement without any distortion."
        + (
            " Within seeds: the same slope with one intercept per training seed (analysis of covariance, n - seeds "
            "- 1 degrees of freedom), so that the offset between seeds' generators does not enter it."
            if within_seeds
            else ""
        ),
        "",
        copy_fraction_table(fits, labels, within_seeds) + "\n",
        f"![dose response](figures/{figures['dose'].name})\n",
    ]
    if len(seeds) > 1:
        lines += [
            f"### Spread between seeds at {_mm_list(replicate_levels_mm, ', ')} mm\n",
            "Each seed's copy fraction is the two-point slope to that seed's run from the undistorted run of the same "
            "seed (of the first seed where that seed has no undistorted run).\n",
            seed_table(spread, labels) + "\n",
        ]
    lines += [
        "### Runs\n",
        "Training wall time and iterations (slice pairs) of each run, from its `run.json` and checkpoint.\n",
        "| run | training (s) | iterations |",
        "| --- | ---: | ---: |",
        *(
            f"| {run.name} | {record['seconds']:.0f} | {record.get('iterations') or 'n/a'} |"
            for run, record in zip(runs, records, strict=True)
        ),
        "",
        "### Table 2 at every level\n",
        "Mean (sd) over the test volumes (at a replicate level, the volumes of every seed together); MSE, PSNR and "
        "SSIM on the paper's scale.\n",
        level_table(rows, applied) + "\n",
    ]
    if "fig4" in figures:
        lines += [f"![Fig. 4 at the largest distortion](figures/{figures['fig4'].name})\n"]
    return "\n".join(lines)


if __name__ == "__main__":
    fire.Fire({"instrument": instrument, "study": study}, serialize=lambda result: None)
