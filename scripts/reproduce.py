"""Reproduce the paper's experiments (Tables 1-3, Fig. 4) on the phantom, CycleGAN against DicycleGAN.

Usage (from the repository root)::

    python scripts/reproduce.py --output_dir study                    # CPU budget: about an hour on 2 cores
    python scripts/reproduce.py --output_dir study --preset paper     # the paper's settings (a GPU job)
    python scripts/reproduce.py --output_dir study --publish_dir docs # also copy results.md and figures to docs/

Three experiments, each trained twice by ``configs/train.json`` with the same seed, data and budget: once as
DicycleGAN and once as CycleGAN (``configs/cyclegan.json``: no offset convolutions, no alignment or deformed-cycle
loss):

- ``undeformed`` (Table 1): PD <-> T2 with undeformed T2;
- ``deformed`` (Table 2): PD <-> T2 with one fixed smooth distortion applied to every T2 volume; the ground truths
  are aligned with the source (the real T2 for PD -> T2, the distorted PD for T2 -> PD), as in the paper;
- ``mr_ct`` (Table 3): T1 -> CT and back, MR positioning pad against CT head holder, metrics inside the head mask.

Each run is evaluated on the held-out phantom subjects (``configs/evaluate.json``'s ``SupervisedEvaluator``: MSE,
PSNR, SSIM inside the brain/head mask) and, as a direct measure of alignment, the residual displacement between
each synthesis and its ground truth (:func:`bundle.registration.residual_displacement`). For the deformed experiment
the same measurements of "the ground truth moved by the distortion" give the reference a synthesis that copied the
distortion would score.

Writes ``OUTPUT_DIR/results.md`` (tables in the paper's layout beside the paper's own figures, the headline, the
command, budget and timings), ``OUTPUT_DIR/figures/`` (Fig. 4 analogue per experiment, training curves), and keeps
the data set (``data/``), each run's models and TensorBoard logs (``runs/<experiment>_<method>/``) and per-volume
CSVs (``metrics/``). Finished runs are not retrained and a run interrupted mid-way resumes from its checkpoint, so
the command can simply be repeated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import fire
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bundle.datalist import load_datalist, read_datalist  # noqa: E402
from bundle.metrics import volume_metrics, voxel_size  # noqa: E402
from bundle.pairing import mask_preprocessing  # noqa: E402
from bundle.registration import residual_displacement  # noqa: E402
from bundle.reports import METRICS, display_range, mean_sd, read_csv, write_csv  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One of the paper's experiments on the phantom.

    Args:
        key: short name (run folders, command line).
        table: the paper's table it reproduces.
        title: what it is.
        datalist: datalist file written by ``scripts/make_demo_data.py``.
        domain_a: ``"MR"`` or ``"CT"``.
        domain_b: ``"MR"`` or ``"CT"``.
        mask: what the metrics are computed inside.
    """

    key: str
    table: str
    title: str
    datalist: str
    domain_a: str = "MR"
    domain_b: str = "MR"
    mask: str = "brain mask"


EXPERIMENTS: dict[str, Experiment] = {
    experiment.key: experiment
    for experiment in (
        Experiment("undeformed", "Table 1", "PD <-> T2, undeformed T2", "datalist.json"),
        Experiment("deformed", "Table 2", "PD <-> T2, domain-specific distortion of T2", "datalist_deformed_t2.json"),
        Experiment(
            "mr_ct", "Table 3", "T1 <-> CT, differing scanner beds", "datalist_mr_ct.json", "MR", "CT", "head mask"
        ),
    )
}
METHODS = ("Cycle", "Dicycle")
METHOD_COLOURS = {"Cycle": "tab:blue", "Dicycle": "tab:orange"}
# TensorBoard tags of configs/train.json's logs plotted as training curves, with their titles
CURVE_PANELS = (
    ("total", "generator loss (eq. 4)"),
    ("align", "alignment loss (DicycleGAN)"),
    ("val_psnr", "validation PSNR, A to B (dB)"),
)
REFERENCE_METHOD = "Distortion only"

