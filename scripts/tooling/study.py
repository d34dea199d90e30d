"""What the studies share: presets, runs trained and evaluated, the phantom, logging and the command runner.

A study folder, read back by a repeated command instead of training or measuring again:

- ``data/``: the phantom (:func:`build_data`), unless ``--dataset_dir`` names one;
- ``runs/<run>/``: ``models/`` (``checkpoint.pt`` resumes an interrupted run), ``logs/`` (TensorBoard) and
  ``run.json`` (written once training has finished: such a run is not retrained);
- ``metrics/<run>.csv``: per-volume metrics, read back when newer than ``run.json``, beside ``<run>.json``
  (``{"seconds"}`` spent measuring them);
- ``figures/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch
from bundle.data import volume_preprocessing
from bundle.datalist import load_datalist
from bundle.metrics import voxel_size
from bundle.pairing import mask_preprocessing
from bundle.reports import read_csv
from monai.bundle import ConfigParser

__all__ = [
    "DIRECTIONS",
    "EXPERIMENTS",
    "METHODS",
    "PRESETS",
    "ROOT",
    "Experiment",
    "Preset",
    "Run",
    "StudyRuns",
    "as_list",
    "build_data",
    "check_concurrent",
    "distorted_copies",
    "iterations",
    "log",
    "on_device",
    "prepare_data",
    "run_command",
    "select_preset",
    "train_all",
    "train_and_evaluate",
]

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("Cycle", "Dicycle")
METHOD_COLOURS = {"Cycle": "tab:blue", "Dicycle": "tab:orange"}
# the evaluation's directions of a test entry: (direction, the volume a synthesis stands for, ground truth, mask)
DIRECTIONS = (("A2B", "B", "gt_A2B", "mask"), ("B2A", "A", "gt_B2A", "mask_B"))


def log(message: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_command(
    command: Sequence[str], log_file: Path | None = None, timeout: float | None = None, check: bool = True
) -> tuple[int, float]:
    """Run a command from the repository root with the repository on ``PYTHONPATH``; return its code and wall time (s).

    Args:
        command: the program and its arguments.
        log_file: where its output goes; None: streamed here after a ``$ command`` line.
        timeout: seconds before it is killed (``subprocess.TimeoutExpired``).
        check: raise ``subprocess.CalledProcessError`` when it fails.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    if log_file is None:
        print("$ " + " ".join(command), flush=True)
    with contextlib.nullcontext(None) if log_file is None else log_file.open("w", encoding="utf-8") as out:
        stderr = None if out is None else subprocess.STDOUT
        done = subprocess.run(list(command), cwd=ROOT, env=env, stdout=out, stderr=stderr, check=check, timeout=timeout)
    return done.returncode, time.perf_counter() - start


def cli_flags(settings: Mapping[str, Any]) -> list[str]:
    """``--name value`` for each setting; lists as JSON, as ``monai.bundle`` and fire read them."""
    return [
        text
        for name, value in settings.items()
        for text in (f"--{name}", json.dumps(value) if isinstance(value, (list, tuple)) else str(value))
    ]


