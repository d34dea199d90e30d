"""Reproduce the paper's experiments (Tables 1-3, Fig. 4) on the phantom, CycleGAN against DicycleGAN.

Usage (from the repository root)::

    python -m scripts.reproduce --output_dir study                    # CPU budget: about an hour on 2 cores
    python -m scripts.reproduce --output_dir study --preset paper     # the paper's settings (a GPU job)
    python -m scripts.reproduce --output_dir study --publish_dir docs # also copy results.md and figures to docs/

Three experiments, each trained by ``configs/train.json`` with the same seed, data and budget as DicycleGAN and as
CycleGAN (``configs/cyclegan.json``):

- ``undeformed`` (Table 1): PD <-> T2 with undeformed T2;
- ``deformed`` (Table 2): PD <-> T2 with one fixed smooth distortion of every T2 volume; the ground truths are
  aligned with the source (the real T2 for PD -> T2, the distorted PD for T2 -> PD), as in the paper;
- ``mr_ct`` (Table 3): T1 <-> CT, MR positioning pad against CT head holder, metrics inside the head mask.

Each run is evaluated on the held-out subjects (``configs/evaluate.json``: MSE, PSNR, SSIM inside the mask, and the
residual displacement to the ground truth); for ``deformed`` also the ground truth moved by the distortion.
Writes ``OUTPUT_DIR/results.md`` and ``figures/`` and keeps ``data/``, ``runs/`` and ``metrics/`` as
:mod:`scripts.tooling.study` lays a study out; finished runs are reused, so the command can be repeated.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import fire
import torch
from bundle.datalist import read_datalist
from bundle.metrics import volume_metrics
from bundle.reports import METRICS, mean_sd, read_csv, write_csv
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scripts.tooling.report import command_line, comparison_figure, mean_of, publish
from scripts.tooling.study import (
    EXPERIMENTS,
    METHOD_COLOURS,
    METHODS,
    PRESETS,
    Experiment,
    Run,
    as_list,
    check_concurrent,
    distorted_copies,
    log,
    prepare_data,
    record_seconds,
    select_preset,
    train_and_evaluate,
)

# TensorBoard tags of configs/train.json's logs plotted as training curves, with their titles
CURVE_PANELS = (
    ("total", "generator loss (eq. 4)"),
    ("align", "alignment loss (DicycleGAN)"),
    ("val_psnr", "validation PSNR, A to B (dB)"),
)
REFERENCE_METHOD = "Distortion only"

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


def distortion_reference(
    experiment: Experiment, dataset_dir: Path, pixdim: Sequence[float], csv_path: Path
) -> list[dict[str, Any]]:
    """The scores of a synthesis that renders the target perfectly but copies the domain distortion (per test
    subject and direction, :func:`scripts.tooling.study.distorted_copies`), read back from ``csv_path`` if there."""
    if csv_path.is_file():
        return read_csv(csv_path)
    start = time.perf_counter()
    names = read_datalist(dataset_dir, experiment.datalist)["domains"]
    rows = []
    for copy in distorted_copies(dataset_dir, experiment.datalist, pixdim):
        entry, (moved, truth, mask), displacement = copy["entry"], copy["keys"], copy["displacement"]
        metrics = volume_metrics(copy["moving"], copy["fixed"], copy["region"][None])
        metrics["displacement_mm"], metrics["displacement_p95_mm"] = displacement["mean_mm"], displacement["p95_mm"]
        source, target = ("A", "B") if copy["direction"] == "A2B" else ("B", "A")
        rows.append(
            {
                "subject": entry.get("subject", Path(entry["A"]).name),
                "direction": copy["direction"],
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
    record_seconds(csv_path, time.perf_counter() - start)
    return read_csv(csv_path)


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
    figure = Figure(figsize=(15, 3.2 * len(experiments)), dpi=90)
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(experiments), len(CURVE_PANELS), squeeze=False)
    for row, key in zip(axes, experiments, strict=True):
        for method in METHODS:
            if (key, method) not in runs:
                continue
            scalars = read_scalars(runs[key, method] / "logs")
            for ax, (tag, label) in zip(row, CURVE_PANELS, strict=True):
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


def group_rows(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[Mapping[str, Any]]]]:
    """``{experiment label: {method: rows}}``, A -> B first, methods in table order."""
    order = {method: index for index, method in enumerate((*METHODS, REFERENCE_METHOD))}
    groups: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for row in sorted(rows, key=lambda r: (r["direction"], order.get(r["method"], 99))):
        groups.setdefault(row["experiment"], {}).setdefault(row["method"], []).append(row)
    return groups


def experiment_table(experiment: Experiment, rows: Sequence[Mapping[str, Any]]) -> str:
    """Our results in the paper's layout, with the paper's figures in the last columns."""
    paper = PAPER_TABLES.get(experiment.key, {})
    has_ct = any(not math.isnan(float(r.get("MAE_HU", "nan"))) for r in rows)
    metrics = [m for m in TABLE_METRICS if has_ct or m[0] not in CT_ONLY_METRICS]
    headers = " | ".join(header for _, header, _ in metrics)
    lines = [
        f"| Experiment | | {headers} | n | Paper: MSE | Paper: PSNR | Paper: SSIM |",
        "| --- | --- | " + " | ".join("---:" for _ in metrics) + " | ---: | ---: | ---: | ---: |",
    ]
    for label, methods in group_rows(rows).items():
        for index, (method, group) in enumerate(methods.items()):
            cells = [mean_sd([float(r.get(name, "nan")) for r in group], decimals) for name, _, decimals in metrics]
            reference = paper.get((label, method), ("", "", "") if method == REFERENCE_METHOD else ("-", "-", "-"))
            name = f"*{method}*" if method == REFERENCE_METHOD else method
            row = [label if index == 0 else "", name, *cells, str(len(group)), *reference]
            lines.append("| " + " | ".join(row) + " |")
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
    """How much the distortion itself adds to each method's displacement: Table 2 minus Table 1, per direction."""
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
            reference = mean_of(methods[REFERENCE_METHOD], "displacement_mm")
            text += f"; the distortion itself displaces by {reference:.2f} mm"
        sentences.append(text + ".")
    return sentences