# data set and training overrides of each budget; training/evaluation defaults (configs/train.json) are the paper's
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "configs": ["configs/reproduce_cpu.json"],
        "data": {"subjects": 16, "n_validation": 1, "n_test": 4, "distortion_mm": 10.0},
        "description": "CPU budget: generators of width 16 with 4 residual blocks (paper: 64, 9), discriminators of "
        "width 16, 2.4 mm isotropic voxels and 96 x 96 training slices (paper: 1.8 mm, 128 x 128), 10 epochs of 200 "
        "slice pairs (5 constant, 5 decaying; paper: 100 + 100 epochs), no early stop",
    },
    "smoke": {
        "configs": ["configs/reproduce_cpu.json"],
        "overrides": {
            "ngf": 4,
            "n_blocks": 1,
            "d_channels": 4,
            "pixdim": [4.8, 4.8, 4.8],
            "spatial_size": [48, 48],
            "samples_per_epoch": 4,
            "n_epochs": 1,
            "n_epochs_decay": 1,
            "val_interval": 1,
            "log_interval": 2,
        },
        "data": {"subjects": 4, "n_validation": 1, "n_test": 1, "downsample": 4, "distortion_mm": 10.0},
        "description": "smoke test of the pipeline (tests use it; says nothing about the method): width 4, one "
        "residual block, 4.8 mm voxels, 2 epochs of 4 slice pairs",
    },
    "paper": {
        "configs": [],
        "data": {"subjects": 66, "n_validation": 0, "n_test": 28, "distortion_mm": 10.0},
        "description": "the paper's settings: generators of width 64 with 9 residual blocks, 70 x 70 PatchGAN, 1.8 mm "
        "voxels, 128 x 128 slices, 100 + 100 epochs of 1000 slice pairs with the early-stop rule, 38 training and "
        "28 test subjects",
    },
}

# the paper's Tables 1-3 (IXI and the private abdominal data), MSE / PSNR / SSIM as "mean (sd)"
PAPER_TABLES: dict[str, dict[tuple[str, str], tuple[str, str, str]]] = {
    "undeformed": {
        ("PD to T2", "Cycle"): ("0.186 (0.08)", "27.35 (1.69)", "0.854 (0.03)"),
        ("PD to T2", "Dicycle"): ("0.183 (0.09)", "26.49 (1.62)", "0.871 (0.03)"),
        ("T2 to PD", "Cycle"): ("0.134 (0.02)", "29.68 (1.61)", "0.892 (0.03)"),
        ("T2 to PD", "Dicycle"): ("0.146 (0.03)", "28.85 (1.59)", "0.883 (0.02)"),
    },
    "deformed": {
        ("PD to T2", "Cycle"): ("0.586 (0.25)", "19.52 (1.62)", "0.6081 (0.12)"),
        ("T2 to PD", "Cycle"): ("0.561 (0.22)", "19.42 (1.61)", "0.6001 (0.11)"),
        ("T2 to PD", "Dicycle"): ("0.141 (0.02)", "22.86 (1.31)", "0.7714 (0.02)"),
    },
    "mr_ct": {
        ("T1 to CT", "Cycle"): ("0.516 (0.19)", "18.32 (1.82)", "0.5716 (0.15)"),
        ("T1 to CT", "Dicycle"): ("0.287 (0.11)", "23.71 (1.17)", "0.7122 (0.03)"),
        ("CT to T1", "Cycle"): ("0.521 (0.22)", "19.12 (1.60)", "0.5818 (0.12)"),
        ("CT to T1", "Dicycle"): ("0.299 (0.08)", "22.66 (1.11)", "0.7556 (0.02)"),
    },
}
PAPER_NOTES = {
    "deformed": "The paper's Table 2 has no DicycleGAN PD -> T2 row in the text we have (shared/paper).",
    "mr_ct": "The paper's Table 3 is T2*-weighted MR <-> CT of 20 abdominal aortic aneurysm patients, metrics inside "
    "the aorta; ours is the phantom's T1 <-> CT, metrics inside the head.",
}
# the evaluation's (CSV column, header, decimals) in the paper's layout: no windowed SSIM, PSNR with its unit;
# the CT-only columns appear in tables with a CT target
TABLE_METRICS = tuple(
    (name, "PSNR (dB)" if name == "PSNR" else header, decimals)
    for name, header, decimals in METRICS
    if name != "SSIM_windowed"
)
CT_ONLY_METRICS = ("MAE_HU", "bone_dice")


def marked_sections(text: str) -> list[str]:
    """The ``<!-- name -->`` ... ``<!-- /name -->`` blocks of a results file: other studies' sections."""
    return [match.group(0) for match in re.finditer(r"<!-- ([\w-]+) -->\n.*?\n<!-- /\1 -->", text, flags=re.S)]


def publish_section(path: Path, section: str, text: str) -> None:
    """Replace the text between ``<!-- section -->`` and ``<!-- /section -->`` in ``path`` (appended when absent)."""
    begin, end = f"<!-- {section} -->", f"<!-- /{section} -->"
    block = f"{begin}\n{text.strip()}\n{end}"
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip() + ("\n\n" if old else "") + block + "\n"
    path.write_text(new, encoding="utf-8")


def publish(publish_dir: str | os.PathLike, section: str, text: str, figures: Iterable[Path]) -> Path:
    """Put a study's ``text`` into its ``section`` of ``PUBLISH_DIR/results.md`` (:func:`publish_section`) and copy
    its ``figures`` to ``PUBLISH_DIR/figures``.

    Returns:
        The published results file.
    """
    publish_dir = Path(publish_dir)
    (publish_dir / "figures").mkdir(parents=True, exist_ok=True)
    for figure in figures:
        shutil.copy2(figure, publish_dir / "figures" / Path(figure).name)
    publish_section(publish_dir / "results.md", section, text)
    return publish_dir / "results.md"