def as_list(value: str | float | Sequence[Any], cast: type = str) -> list[Any]:
    """A list given on the command line: comma-separated text, one value, or a sequence (fire's reading of ``0,10``)."""
    if isinstance(value, str):
        return [cast(item.strip()) for item in value.split(",") if item.strip()]
    if isinstance(value, (int, float)):
        return [cast(value)]
    return [cast(item) for item in value]


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A pair of phantom domains to train and evaluate on.

    Args:
        key: short name (run folders, command line).
        table: the paper's table it reproduces.
        title: what it is.
        datalist: datalist file written by ``scripts/make_demo_data.py`` (or derived from one).
        domain_a, domain_b: ``"MR"`` or ``"CT"``.
        mask: what the metrics are computed inside.
    """

    key: str
    table: str
    title: str
    datalist: str
    domain_a: str = "MR"
    domain_b: str = "MR"
    mask: str = "brain mask"


# the paper's experiments, on the datalists of scripts/make_demo_data.py
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


@dataclasses.dataclass(frozen=True)
class Preset:
    """A budget of the studies: training overrides of ``configs/train.json`` and the phantom to train on.

    Args:
        configs: override files of ``configs/train.json`` (its defaults are the paper's).
        overrides: settings on top of them.
        data: ``scripts/make_demo_data.py`` settings.
        description: what it is, for the results.
        evaluation: settings of ``configs/evaluate.json`` for the study's evaluations.
    """

    configs: tuple[str, ...]
    overrides: Mapping[str, Any]
    data: Mapping[str, Any]
    description: str
    evaluation: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def value(self, name: str) -> Any:
        """A setting of ``configs/train.json`` under this preset (its files, then its overrides)."""
        parser = ConfigParser()
        parser.read_config([str(ROOT / name) for name in ["configs/train.json", *self.configs]])
        parser.update({key: value for key, value in self.overrides.items() if key in parser.get("", {})})
        return parser.get_parsed_content(name)

    def pixdim(self) -> list[float]:
        """The training and evaluation voxel size (mm)."""
        return [float(v) for v in self.value("pixdim")]


PRESETS: dict[str, Preset] = {
    "cpu": Preset(
        ("configs/reproduce_cpu.json",),
        {},
        {"subjects": 16, "n_validation": 1, "n_test": 4, "distortion_mm": 10.0},
        "CPU budget: generators of width 16 with 4 residual blocks (paper: 64, 9), discriminators of width 16, 2.4 mm "
        "isotropic voxels and 96 x 96 training slices (paper: 1.8 mm, 128 x 128), 10 epochs of 200 slice pairs (5 "
        "constant, 5 decaying; paper: 100 + 100 epochs), no early stop",
    ),
    "smoke": Preset(
        ("configs/reproduce_cpu.json",),
        {
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
        {"subjects": 4, "n_validation": 1, "n_test": 1, "downsample": 4, "distortion_mm": 10.0},
        "smoke test of the pipeline (tests use it; says nothing about the method): width 4, one residual block, "
        "4.8 mm voxels, 2 epochs of 4 slice pairs, 5 registration iterations per level",
        {"registration_iterations": 5},
    ),
    "gpu": Preset(
        (),
        {},
        {"subjects": 16, "n_validation": 1, "n_test": 4, "distortion_mm": 10.0},
        "GPU budget: the paper's networks (generators of width 64 with 9 residual blocks, 70 x 70 PatchGAN), 1.8 mm "
        "voxels and 128 x 128 slices, the paper's schedule cut by a wall-clock limit (`--time_limit_s`) instead of "
        "epochs, on the phantom of the CPU preset",
    ),
    "paper": Preset(
        (),
        {},
        {"subjects": 66, "n_validation": 0, "n_test": 28, "distortion_mm": 10.0},
        "the paper's settings: generators of width 64 with 9 residual blocks, 70 x 70 PatchGAN, 1.8 mm voxels, "
        "128 x 128 slices, 100 + 100 epochs of 1000 slice pairs with the early-stop rule, 38 training and 28 test "
        "subjects",
    ),
}


def select_preset(name: str, budget: int = 1) -> Preset:
    """One of :data:`PRESETS` with its epochs (constant and decay) times ``budget``; a budget of 1 adds no override.

    Raises:
        ValueError: for an unknown preset or a budget that is not a whole number >= 1.
    """
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}.")
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a whole number of times the preset's epochs (>= 1), got {budget!r}.")
    preset = PRESETS[name]
    if budget == 1:
        return preset
    epochs = {epochs: int(preset.value(epochs)) * budget for epochs in ("n_epochs", "n_epochs_decay")}
    return dataclasses.replace(preset, overrides={**preset.overrides, **epochs})


def on_device(preset: Preset, device: str | None = None, time_limit_s: float | None = None) -> Preset:
    """``preset`` trained and evaluated on ``device`` (e.g. ``"cuda"``; None: the config's, CUDA when present),
    each run stopping after ``time_limit_s`` seconds of training (None: its epochs)."""
    overrides = dict(preset.overrides)
    if device is not None:
        torch.device(device)  # a bad name fails here, not in every run
        overrides["device"] = f"$torch.device('{device}')"
    if time_limit_s is not None:
        if not time_limit_s > 0:
            raise ValueError(f"time_limit_s must be a positive number of seconds, got {time_limit_s!r}.")
        overrides["time_limit_s"] = float(time_limit_s)
    return dataclasses.replace(preset, overrides=overrides)


def build_data(dataset_dir: Path, settings: Mapping[str, Any], seed: int) -> float:
    """Build the phantom data set (``scripts/make_demo_data.py``, at once when the folder holds it); return the
    wall time (s)."""
    command = [sys.executable, "-m", "scripts.make_demo_data", "--output_dir", str(dataset_dir), "--seed", str(seed)]
    return run_command(command + cli_flags(settings))[1]


def prepare_data(output: Path, preset: Preset, dataset_dir: str | None, seed: int) -> tuple[Path, float]:
    """The study's phantom folder (``dataset_dir`` when given, else ``OUTPUT/data`` built by :func:`build_data`) and
    the seconds spent building it."""
    if dataset_dir:
        return Path(dataset_dir).resolve(), 0.0
    return output / "data", build_data(output / "data", preset.data, seed)


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of a study and its evaluation.

    Args:
        name: its folder under ``OUTPUT_DIR/runs``.
        experiment: what it trains on.
        method: ``"Cycle"`` (``configs/cyclegan.json``) or ``"Dicycle"`` (the paper's DicycleGAN, or a variant).
        seed: training seed.
        overrides: training settings on top of the preset's.
        evaluated_on: the test data (default: ``experiment``'s).
        metrics: name of its CSV under ``OUTPUT_DIR/metrics`` (default: ``name``).
    """

    name: str
    experiment: Experiment
    method: str = "Dicycle"
    seed: int = 0
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    evaluated_on: Experiment | None = None
    metrics: str | None = None


@dataclasses.dataclass
class StudyRuns:
    """What :func:`train_and_evaluate` returns, by run name.

    Args:
        records: each run's ``run.json``.
        parsers: each run's evaluation parser (``configs/train.json`` + ``configs/evaluate.json``), for figures.
        rows: each run's per-volume metrics.
        training_s: the recorded training time of all runs (s), whichever call trained them.
        evaluation_s: the time spent measuring every CSV of ``metrics/`` (s), whichever call measured it.
    """

    records: dict[str, dict[str, Any]]
    parsers: dict[str, ConfigParser]
    rows: dict[str, list[dict[str, Any]]]
    training_s: float
    evaluation_s: float


def train(run_dir: Path, run: Run, preset: Preset, dataset_dir: Path, log_file: Path | None = None) -> dict[str, Any]:
    """Train one run with ``configs/train.json`` unless it has finished (``run.json``), resuming from
    ``models/checkpoint.pt``; return its record ``{"command", "seconds", "resumed", "iterations", "trained_on"}``.

    Args:
        run_dir: the run's folder.
        run: what to train.
        preset: the budget (and device, time limit) of the run.
        dataset_dir: the phantom.
        log_file: where the training output goes (runs trained side by side); None: streamed here.

    Raises:
        subprocess.CalledProcessError: if training fails (its output is in ``log_file`` when given).
    """
    record_path = run_dir / "run.json"
    if record_path.is_file():
        log(f"{run.name}: trained before ({record_path}), not retrained")
        record = json.loads(record_path.read_text(encoding="utf-8"))
        return {"iterations": iterations(run_dir), **record}  # records written before iterations were kept
    files = ["configs/train.json", *preset.configs, *(["configs/cyclegan.json"] if run.method == "Cycle" else [])]
    settings = {
        "config_file": "[" + ",".join(f"'{name}'" for name in files) + "]",
        "dataset_dir": dataset_dir,
        **_domains(run.experiment),
        "ckpt_dir": run_dir / "models",
        "output_dir": run_dir / "logs",
        "seed": run.seed,
        **preset.overrides,
        **run.overrides,
    }
    command = [sys.executable, "-m", "monai.bundle", "run", *cli_flags(settings)]
    checkpoint = run_dir / "models" / "checkpoint.pt"
    resumed = checkpoint.is_file()
    if resumed:
        command += ["--resume", "True"]
        log(f"{run.name}: resuming from {checkpoint}")
    log(f"{run.name}: training" + (f" (output in {log_file})" if log_file else ""))
    if log_file:
        log_file.parent.mkdir(parents=True, exist_ok=True)
    _, seconds = run_command(command, log_file=log_file)
    record = {"command": " ".join(command), "seconds": seconds, "resumed": resumed, "iterations": iterations(run_dir)}
    record["trained_on"] = hardware(preset.value("device"))
    record_path.write_text(json.dumps(record, indent=2), encoding="utf-8")
    log(f"{run.name}: trained {record['iterations']} iterations in {seconds:.0f} s")
    return record


def _domains(experiment: Experiment) -> dict[str, str]:
    return {"datalist": experiment.datalist, "domain_a": experiment.domain_a, "domain_b": experiment.domain_b}


def iterations(run_dir: Path) -> int | None:
    """Iterations a run has trained: its checkpoint's trainer state (None without a checkpoint)."""
    checkpoint = run_dir / "models" / "checkpoint.pt"
    if not checkpoint.is_file():
        return None
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return int(state["trainer"]["iteration"])


def hardware(device: torch.device | str, concurrent: int = 1) -> str:
    """Where runs train, for the results: the GPU's name on CUDA, else the CPU architecture and cores."""
    device = torch.device(device)
    side_by_side = f", {concurrent} runs at a time" if concurrent > 1 else ""
    if device.type == "cuda":
        return f"one {torch.cuda.get_device_name(device)} with {os.cpu_count()} CPU cores{side_by_side}"
    return f"{platform.machine()} with {os.cpu_count()} CPU cores{side_by_side}"


def check_concurrent(concurrent: int) -> None:
    """Raise ValueError unless ``concurrent`` (runs trained at once) is a whole number >= 1."""
    if not isinstance(concurrent, int) or concurrent < 1:
        raise ValueError(f"concurrent must be a whole number of runs trained at once (>= 1), got {concurrent!r}.")


def train_all(output: Path, runs: Sequence[Run], preset: Preset, dataset_dir: Path, concurrent: int = 1) -> dict:
    """Train the runs, ``concurrent`` of them side by side (each in its own process, its output in
    ``runs/<run>/train.log``); return each run's record by name.

    Raises:
        ValueError: if ``concurrent`` is not a whole number >= 1.
        RuntimeError: naming the runs that failed and their logs, after the others have finished.
    """
    check_concurrent(concurrent)
    if concurrent == 1:
        return {run.name: train(output / "runs" / run.name, run, preset, dataset_dir) for run in runs}
    logs = {run.name: output / "runs" / run.name / "train.log" for run in runs}
    with ThreadPoolExecutor(max_workers=concurrent) as pool:
        futures = {
            run.name: pool.submit(train, output / "runs" / run.name, run, preset, dataset_dir, logs[run.name])
            for run in runs
        }
        wait(futures.values())
    failed = [name for name, future in futures.items() if future.exception() is not None]
    if failed:
        raise RuntimeError(
            f"{len(failed)} of {len(runs)} runs failed to train: "
            + "; ".join(f"{name} ({futures[name].exception()}; see {logs[name]})" for name in failed)
        )
    return {name: future.result() for name, future in futures.items()}


def evaluation_parser(run: Run, preset: Preset, dataset_dir: Path, run_dir: Path) -> ConfigParser:
    """``configs/train.json`` + ``configs/evaluate.json`` set up for one run, residual displacement on, figures off."""
    files = ["configs/train.json", "configs/evaluate.json", *preset.configs]
    if run.method == "Cycle":
        files.append("configs/cyclegan.json")
    parser = ConfigParser()
    parser.read_config([str(ROOT / name) for name in files])
    parser.update(
        {
            "bundle_root": str(ROOT),
            "dataset_dir": str(dataset_dir),
            **_domains(run.evaluated_on or run.experiment),
            "ckpt_dir": str(run_dir / "models"),
            "output_dir": str(run_dir / "evaluation"),
            "save_figures": False,
            "residual_displacement": True,
            **{name: value for name, value in preset.overrides.items() if name in parser.get("", {})},
            **preset.evaluation,
        }
    )
    return parser


def evaluate(parser: ConfigParser, csv_path: Path, trained_at: float) -> list[dict[str, Any]]:
    """Per-volume metrics of one run (read back from ``csv_path`` when newer than ``trained_at``), the measuring time
    kept beside the CSV."""
    if csv_path.is_file() and csv_path.stat().st_mtime > trained_at:
        log(f"metrics of {csv_path.stem} measured before: {csv_path}")
        return read_csv(csv_path)
    start = time.perf_counter()
    for direction in parser.get_parsed_content("directions"):
        parser.get_parsed_content(f"{direction}#evaluator").run()
    shutil.copyfile(parser.get_parsed_content("metrics_saver").path, csv_path)
    record_seconds(csv_path, time.perf_counter() - start)
    return read_csv(csv_path)


def record_seconds(csv_path: Path, seconds: float) -> None:
    """Keep the time spent measuring ``csv_path`` beside it (``<name>.json``)."""
    csv_path.with_suffix(".json").write_text(json.dumps({"seconds": seconds}), encoding="utf-8")


def measured_seconds(metrics_dir: Path) -> float:
    """Total time spent measuring the CSVs of ``metrics_dir``, whichever call measured them."""
    return sum(json.loads(path.read_text(encoding="utf-8"))["seconds"] for path in metrics_dir.glob("*.json"))


def train_and_evaluate(
    output: Path, runs: Sequence[Run], preset: Preset, dataset_dir: Path, concurrent: int = 1
) -> StudyRuns:
    """Train every run (:func:`train_all`) under ``output/runs``, then evaluate each on its held-out subjects
    (``configs/evaluate.json``) into ``output/metrics``."""
    records = train_all(output, runs, preset, dataset_dir, concurrent)
    start = time.perf_counter()
    (output / "metrics").mkdir(exist_ok=True)
    measured_before = measured_seconds(output / "metrics")
    parsers, rows = {}, {}
    for run in runs:
        run_dir = output / "runs" / run.name
        parsers[run.name] = evaluation_parser(run, preset, dataset_dir, run_dir)
        log(f"{run.name}: evaluating")
        csv_path = output / "metrics" / f"{run.metrics or run.name}.csv"
        rows[run.name] = evaluate(parsers[run.name], csv_path, (run_dir / "run.json").stat().st_mtime)
    training_s = sum(record["seconds"] for record in records.values())
    return StudyRuns(records, parsers, rows, training_s, measured_before + time.perf_counter() - start)


def distorted_copies(
    dataset_dir: Path, datalist: str, pixdim: Sequence[float], **registration: Any
) -> Iterator[dict[str, Any]]:
    """Each test subject's ground truth against its distorted copy, measured as the evaluation measures a synthesis.

    Yields, per direction (:data:`DIRECTIONS`) and test entry of a distorted datalist, ``{"entry", "direction",
    "keys": (moved, truth, mask), "moving", "fixed", "region", "displacement", "seconds"}``: the distorted copy and
    the ground truth on the evaluation's grid, the mask, the residual displacement
    (:func:`bundle.registration.residual_displacement` with ``registration``) and the seconds it took.
    """
    from bundle.registration import residual_displacement  # SimpleITK: not needed where runs only train

    preprocess = volume_preprocessing("image", "MR", pixdim)
    masks = mask_preprocessing("image", pixdim)
    for direction, moved, truth, mask in DIRECTIONS:
        for entry in load_datalist(dataset_dir, datalist, "test"):
            moving = preprocess({"image": entry[moved]})["image"]
            fixed = preprocess({"image": entry[truth]})["image"]
            region = masks({"image": entry[mask]})["image"][0] > 0
            start = time.perf_counter()
            displacement = residual_displacement(moving[0], fixed[0], voxel_size(fixed), region, **registration)
            yield {
                "entry": entry,
                "direction": direction,
                "keys": (moved, truth, mask),
                "moving": moving,
                "fixed": fixed,
                "region": region,
                "displacement": displacement,
                "seconds": time.perf_counter() - start,
            }