def results_markdown(
    command: str,
    preset: str,
    rows_by_experiment: Mapping[str, Sequence[Mapping[str, Any]]],
    records: Mapping[tuple[str, str], Mapping[str, Any]],
    figures: Mapping[str, str],
    timings: Mapping[str, float],
    budget_overrides: Mapping[str, Any] | None = None,
) -> str:
    """The text of ``results.md``; ``budget_overrides``: the epochs of a ``--budget`` run, stated with the budget."""
    lines = [
        "# DicycleGAN against CycleGAN on the brain phantom\n",
        "The paper's experiments (Wang et al. 2018, Tables 1-3 and Fig. 4) repeated with this bundle on the MNI152 "
        "phantom (`scripts/tooling/phantom.py`): the same code trained as CycleGAN (`configs/cyclegan.json`) and as "
        "DicycleGAN, with the same data, seed and budget, evaluated on held-out subjects.\n",
        "Produced by:\n",
        f"```bash\n{command}\n```\n",
        f"Budget (`--preset {preset}`): {PRESETS[preset].description}"
        + (
            f"; here stretched by `--budget`: {budget_overrides['n_epochs']} constant + "
            f"{budget_overrides['n_epochs_decay']} decaying epochs"
            if budget_overrides
            else ""
        )
        + ". Data: "
        + ", ".join(f"{name} {value}" for name, value in PRESETS[preset].data.items())
        + f" (`scripts/make_demo_data.py`). Machine: {platform.machine()}, {os.cpu_count()} CPU cores"
        + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "")
        + f", torch {torch.__version__}, {torch.get_num_threads()} threads. Wall time of the whole study "
        f"{timings['total'] / 60:.1f} min (data {timings['data']:.0f} s, training "
        f"{timings['training'] / 60:.1f} min, evaluation and registration {timings['evaluation'] / 60:.1f} min).\n",
        "## Headline\n",
        *[f"- {sentence}" for sentence in headline(rows_by_experiment)],
        "",
    ]
    effect = distortion_effect(rows_by_experiment)
    if effect:
        lines += [
            "What the distortion adds (residual displacement of Table 2 minus that of Table 1, same method, same "
            "budget): without a domain distortion a synthesis is still displaced by its generator's own geometric "
            "errors (and by the registration's noise on an imperfect synthesis), so this difference, not the Table 2 "
            "figure alone, is the share of the distortion that a method copied.\n",
            *[f"- {sentence}" for sentence in effect],
            "",
        ]
    lines += [
        "Residual displacement: a cubic B-spline registration (SimpleITK, Mattes mutual information, 30 mm control "
        "points; `bundle/registration.py`) moves each synthesis onto its ground truth; the table gives the mean and "
        "the 95th percentile of the displacement length over the mask. A synthesis aligned with its source scores "
        "near 0 mm; one that copies a domain's deformation scores about that deformation. The row *Distortion only* "
        "scores the ground truth moved by the applied T2 distortion: what a synthesis that renders the target "
        "contrast perfectly but copies the distortion would score.\n",
        "MSE, PSNR and SSIM as in the paper: on z-scored MR (CT: HU window [-1000, 2000] scaled to [-1, 1]), PSNR "
        "with the ground truth's maximum, SSIM by the paper's global formula, all inside the mask; mean (sample sd) "
        "over the n test volumes. For CT targets also the MAE in HU and the bone Dice: the overlap of the voxels "
        "above 300 HU in the synthesis and in the ground truth, i.e. whether the bone is drawn where it is (bone and "
        "air are both dark in MR, so this is the hard part of MR -> CT). The paper's columns are its own figures "
        "(IXI at 1.8 mm and the private abdominal "
        "data, full-size networks), beside ours for reference, not for a like-for-like comparison: our phantom, "
        "width and budget differ.\n",
    ]
    for key, rows in rows_by_experiment.items():
        experiment = EXPERIMENTS[key]
        lines += [f"## {experiment.table} analogue: {experiment.title}\n", experiment_table(experiment, rows) + "\n"]
        if key in PAPER_NOTES:
            lines += [PAPER_NOTES[key] + "\n"]
        times = [f"{m} {records[key, m]['seconds'] / 60:.1f} min" for m in METHODS if (key, m) in records]
        lines += [f"Metrics inside the {experiment.mask}. Training wall time: " + ", ".join(times) + "."]
        if key in figures:
            lines += [f"\n![{experiment.table} analogue]({figures[key]})\n"]
    if "curves" in figures:
        lines += [
            "## Training curves\n",
            "Per run, from its TensorBoard logs (`runs/<experiment>_<method>/logs`): the generator objective of eq. 4 "
            "(CycleGAN's has no alignment or deformed-cycle term), DicycleGAN's alignment term 2 - NMI - NMI, and the "
            "validation PSNR of A -> B on the paired validation subject.\n",
            f"![training curves]({figures['curves']})\n",
        ]
    lines += [
        "## Per-volume figures\n",
        "Every volume's row is in `metrics/<experiment>_<method>.csv` of the output folder; the models and "
        "TensorBoard logs of each run in `runs/<experiment>_<method>/`.\n",
    ]
    return "\n".join(lines)