def command_line(script: str, flags: Mapping[str, Any]) -> str:
    """The published command: ``python <script>`` and ``--name value`` for every flag whose value is not None."""
    return " ".join([f"python {script}", *(f"--{name} {value}" for name, value in flags.items() if value is not None)])


def log(message: str) -> None:
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_command(command: Sequence[str]) -> float:
    """Run a command from the repository root, streaming its output; returns its wall time (s)."""
    print("$ " + " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(list(command), cwd=ROOT, check=True)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------- steps


def build_data(dataset_dir: Path, settings: Mapping[str, Any], seed: int) -> float:
    """The phantom data set (``scripts/make_demo_data.py``; it returns at once if the folder already holds it)."""
    command = [sys.executable, "scripts/make_demo_data.py", "--output_dir", str(dataset_dir), "--seed", str(seed)]
    for name, value in settings.items():
        command += [f"--{name}", str(value)]
    return run_command(command)


def _cli_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, tuple)) else str(value)


def train(
    run_dir: Path,
    experiment: Experiment,
    method: str,
    configs: Sequence[str],
    overrides: Mapping[str, Any],
    dataset_dir: Path,
    seed: int,
) -> dict[str, Any]:
    """Train one method on one experiment with ``configs/train.json``, unless it has finished before.

    A run interrupted after its first epoch resumes from ``models/checkpoint.pt``. ``run.json`` records the
    command and the wall time once training has finished.

    Returns:
        The run record: ``{"command", "seconds", "resumed"}``.
    """
    record_path = run_dir / "run.json"
    if record_path.is_file():
        log(f"{experiment.key} {method}: trained before ({record_path}), not retrained")
        return json.loads(record_path.read_text(encoding="utf-8"))
    cyclegan = ["configs/cyclegan.json"] if method == "Cycle" else []
    files = ["configs/train.json", *configs, *cyclegan]
    checkpoint = run_dir / "models" / "checkpoint.pt"
    resumed = checkpoint.is_file()
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "[" + ",".join(f"'{name}'" for name in files) + "]",
        "--dataset_dir",
        str(dataset_dir),
        "--datalist",
        experiment.datalist,
        "--domain_a",
        experiment.domain_a,
        "--domain_b",
        experiment.domain_b,
        "--ckpt_dir",
        str(run_dir / "models"),
        "--output_dir",
        str(run_dir / "logs"),
        "--seed",
        str(seed),
    ]
    for name, value in overrides.items():
        command += [f"--{name}", _cli_value(value)]
    if resumed:
        command += ["--resume", "True"]
        log(f"{experiment.key} {method}: resuming from {checkpoint}")
    log(f"{experiment.key} {method}: training")
    seconds = run_command(command)
    record = {"command": " ".join(command), "seconds": seconds, "resumed": resumed}
    record_path.write_text(json.dumps(record, indent=2), encoding="utf-8")
    return record


def budget_epochs(configs: Sequence[str], overrides: Mapping[str, Any], budget: int) -> dict[str, int]:
    """``n_epochs`` and ``n_epochs_decay`` of configs/train.json under the preset's files and overrides, times
    ``budget``; empty for a budget of 1, so the preset's own commands (and their finished runs) stay as they are."""
    if budget == 1:
        return {}
    parser = ConfigParser()
    parser.read_config([str(ROOT / name) for name in ["configs/train.json", *configs]])
    parser.update(dict(overrides))
    return {name: int(parser.get(name)) * budget for name in ("n_epochs", "n_epochs_decay")}


def evaluation_parser(
    experiment: Experiment,
    method: str,
    configs: Sequence[str],
    overrides: Mapping[str, Any],
    dataset_dir: Path,
    run_dir: Path,
) -> ConfigParser:
    """``configs/train.json`` + ``configs/evaluate.json`` set up for one run, residual displacement on, figures off."""
    files = [ROOT / "configs" / "train.json", ROOT / "configs" / "evaluate.json", *(ROOT / name for name in configs)]
    if method == "Cycle":
        files.append(ROOT / "configs" / "cyclegan.json")
    parser = ConfigParser()
    parser.read_config([str(path) for path in files])
    parser.update(
        {
            "bundle_root": str(ROOT),
            "dataset_dir": str(dataset_dir),
            "datalist": experiment.datalist,
            "domain_a": experiment.domain_a,
            "domain_b": experiment.domain_b,
            "ckpt_dir": str(run_dir / "models"),
            "output_dir": str(run_dir / "evaluation"),
            "save_figures": False,
            "residual_displacement": True,
            **{name: value for name, value in overrides.items() if name in parser.get("", {})},
        }
    )
    return parser


