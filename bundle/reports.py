"""What the paired evaluation (``configs/evaluate.json``) writes: ``metrics_<method>.csv`` (:class:`VolumeMetricsSaver`
per volume), ``summary.md`` (:func:`write_summary`) and ``figures/`` (:class:`CaseFigures`)."""

from __future__ import annotations

import csv
import math
import os
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bundle.metrics import BONE_THRESHOLD_HU, global_ssim, volume_psnr
from bundle.pairing import DIRECTIONS
from ignite.engine import Engine, Events
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from monai.handlers import MetricsSaver

__all__ = ["CSV_COLUMNS", "METRICS", "OPTIONAL_METRICS", "CaseFigures", "VolumeMetricsSaver", "case_figure"]
__all__ += ["display_range", "mean_sd", "read_csv", "summary_markdown", "write_csv", "write_results", "write_summary"]

# metric columns: (CSV name, Markdown header, decimals in the summary)
METRICS: tuple[tuple[str, str, int], ...] = (("MSE", "MSE", 3), ("PSNR", "PSNR", 2), ("SSIM", "SSIM", 3))
METRICS += (("SSIM_windowed", "SSIM (windowed)", 3), ("MAE_HU", "MAE (HU)", 1), ("bone_dice", "Bone Dice", 3))
METRICS += (("displacement_mm", "Residual displacement (mm)", 2), ("displacement_p95_mm", "Displacement p95 (mm)", 2))
# columns left out of the summary when no row has a value (MAE, bone Dice: MR targets; displacement: not measured)
OPTIONAL_METRICS = ("MAE_HU", "bone_dice", "displacement_mm", "displacement_p95_mm")
CSV_COLUMNS = ("subject", "direction", "experiment", "method", *(name for name, _, _ in METRICS), "voxels", "masked")
CSV_COLUMNS += ("source", "ground_truth", "mask")


class VolumeMetricsSaver(MetricsSaver):
    """MONAI's ``MetricsSaver`` writing ``metrics_<method>.csv`` (:data:`CSV_COLUMNS`, single process): one row per
    volume, rewritten with all rows so far after each evaluator it is attached to (one per direction).

    Args:
        save_dir: the output folder.
        method: the method label of the rows (``"Dicycle"``, ``"Cycle"``), also in the file name.
        cases: what :func:`bundle.pairing.paired_cases` returns (the labels of each source file).
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
    """Writes :func:`case_figure` of each evaluated volume as ``<subject>_<direction>_<method>.png``.

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
            name = f"{_safe(item['subject'])}_{item['direction']}_{_safe(self.method)}.png"
            title = f"{item['subject']}: {item['experiment']}, {self.method} (PSNR {psnr:.2f} dB, SSIM {ssim:.3f})"
            volumes = [v[0].numpy() for v in (image, label, pred)] + [mask[0].numpy() if bool(item["masked"]) else None]
            case_figure(self.figure_dir / name, *volumes, title=title, names=(item["source_name"], item["target_name"]))


def _safe(text: str) -> str:
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
    """Save source, ground truth, synthesis and absolute error on the middle axial slice of the mask (or volume) as
    the PNG ``path`` (returned): anterior up, ground truth and synthesis on one grey scale, the mask outlined yellow.

    Args:
        path: the PNG to write (folders are created).
        source, ground_truth, prediction: preprocessed source, ground truth and the synthesis (X, Y, Z).
        mask: optional mask (X, Y, Z).
        title: the figure's title.
        names: names of the source and target domains.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    z = source.shape[-1] // 2
    if mask is not None and mask.any():
        z_extent = np.nonzero(mask.any(axis=(0, 1)))[0]
        z = int((z_extent[0] + z_extent[-1]) // 2)

    def axial(volume: np.ndarray) -> np.ndarray:
        return np.rot90(np.asarray(volume, dtype=np.float32)[..., z])  # rows: anterior at the top

    error, target_range = np.abs(prediction - ground_truth), display_range(ground_truth)
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


def _format_cell(value: Any) -> str:
    return ("" if math.isnan(value) else f"{value:.8g}") if isinstance(value, float) else str(value)


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write per-volume rows (:data:`CSV_COLUMNS`) to the CSV file ``path`` and return it; NaN is an empty cell."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({column: _format_cell(row.get(column, "")) for column in CSV_COLUMNS})
    return path


def read_csv(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    """The rows of one or several per-volume CSVs, in order, with numeric metrics (NaN for empty cells)."""
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
    sd = f"{statistics.stdev(values):.{decimals}f}" if len(values) > 1 else "-"
    return f"{statistics.fmean(values):.{decimals}f} ({sd})"


def summary_markdown(rows: Sequence[Mapping[str, Any]], title: str = "Synthesis results") -> str:
    """Markdown in the paper's table layout (Tables 1-3): a block of rows per experiment, one per method, mean (sd);
    experiments A -> B first, methods alphabetically, :data:`OPTIONAL_METRICS` only where some row has a value.

    Args:
        rows: per-volume rows of one or several runs (:func:`read_csv`).
        title: the heading.
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
    displacement_note = (
        "; residual displacement: mean (and 95th percentile) length of the B-spline displacement that registers "
        "the synthesis onto its ground truth, over the mask"
    )
    lines += [
        "",
        "mean (sample sd) over the volumes of each row; n: number of volumes. MSE, PSNR and SSIM on the paper's "
        "intensity scale (MR z-scored over the foreground, CT's HU window scaled to [-1, 1]); PSNR = "
        "10 log10(max_B^2 / MSE) with the ground truth's maximum; SSIM: the paper's formula over the volume; "
        "SSIM (windowed): Gaussian 7-voxel window"
        + ("; MAE (HU): on the de-normalised volumes, ground truth clipped to the HU window" if has_mae else "")
        + (f"; bone Dice: overlap of the voxels above {BONE_THRESHOLD_HU:g} HU" if has_bone else "")
        + (displacement_note if has_displacement else "")
        + f". {masked} of {len(rows)} volumes measured inside their mask, the others over the whole volume.",
        "",
    ]
    return "\n".join(lines)


def write_summary(output_dir: str | os.PathLike) -> Path:
    """Write and print ``output_dir/summary.md`` (returned): the tables of every ``metrics_*.csv`` there."""
    runs = sorted(Path(output_dir).glob("metrics_*.csv"))
    summary, summary_path = summary_markdown(read_csv(runs)), Path(output_dir) / "summary.md"
    summary_path.write_text(summary, encoding="utf-8")
    print(summary)
    print(f"summary of {', '.join(p.name for p in runs)}: {summary_path}")
    return summary_path


def write_results(rows: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike, method: str) -> dict[str, Path]:
    """Write ``output_dir/metrics_<method>.csv`` and :func:`write_summary`; returns the paths ``{"csv", "summary"}``."""
    csv_path = write_csv(rows, Path(output_dir) / f"metrics_{_safe(method)}.csv")
    return {"csv": csv_path, "summary": write_summary(output_dir)}