def main(
    output_dir: str = "study",
    preset: str = "cpu",
    experiments: str | Sequence[str] = ("undeformed", "deformed", "mr_ct"),
    dataset_dir: str | None = None,
    seed: int = 0,
    publish_dir: str | None = None,
    budget: int = 1,
    concurrent: int = 1,
) -> dict[str, Any]:
    """Build the phantom, train CycleGAN and DicycleGAN on each experiment, evaluate, and write ``results.md``.

    Args:
        output_dir: where the data, runs, metrics, figures and ``results.md`` go.
        preset: a preset of :data:`scripts.tooling.study.PRESETS` (``cpu``: about an hour on 2 cores; ``paper``).
        experiments: any of ``undeformed``, ``deformed``, ``mr_ct`` (comma-separated or a list).
        dataset_dir: an existing phantom folder to use instead of building ``OUTPUT_DIR/data``.
        seed: seed of the data set and of every training run.
        publish_dir: also copy ``results.md`` and its figures there (the other studies' marked sections stay).
        budget: train ``budget`` times the preset's epochs (constant and decay stage alike).
        concurrent: runs trained side by side, each in its own process (its output in ``runs/<run>/train.log``).

    Returns:
        ``{"results": path of results.md, "rows": {experiment: per-volume rows}}``.

    Raises:
        ValueError: for an unknown preset or experiment, or a budget below 1.
    """
    settings = select_preset(preset, budget)
    check_concurrent(concurrent)
    keys = as_list(experiments)
    unknown = [key for key in keys if key not in EXPERIMENTS]
    if unknown or not keys:
        raise ValueError(f"unknown experiments {unknown}; choose from {sorted(EXPERIMENTS)}.")
    output = Path(output_dir).resolve()
    output.mkdir(parents=True, exist_ok=True)
    data_dir, data_s = prepare_data(output, settings, dataset_dir, seed)
    runs = [Run(f"{key}_{method}", EXPERIMENTS[key], method, seed) for key in keys for method in METHODS]
    study = train_and_evaluate(output, runs, settings, data_dir, concurrent)

    start = time.perf_counter()
    rows_by_experiment: dict[str, list[dict[str, Any]]] = {}
    figures: dict[str, str] = {}
    for key in keys:
        rows_by_experiment[key] = [row for method in METHODS for row in study.rows[f"{key}_{method}"]]
        if key == "deformed":
            csv_path = output / "metrics" / f"{key}_reference.csv"
            rows_by_experiment[key] += distortion_reference(EXPERIMENTS[key], data_dir, settings.pixdim(), csv_path)
        parsers = {method: study.parsers[f"{key}_{method}"] for method in METHODS}
        figure = comparison_figure(output / "figures" / f"fig4_{key}.png", EXPERIMENTS[key], parsers)
        figures[key] = figure.relative_to(output).as_posix()
    run_dirs = {(key, method): output / "runs" / f"{key}_{method}" for key in keys for method in METHODS}
    curves = training_curves(output / "figures" / "training_curves.png", run_dirs)
    figures["curves"] = curves.relative_to(output).as_posix()
    # runs trained and metrics measured by an earlier call count with their own recorded wall times
    timings = {"data": data_s, "training": study.training_s}
    timings["evaluation"] = study.evaluation_s + time.perf_counter() - start
    timings["total"] = timings["data"] + timings["training"] + timings["evaluation"]

    command = command_line(
        "scripts.reproduce",
        {
            "output_dir": output_dir,
            "preset": preset,
            "experiments": ",".join(keys) if keys != list(EXPERIMENTS) else None,
            "dataset_dir": dataset_dir or None,
            "seed": seed or None,
            "budget": budget if budget != 1 else None,
            "concurrent": concurrent if concurrent != 1 else None,
        },
    )
    records = {(key, method): study.records[f"{key}_{method}"] for key in keys for method in METHODS}
    budget_overrides = settings.overrides if budget != 1 else {}
    text = results_markdown(command, preset, rows_by_experiment, records, figures, timings, budget_overrides)
    results = output / "results.md"
    results.write_text(text, encoding="utf-8")
    log(f"wrote {results}")
    print("\n".join(headline(rows_by_experiment)))
    if publish_dir:
        publish(publish_dir, text, [output / name for name in figures.values()])
    return {"results": str(results), "rows": rows_by_experiment}


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: result["results"])