def evaluate(parser: ConfigParser, csv_path: Path, trained_at: float) -> list[dict[str, Any]]:
    """Per-volume metrics of one run (read back from ``csv_path`` when it is newer than the run's models); the
    measuring time is kept beside the CSV (:func:`measured_seconds`)."""
    if csv_path.is_file() and csv_path.stat().st_mtime > trained_at:
        log(f"metrics of {csv_path.stem} measured before: {csv_path}")
        return read_csv(csv_path)
    start = time.perf_counter()
    for direction in parser.get_parsed_content("directions"):
        parser.get_parsed_content(f"{direction}#evaluator").run()
    shutil.copyfile(parser.get_parsed_content("metrics_saver").path, csv_path)
    _record_seconds(csv_path, time.perf_counter() - start)
    return read_csv(csv_path)


def _record_seconds(csv_path: Path, seconds: float) -> None:
    csv_path.with_suffix(".json").write_text(json.dumps({"seconds": seconds}), encoding="utf-8")


def measured_seconds(metrics_dir: Path) -> float:
    """Total time spent measuring the CSVs of ``metrics_dir``, whichever call measured them."""
    return sum(json.loads(path.read_text(encoding="utf-8"))["seconds"] for path in metrics_dir.glob("*.json"))


def distortion_reference(
    experiment: Experiment, dataset_dir: Path, pixdim: Sequence[float], csv_path: Path
) -> list[dict[str, Any]]:
    """The scores of a synthesis that renders the target perfectly but copies the domain distortion.

    For every test subject of the deformed experiment: PD -> T2 compares the distorted T2 with the real T2 (the
    ground truth), T2 -> PD the undistorted PD with the distorted PD (the ground truth), on the evaluation's grid.
    """
    if csv_path.is_file():
        return read_csv(csv_path)
    from bundle.data import volume_preprocessing

    start = time.perf_counter()

    names = read_datalist(dataset_dir, experiment.datalist)["domains"]
    preprocess = volume_preprocessing("image", experiment.domain_a, pixdim)
    masks = mask_preprocessing("image", pixdim)
    rows = []
    for direction, moved, truth, mask, (source, target) in (
        ("A2B", "B", "gt_A2B", "mask", ("A", "B")),
        ("B2A", "A", "gt_B2A", "mask_B", ("B", "A")),
    ):
        for entry in load_datalist(dataset_dir, experiment.datalist, "test"):
            prediction = preprocess({"image": entry[moved]})["image"]
            target_volume = preprocess({"image": entry[truth]})["image"]
            region = masks({"image": entry[mask]})["image"][0] > 0
            metrics = volume_metrics(prediction, target_volume, region[None])
            displacement = residual_displacement(prediction[0], target_volume[0], voxel_size(prediction), region)
            metrics["displacement_mm"], metrics["displacement_p95_mm"] = displacement["mean_mm"], displacement["p95_mm"]
            rows.append(
                {
                    "subject": entry.get("subject", Path(entry["A"]).name),
                    "direction": direction,
                    "experiment": f"{names[source]} to {names[target]}",
                    "method": REFERENCE_METHOD,
                    **metrics,
                    "masked": True,
                    "source": entry[moved],
                    "ground_truth": entry[truth],
                    "mask": entry[mask],
                }
            )
            log(f"reference {rows[-1]['subject']} {rows[-1]['experiment']}: {displacement['mean_mm']:.2f} mm")
    write_csv(rows, csv_path)
    _record_seconds(csv_path, time.perf_counter() - start)
    return read_csv(csv_path)


# --------------------------------------------------------------------------------------------------- figures


def comparison_figure(
    path: Path,
    experiment: Experiment,
    parsers: Mapping[str, ConfigParser],
    labels: Mapping[str, str] | None = None,
    title: str | None = None,
) -> Path:
    """The paper's Fig. 4 for one experiment: per direction, the source, the ground truth and each method's
    synthesis in one row, their absolute errors below, on the middle axial slice of the mask of the first test
    subject; the ground truth's mask outline is drawn on every panel so a displacement shows against it.

    Args:
        path: the PNG to write.
        experiment: the experiment the runs belong to.
        parsers: evaluation parsers (:func:`evaluation_parser`) by method, in column order.
        labels: column titles by method (default: the method names, CycleGAN and DicycleGAN spelled out).
        title: the figure's title (default: the experiment's table and title).

    Returns:
        ``path``.
    """
    labels = {"Cycle": "CycleGAN", "Dicycle": "DicycleGAN", **(labels or {})}
    first = next(iter(parsers.values()))
    cases = first.get_parsed_content("cases")
    directions = list(dict.fromkeys(case["direction"] for case in cases))
    first_subject = cases[0]["subject"]
    columns = 2 + len(parsers)
    figure = Figure(figsize=(3.0 * columns, 6.0 * len(directions)), dpi=90)
    FigureCanvasAgg(figure)
    axes = figure.subplots(2 * len(directions), columns, squeeze=False)
    for index, direction in enumerate(directions):
        predictions = {}
        for method, parser in parsers.items():  # the evaluator's first item, synthesized by its Synthesis
            evaluator = parser.get_parsed_content(f"{direction}#evaluator")
            parser.get_parsed_content(f"{direction}#loader")(evaluator)
            item = evaluator.data_loader.dataset[0]
            predictions[method] = parser.get_parsed_content(f"{direction}#synthesis").synthesize(item["image"])
            predictions[method] = predictions[method][0].cpu().numpy()
        source, target = item["image"], item["label"][0].numpy()
        mask = item["label"][-1].numpy() > 0 if item["masked"] else None
        z_extent = np.nonzero(mask.any(axis=(0, 1)))[0] if mask is not None else [0, target.shape[-1] - 1]
        z = int((z_extent[0] + z_extent[-1]) // 2)

        def axial(volume: np.ndarray, z: int = z) -> np.ndarray:
            return np.rot90(np.asarray(volume, dtype=np.float32)[..., z])

        target_range = display_range(target)
        errors = {method: np.abs(prediction - target) for method, prediction in predictions.items()}
        error_max = max(display_range(error)[1] for error in errors.values())
        images = [
            (f"source ({item['source_name']})", axial(source[0].numpy()), "gray", display_range(source[0].numpy())),
            (f"ground truth ({item['target_name']})", axial(target), "gray", target_range),
            *((labels.get(m, m), axial(p), "gray", target_range) for m, p in predictions.items()),
        ]
        error_panels = [
            None,
            None,
            *((f"|{labels.get(m, m)} - truth|", axial(e), "magma", (0.0, error_max)) for m, e in errors.items()),
        ]
        for row, panels in zip(axes[2 * index : 2 * index + 2], (images, error_panels), strict=True):
            for ax, panel in zip(row, panels, strict=True):
                ax.axis("off")
                if panel is None:
                    continue
                label, image, cmap, (vmin, vmax) = panel
                ax.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
                if mask is not None:
                    ax.contour(axial(mask), levels=[0.5], colors="cyan", linewidths=0.7)
                ax.set_title(textwrap.fill(label, 28), fontsize=10)  # long variant names wrap
        axes[2 * index][0].text(
            -0.08,
            0.5,
            item["experiment"],
            transform=axes[2 * index][0].transAxes,
            rotation=90,
            va="center",
            ha="right",
            fontsize=11,
        )
    figure.suptitle(
        f"{title or f'{experiment.table} analogue, {experiment.title}'}: test subject {first_subject}, axial slice "
        f"{z}; cyan: the ground truth's {experiment.mask}",
        fontsize=11,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, bbox_inches="tight")
    return path


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run's TensorBoard logs: ``{tag: [(step, value), ...]}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(log_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return {tag: sorted(values) for tag, values in scalars.items()}


def training_curves(path: Path, runs: Mapping[tuple[str, str], Path]) -> Path:
    """Generator loss, its alignment term and validation PSNR against iterations, one panel row per experiment."""
    experiments = list(dict.fromkeys(key for key, _ in runs))
    panels = CURVE_PANELS
    figure = Figure(figsize=(15, 3.2 * len(experiments)), dpi=90)
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(experiments), len(panels), squeeze=False)
    for row, key in zip(axes, experiments, strict=True):
        for method in METHODS:
            if (key, method) not in runs:
                continue
            scalars = read_scalars(runs[key, method] / "logs")
            for ax, (tag, label) in zip(row, panels, strict=True):
                values = scalars.get(tag, [])
                if values and (tag != "align" or method == "Dicycle"):
                    steps, ys = zip(*values, strict=True)
                    style = {"marker": "o" if tag == "val_psnr" else None, "markersize": 3, "label": method}
                    ax.plot(steps, ys, color=METHOD_COLOURS[method], **style)
                ax.set_title(f"{EXPERIMENTS[key].title}: {label}", fontsize=9)
                ax.set_xlabel("epoch" if tag == "val_psnr" else "iteration", fontsize=8)
        for ax in row:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, bbox_inches="tight")
    return path


# --------------------------------------------------------------------------------------------------- tables


def group_rows(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[Mapping[str, Any]]]]:
    """``{experiment label: {method: rows}}``, A -> B first, methods in table order."""
    order = {method: index for index, method in enumerate((*METHODS, REFERENCE_METHOD))}
    groups: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for row in sorted(rows, key=lambda r: (r["direction"], order.get(r["method"], 99))):
        groups.setdefault(row["experiment"], {}).setdefault(row["method"], []).append(row)
    return groups


def mean_of(rows: Sequence[Mapping[str, Any]], metric: str) -> float:
    values = [float(r.get(metric, "nan")) for r in rows]
    values = [v for v in values if not math.isnan(v)]
    return statistics.fmean(values) if values else float("nan")


def experiment_table(experiment: Experiment, rows: Sequence[Mapping[str, Any]]) -> str:
    """Our results in the paper's layout, with the paper's figures in the last columns."""
    paper = PAPER_TABLES.get(experiment.key, {})
    has_ct = any(not math.isnan(float(r.get("MAE_HU", "nan"))) for r in rows)
    metrics = [m for m in TABLE_METRICS if has_ct or m[0] not in CT_ONLY_METRICS]
    lines = [
        "| Experiment | | "
        + " | ".join(header for _, header, _ in metrics)
        + " | n | Paper: MSE | Paper: PSNR | Paper: SSIM |",
        "| --- | --- | " + " | ".join("---:" for _ in metrics) + " | ---: | ---: | ---: | ---: |",
    ]
    for label, methods in group_rows(rows).items():
        for index, (method, group) in enumerate(methods.items()):
            cells = [mean_sd([float(r.get(name, "nan")) for r in group], decimals) for name, _, decimals in metrics]
            reference = paper.get((label, method), ("", "", "") if method == REFERENCE_METHOD else ("-", "-", "-"))
            name = f"*{method}*" if method == REFERENCE_METHOD else method
            lines.append(
                f"| {label if index == 0 else ''} | {name} | "
                + " | ".join(cells)
                + f" | {len(group)} | "
                + " | ".join(reference)
                + " |"
            )
    return "\n".join(lines)


def headline(rows_by_experiment: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    """One sentence per experiment, from the measured means (nothing here is written in advance)."""
    sentences = []
    for key, rows in rows_by_experiment.items():
        experiment = EXPERIMENTS[key]
        for label, methods in group_rows(rows).items():
            if not {"Cycle", "Dicycle"} <= set(methods):
                continue
            cycle, dicycle = methods["Cycle"], methods["Dicycle"]
            text = (
                f"{experiment.table} analogue, {label}: residual displacement CycleGAN "
                f"{mean_of(cycle, 'displacement_mm'):.2f} mm, DicycleGAN {mean_of(dicycle, 'displacement_mm'):.2f} mm"
            )
            if REFERENCE_METHOD in methods:
                text += f" (the distortion itself: {mean_of(methods[REFERENCE_METHOD], 'displacement_mm'):.2f} mm)"
            text += (
                f"; PSNR {mean_of(cycle, 'PSNR'):.2f} vs {mean_of(dicycle, 'PSNR'):.2f} dB, "
                f"SSIM {mean_of(cycle, 'SSIM'):.3f} vs {mean_of(dicycle, 'SSIM'):.3f}"
            )
            if not math.isnan(mean_of(cycle + dicycle, "bone_dice")):
                text += (
                    f", MAE {mean_of(cycle, 'MAE_HU'):.0f} vs {mean_of(dicycle, 'MAE_HU'):.0f} HU, "
                    f"bone Dice {mean_of(cycle, 'bone_dice'):.3f} vs {mean_of(dicycle, 'bone_dice'):.3f}"
                )
            sentences.append(text + ".")
    return sentences


def distortion_effect(rows_by_experiment: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    """How much the distortion itself adds to each method's displacement: Table 2 minus Table 1, per direction.

    Without a domain distortion a synthesis is still displaced by whatever geometric error its generator makes (and by
    the registration's own noise on an imperfect synthesis), so the displacement that the distortion causes is the
    difference between the two experiments, to be compared with the distortion's own displacement.
    """
    if not {"undeformed", "deformed"} <= set(rows_by_experiment):
        return []
    undeformed, deformed = group_rows(rows_by_experiment["undeformed"]), group_rows(rows_by_experiment["deformed"])
    sentences = []
    for label, methods in deformed.items():
        if not all(method in methods and method in undeformed.get(label, {}) for method in METHODS):
            continue
        parts = []
        for method, name in (("Cycle", "CycleGAN"), ("Dicycle", "DicycleGAN")):
            before = mean_of(undeformed[label][method], "displacement_mm")
            after = mean_of(methods[method], "displacement_mm")
            parts.append(f"{name} {before:.2f} -> {after:.2f} mm ({after - before:+.2f} mm)")
        text = f"{label}: without -> with the T2 distortion, " + ", ".join(parts)
        if REFERENCE_METHOD in methods:
            text += (
                f"; the distortion itself displaces by {mean_of(methods[REFERENCE_METHOD], 'displacement_mm'):.2f} mm"
            )
        sentences.append(text + ".")
    return sentences


def results_markdown(
    command: str,
    preset: str,
    data_settings: Mapping[str, Any],
    rows_by_experiment: Mapping[str, Sequence[Mapping[str, Any]]],
    records: Mapping[tuple[str, str], Mapping[str, Any]],
    figures: Mapping[str, str],
    timings: Mapping[str, float],
    budget_overrides: Mapping[str, Any] | None = None,
) -> str:
    """The text of ``results.md``; ``budget_overrides``: the epochs of a ``--budget`` run, stated with the budget."""
    lines = [
        "# DicycleGAN against CycleGAN on the brain phantom",
        "",
        "The paper's experiments (Wang et al. 2018, Tables 1-3 and Fig. 4) repeated with this bundle on the MNI152 "
        "phantom (`scripts/tooling/phantom.py`): the same code trained as CycleGAN (`configs/cyclegan.json`) and as "
        "DicycleGAN, with the same data, seed and budget, evaluated on held-out subjects.",
        "",
        "Produced by:",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Budget (`--preset {preset}`): {PRESETS[preset]['description']}"
        + (
            f"; here stretched by `--budget`: {budget_overrides['n_epochs']} constant + "
            f"{budget_overrides['n_epochs_decay']} decaying epochs"
            if budget_overrides
            else ""
        )
        + ". Data: "
        + ", ".join(f"{name} {value}" for name, value in data_settings.items())
        + f" (`scripts/make_demo_data.py`). Machine: {platform.machine()}, {os.cpu_count()} CPU cores"
        + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "")
        + f", torch {torch.__version__}, {torch.get_num_threads()} threads. Wall time of the whole study "
        f"{timings['total'] / 60:.1f} min (data {timings['data']:.0f} s, training "
        f"{timings['training'] / 60:.1f} min, evaluation and registration {timings['evaluation'] / 60:.1f} min).",
        "",
        "## Headline",
        "",
        *[f"- {sentence}" for sentence in headline(rows_by_experiment)],
        "",
    ]
    effect = distortion_effect(rows_by_experiment)
    if effect:
        lines += [
            "What the distortion adds (residual displacement of Table 2 minus that of Table 1, same method, same "
            "budget): without a domain distortion a synthesis is still displaced by its generator's own geometric "
            "errors (and by the registration's noise on an imperfect synthesis), so this difference, not the Table 2 "
            "figure alone, is the share of the distortion that a method copied.",
            "",
            *[f"- {sentence}" for sentence in effect],
            "",
        ]
    lines += [
        "Residual displacement: a cubic B-spline registration (SimpleITK, Mattes mutual information, 30 mm control "
        "points; `bundle/registration.py`) moves each synthesis onto its ground truth; the table gives the mean and "
        "the 95th percentile of the displacement length over the mask. A synthesis aligned with its source scores "
        "near 0 mm; one that copies a domain's deformation scores about that deformation. The row *Distortion only* "
        "scores the ground truth moved by the applied T2 distortion: what a synthesis that renders the target "
        "contrast perfectly but copies the distortion would score.",
        "",
        "MSE, PSNR and SSIM as in the paper: on z-scored MR (CT: HU window [-1000, 2000] scaled to [-1, 1]), PSNR "
        "with the ground truth's maximum, SSIM by the paper's global formula, all inside the mask; mean (sample sd) "
        "over the n test volumes. For CT targets also the MAE in HU and the bone Dice: the overlap of the voxels "
        "above 300 HU in the synthesis and in the ground truth, i.e. whether the bone is drawn where it is (bone and "
        "air are both dark in MR, so this is the hard part of MR -> CT). The paper's columns are its own figures "
        "(IXI at 1.8 mm and the private abdominal "
        "data, full-size networks), beside ours for reference, not for a like-for-like comparison: our phantom, "
        "width and budget differ.",
        "",
    ]
    for key, rows in rows_by_experiment.items():
        experiment = EXPERIMENTS[key]
        lines += [f"## {experiment.table} analogue: {experiment.title}", "", experiment_table(experiment, rows), ""]
        if key in PAPER_NOTES:
            lines += [PAPER_NOTES[key], ""]
        lines += [f"Metrics inside the {experiment.mask}. Training wall time: "]
        lines[-1] += (
            ", ".join(
                f"{method} {records[key, method]['seconds'] / 60:.1f} min"
                for method in METHODS
                if (key, method) in records
            )
            + "."
        )
        if key in figures:
            lines += ["", f"![{experiment.table} analogue]({figures[key]})", ""]
    if "curves" in figures:
        lines += [
            "## Training curves",
            "",
            "Per run, from its TensorBoard logs (`runs/<experiment>_<method>/logs`): the generator objective of eq. 4 "
            "(CycleGAN's has no alignment or deformed-cycle term), DicycleGAN's alignment term 2 - NMI - NMI, and the "
            "validation PSNR of A -> B on the paired validation subject.",
            "",
            f"![training curves]({figures['curves']})",
            "",
        ]
    lines += [
        "## Per-volume figures",
        "",
        "Every volume's row is in `metrics/<experiment>_<method>.csv` of the output folder; the models and "
        "TensorBoard logs of each run in `runs/<experiment>_<method>/`.",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ main


def main(
    output_dir: str = "study",
    preset: str = "cpu",
    experiments: str | Sequence[str] = ("undeformed", "deformed", "mr_ct"),
    dataset_dir: str | None = None,
    seed: int = 0,
    publish_dir: str | None = None,
    budget: int = 1,
) -> dict[str, Any]:
    """Build the phantom, train CycleGAN and DicycleGAN on each experiment, evaluate, and write ``results.md``.

    Args:
        output_dir: where the data, runs, metrics, figures and ``results.md`` go.
        preset: ``"cpu"`` (about an hour on 2 cores, reduced width and resolution) or ``"paper"`` (the paper's
            settings; a GPU job).
        experiments: any of ``undeformed``, ``deformed``, ``mr_ct`` (comma-separated or a list).
        dataset_dir: an existing phantom folder to use instead of building ``OUTPUT_DIR/data``.
        seed: seed of the data set and of every training run.
        publish_dir: also copy ``results.md`` and its figures there (``docs`` updates ``docs/results.md``).
        budget: train ``budget`` times the preset's epochs (both the constant and the decay stage), the same
            schedule stretched: does a result change with longer training?

    Returns:
        ``{"results": path of results.md, "rows": {experiment: per-volume rows}}``.

    Raises:
        ValueError: for an unknown preset or experiment, or a budget below 1.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}.")
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a whole number of times the preset's epochs (>= 1), got {budget!r}.")
    keys = [k.strip() for k in experiments.split(",")] if isinstance(experiments, str) else list(experiments)
    unknown = [key for key in keys if key not in EXPERIMENTS]
    if unknown or not keys:
        raise ValueError(f"unknown experiments {unknown}; choose from {sorted(EXPERIMENTS)}.")
    output = Path(output_dir).resolve()
    output.mkdir(parents=True, exist_ok=True)
    settings = PRESETS[preset]
    configs = settings["configs"]
    overrides = {**settings.get("overrides", {}), **budget_epochs(configs, settings.get("overrides", {}), budget)}
    data_dir = Path(dataset_dir).resolve() if dataset_dir else output / "data"
    timings = {"data": 0.0 if dataset_dir else build_data(data_dir, settings["data"], seed)}

    records = {}
    run_dirs = {}
    for key in keys:
        for method in METHODS:
            run_dirs[key, method] = output / "runs" / f"{key}_{method}"
            records[key, method] = train(
                run_dirs[key, method], EXPERIMENTS[key], method, configs, overrides, data_dir, seed
            )

    evaluation_start = time.perf_counter()
    (output / "metrics").mkdir(exist_ok=True)
    measured_before = measured_seconds(output / "metrics")
    rows_by_experiment: dict[str, list[dict[str, Any]]] = {}
    figures: dict[str, str] = {}
    for key in keys:
        experiment = EXPERIMENTS[key]
        parsers = {}
        rows = []
        for method in METHODS:
            run_dir = run_dirs[key, method]
            parsers[method] = evaluation_parser(experiment, method, configs, overrides, data_dir, run_dir)
            log(f"{key} {method}: evaluating")
            trained_at = (run_dir / "run.json").stat().st_mtime
            rows += evaluate(parsers[method], output / "metrics" / f"{key}_{method}.csv", trained_at)
        if key == "deformed":
            pixdim = parsers["Dicycle"].get_parsed_content("settings")["pixdim"]
            rows += distortion_reference(experiment, data_dir, pixdim, output / "metrics" / f"{key}_reference.csv")
        rows_by_experiment[key] = rows
        figure = comparison_figure(output / "figures" / f"fig4_{key}.png", experiment, parsers)
        figures[key] = figure.relative_to(output).as_posix()
    figures["curves"] = (
        training_curves(output / "figures" / "training_curves.png", run_dirs).relative_to(output).as_posix()
    )
    # runs trained and metrics measured by an earlier call count with their own recorded wall times
    timings["evaluation"] = measured_before + time.perf_counter() - evaluation_start
    timings["training"] = sum(record["seconds"] for record in records.values())
    timings["total"] = timings["data"] + timings["training"] + timings["evaluation"]

    command = command_line(
        "scripts/reproduce.py",
        {
            "output_dir": output_dir,
            "preset": preset,
            "experiments": ",".join(keys) if keys != list(EXPERIMENTS) else None,
            "dataset_dir": dataset_dir or None,
            "seed": seed or None,
            "budget": budget if budget != 1 else None,
        },
    )
    text = results_markdown(
        command,
        preset,
        settings["data"],
        rows_by_experiment,
        records,
        figures,
        timings,
        overrides if budget != 1 else {},
    )
    results = output / "results.md"
    results.write_text(text, encoding="utf-8")
    log(f"wrote {results}")
    print("\n".join(headline(rows_by_experiment)))
    if publish_dir:
        publish = Path(publish_dir)
        (publish / "figures").mkdir(parents=True, exist_ok=True)
        for name in figures.values():
            shutil.copy2(output / name, publish / name)
        # the other studies' sections of the published file (pseudo_ct_study.py, dose_response.py) stay
        published = publish / "results.md"
        kept = marked_sections(published.read_text(encoding="utf-8")) if published.is_file() else []
        published.write_text(
            results.read_text(encoding="utf-8").rstrip() + "".join(f"\n\n{block}" for block in kept) + "\n",
            encoding="utf-8",
        )
        log(f"published to {publish / 'results.md'}")
    return {"results": str(results), "rows": rows_by_experiment}


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: result["results"])
