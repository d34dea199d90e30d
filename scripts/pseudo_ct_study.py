"""Pseudo-CT study: which training setting makes the aligned pass, the one inference serves, a CT?

Usage (from the repository root)::

    python -m scripts.pseudo_ct_study --output_dir study_pct                  # all variants, CPU budget
    python -m scripts.pseudo_ct_study --output_dir study_pct --publish_dir docs

The Table 3 analogue (phantom T1 <-> CT, differing beds) is trained by ``configs/train.json`` at a preset of
:data:`scripts.tooling.study.PRESETS`, with the same data and seed, once per variant (:data:`VARIANTS`): the paper's
CycleGAN and DicycleGAN, the opt-in switches beyond the paper, and the misaligned-pairs mode (each training T1 paired
with its subject's CT, distorted by a smooth field of its own) with its control of pairs that overlay.

Every run is evaluated on the held-out subjects by ``configs/evaluate.json`` (the undeformed pass that inference
serves). Writes ``OUTPUT_DIR/pseudo_ct.md`` and ``figures/fig4_pseudo_ct.png``; finished runs are reused.
``--publish_dir docs`` replaces the study's marked section of ``docs/results.md`` (another ``--budget`` or ``--tag``
has its own) and copies the figure.
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import fire
import nibabel as nib
import numpy as np
from bundle.datalist import read_datalist
from bundle.pairing import mask_preprocessing
from bundle.settings import as_bool
from bundle.transforms import DomainDistortion
from scripts import alignment_terms
from scripts.dose_response import applied_displacement
from scripts.tooling.report import column_cell, command_line, comparison_figure, mean_of, publish
from scripts.tooling.study import (
    EXPERIMENTS,
    Run,
    as_list,
    check_concurrent,
    hardware,
    log,
    on_device,
    prepare_data,
    select_preset,
    train_all,
    train_and_evaluate,
)

__all__ = ["VARIANTS", "Variant", "pairs_datalist", "study"]

PAIRS_SPACING_MM = 40.0
PAIRS_SEED_OFFSET = 1000  # distortion seed of a pair: this plus the subject's number (phantom007 -> 1007)
SECTION = "pseudo-ct-study"  # marker of the section in results.md; "-3x" etc. for another --budget
# targets on the undeformed pass, T1 -> CT: (bone Dice at least, MAE at most, residual displacement at most; None: no
# worse than the paper's DicycleGAN measured in the same study)
TARGETS = {"unpaired": (0.70, 150.0, None), "misaligned pairs": (0.85, 100.0, 1.5)}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One training setting of the study.

    Args:
        key: run folder suffix and command-line name.
        label: what the tables call it.
        overrides: ``configs/train.json`` settings that differ from the paper's defaults.
        pairs_mm: None: unpaired training; else the peak misregistration (mm) of the training pairs (0: overlay).
        cyclegan: train as CycleGAN (``configs/cyclegan.json``).
    """

    key: str
    label: str
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    pairs_mm: float | None = None
    cyclegan: bool = False

    @property
    def group(self) -> str:
        return "unpaired" if self.pairs_mm is None else "misaligned pairs" if self.pairs_mm else "aligned pairs"


VARIANTS: dict[str, Variant] = {
    variant.key: variant
    for variant in (
        Variant("Cycle", "CycleGAN (paper)", cyclegan=True),
        Variant("Dicycle", "DicycleGAN (paper)"),
        Variant("Dicycle_shared", "+ shared offsets", {"offsets": "shared"}),
        Variant(
            "Dicycle_shared_gan_aligned",
            "+ shared offsets + GAN on the aligned pass",
            {"offsets": "shared", "lambda_gan_aligned": 1.0},
        ),
        Variant(
            "Dicycle_shared_mind",
            "+ shared offsets + MIND-SSC alignment",
            {"offsets": "shared", "alignment": "mind_ssc"},
        ),
        Variant("Cycle_d4", "CycleGAN + 142 px discriminator", {"d_layers": 4}, cyclegan=True),
        Variant("Dicycle_field", "+ displacement field", {"offsets": "field"}),
        Variant("Dicycle_field_d4", "+ displacement field + 142 px discriminator", {"offsets": "field", "d_layers": 4}),
        Variant(
            "Dicycle_field_mind",
            "+ displacement field + MIND-SSC alignment",
            {"offsets": "field", "alignment": "mind_ssc"},
        ),
        Variant(
            "Dicycle_misaligned_pairs",
            "+ shared offsets + misaligned pairs",
            {"offsets": "shared", "lambda_paired": 10.0},
            pairs_mm=10.0,
        ),
        Variant(
            "Dicycle_misaligned_pairs_mind",
            "+ shared offsets + misaligned pairs + MIND-SSC alignment",
            {"offsets": "shared", "lambda_paired": 10.0, "alignment": "mind_ssc"},
            pairs_mm=10.0,
        ),
        Variant(
            "Dicycle_misaligned_pairs_field",
            "+ displacement field + misaligned pairs",
            {"offsets": "field", "lambda_paired": 10.0},
            pairs_mm=10.0,
        ),
        Variant(
            "Dicycle_aligned_pairs",
            "+ shared offsets + pairs that overlay (control)",
            {"offsets": "shared", "lambda_paired": 10.0},
            pairs_mm=0.0,
        ),
    )
}


def _subject_number(subject: str) -> int:
    digits = re.findall(r"\d+", subject)
    if not digits:
        raise ValueError(f"subject {subject!r} has no number to seed its misregistration with.")
    return int(digits[-1])


def pairs_datalist(data_dir: Path, misregistration_mm: float, pixdim: Sequence[float]) -> tuple[str, float]:
    """``datalist_mr_ct.json`` plus ``training_pairs``: each training T1 with the CT of the same subject, misregistered.

    The CT of a pair is distorted by a smooth field of its own (seed :data:`PAIRS_SEED_OFFSET` + the subject's
    number, 40 mm control points; 0 mm: the CT as it is), written once under ``data_dir/pairs_CT_<mm>mm/``.

    Args:
        data_dir: the phantom folder (``scripts/make_demo_data.py``).
        misregistration_mm: peak displacement of each pair's distortion.
        pixdim: the training grid (for the applied displacement's mean over the head mask).

    Returns:
        The datalist's file name inside ``data_dir`` and the mean applied displacement (mm) over the head masks.

    Raises:
        FileNotFoundError: if a training T1 has no CT or head mask beside it.
        ValueError: if a subject's name has no number.
    """
    name = f"datalist_mr_ct_pairs_{misregistration_mm:g}mm.json"
    record_path = data_dir / f"pairs_CT_{misregistration_mm:g}mm" / "applied.json"
    if (data_dir / name).is_file() and record_path.is_file():
        return name, json.loads(record_path.read_text(encoding="utf-8"))["mean_mm"]
    content = read_datalist(data_dir, "datalist_mr_ct.json")
    masks = mask_preprocessing("image", pixdim)
    pairs, applied = [], []
    for entry in content["training_A"]:
        t1 = Path(entry["image"])
        subject = t1.parent.name
        ct = t1.parent / t1.name.replace("_T1", "_CT")
        head = t1.parent / t1.name.replace("_T1", "_headmask")
        if not (data_dir / ct).is_file() or not (data_dir / head).is_file():
            raise FileNotFoundError(f"no CT or head mask of {subject} beside {data_dir / t1}.")
        if misregistration_mm == 0:
            pairs.append({"A": str(t1), "B": str(ct), "subject": subject})
            continue
        distortion = DomainDistortion(
            misregistration_mm, PAIRS_SPACING_MM, seed=PAIRS_SEED_OFFSET + _subject_number(subject)
        )
        image = nib.load(data_dir / ct)
        target = Path(f"pairs_CT_{misregistration_mm:g}mm") / ct
        (data_dir / target).parent.mkdir(parents=True, exist_ok=True)
        volume = np.asarray(image.dataobj, dtype=np.float32)[None]
        warped = np.asarray(distortion(volume, affine=image.affine, mode="bilinear"))[0]
        nib.save(nib.Nifti1Image(warped.astype(np.float32), image.affine), data_dir / target)
        grid = masks({"image": str(data_dir / head)})["image"]
        lengths = applied_displacement(distortion, image.shape, image.affine, grid, grid[0].numpy() > 0)
        applied.append(float(np.nanmean(lengths)))
        pairs.append({"A": str(t1), "B": target.as_posix(), "subject": subject})
        log(f"{subject}: CT misregistered by {applied[-1]:.2f} mm (mean over the head) -> {target}")
    mean_mm = statistics.fmean(applied) if applied else 0.0
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps({"mean_mm": mean_mm, "per_pair_mm": applied}), encoding="utf-8")
    recipe = {"misregistration_mm": misregistration_mm, "control_spacing_mm": PAIRS_SPACING_MM}
    listing = {**content, "training_pairs": pairs, "pairs": recipe}
    (data_dir / name).write_text(json.dumps(listing, indent=4), encoding="utf-8")
    return name, mean_mm


def study_table(rows: Mapping[str, Sequence[Mapping[str, Any]]], variants: Sequence[Variant]) -> str:
    """One line per variant: T1 -> CT (MAE, bone Dice, displacement, PSNR, SSIM), CT -> T1 (displacement, PSNR,
    SSIM); mean (sd) over the test subjects."""
    lines = [
        "| Variant | Training | T1 to CT: MAE (HU) | Bone Dice | Residual displacement (mm) | PSNR (dB) | SSIM "
        "| CT to T1: residual displacement (mm) | PSNR (dB) | SSIM | n |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for variant in variants:
        a2b = [r for r in rows[variant.key] if r["direction"] == "A2B"]
        b2a = [r for r in rows[variant.key] if r["direction"] == "B2A"]
        columns = [("MAE_HU", 1), ("bone_dice", 3), ("displacement_mm", 2), ("PSNR", 2), ("SSIM", 3)]
        cells = [column_cell(a2b, *c) for c in columns] + [column_cell(b2a, *c) for c in columns[2:]]
        lines.append(f"| {variant.label} | {variant.group} | " + " | ".join(cells) + f" | {len(a2b)} |")
    return "\n".join(lines)


def target_lines(rows: Mapping[str, Sequence[Mapping[str, Any]]], variants: Sequence[Variant]) -> list[str]:
    """Per target group, the variant closest to the targets (highest bone Dice) and which targets it meets."""
    lines = []
    for group, (dice, mae, displacement) in TARGETS.items():
        members = [v for v in variants if v.group == group and not v.cyclegan]
        if not members:
            continue

        def mean(variant: Variant, metric: str) -> float:
            return mean_of([r for r in rows[variant.key] if r["direction"] == "A2B"], metric)

        best = max(members, key=lambda v: mean(v, "bone_dice"))
        checks = [
            ("bone Dice", mean(best, "bone_dice"), f">= {dice:.2f}", mean(best, "bone_dice") >= dice, 3),
            ("MAE", mean(best, "MAE_HU"), f"<= {mae:.0f} HU", mean(best, "MAE_HU") <= mae, 1),
        ]
        limit = f"<= {displacement:.2f} mm" if displacement is not None else None
        if displacement is None and "Dicycle" in rows:
            displacement = mean(VARIANTS["Dicycle"], "displacement_mm")
            limit = f"<= the paper's DicycleGAN here, {displacement:.2f} mm"
        if limit is not None:
            value = mean(best, "displacement_mm")
            checks.append(("residual displacement", value, limit, value <= displacement, 2))
        met = "; ".join(
            f"{name} {value:.{decimals}f} (target {target}: {'met' if ok else 'MISSED'})"
            for name, value, target, ok, decimals in checks
        )
        lines.append(f"- {group}: best variant *{best.label}*: {met}.")
    return lines


def study_markdown(
    command: str,
    rows: Mapping[str, Sequence[Mapping[str, Any]]],
    variants: Sequence[Variant],
    records: Mapping[str, Mapping[str, Any]],
    pairs_mean_mm: float,
    figure: str,
    budget_text: str,
    timings: Mapping[str, float],
    terms_table: str,
    budget: int = 1,
    tag: str | None = None,
    evaluated_on: str | None = None,
) -> str:
    """The study's section of ``docs/results.md`` (``evaluated_on``: the machine of the evaluation, default this
    one's CPU)."""
    training = ", ".join(
        f"{v.label} {records[v.key]['seconds'] / 60:.1f} min, {records[v.key].get('iterations')} iterations"
        for v in variants
    )
    # records of runs trained before the machine was kept: unknown
    machines = sorted({records[v.key].get("trained_on", "an unrecorded machine") for v in variants})
    n_test = len({row["subject"] for row in rows[variants[0].key]})
    return "\n\n".join(
        [
            "## Pseudo-CT study"
            + (f" ({tag})" if tag else "")
            + (": which setting makes the aligned pass a CT?" if budget == 1 else f" at {budget}x the CPU budget"),
            "The Table 3 analogue (phantom T1 <-> CT, MR positioning pad against CT head holder) trained once per "
            "variant with the same data, seed and budget, every variant evaluated on the undeformed pass that "
            f"inference serves (`configs/evaluate.json`: {n_test} held-out subjects, metrics inside the head mask). "
            "Produced by:",
            f"```bash\n{command}\n```",
            f"Budget: {budget_text}. Wall time: training {timings['training'] / 60:.1f} min ({training}) on "
            f"{' and '.join(machines)} (runs may share it: then each takes longer); evaluation and registration "
            f"{timings['evaluation'] / 60:.1f} min on {evaluated_on or hardware('cpu')}.",
            "Variants beyond the paper are opt-in switches of `configs/train.json` (README, *Beyond the paper*): "
            "`offsets: shared` (one displacement per location used by every tap of a deformable convolution, so the "
            "deformed pass is a warp of the aligned pass and the adversarial loss trains the aligned pass's "
            "content), `lambda_gan_aligned` (the discriminators also judge the aligned pass) and `lambda_paired` "
            "with a `training_pairs` list (L1 between the deformed output and the same subject's CT), `offsets: "
            "field` (plain convolutions; the deformed pass is the aligned output warped by one smooth displacement "
            "field of 8 x 8 control points, bicubic) and `d_layers: 4` (a PatchGAN of 142 px receptive field instead "
            "of 70 px). Misaligned "
            f"pairs: each training CT distorted by a smooth field of its own (10 mm peak, 40 mm control points; "
            f"{pairs_mean_mm:.2f} mm mean over the head) on top of the differing beds; the control trains on pairs "
            "that overlay.",
            study_table(rows, variants),
            "\n".join(["Targets (T1 to CT, undeformed pass):", "", *target_lines(rows, variants)]),
            "What each alignment term rewards (`scripts/alignment_terms.py` on the same test subjects: the term "
            "between each T1 and the candidate; a term worth training prefers the true CT):",
            terms_table,
            f"![Pseudo-CT study]({figure})",
        ]
    )


def study(
    output_dir: str = "study_pct",
    variants: str | Sequence[str] = tuple(VARIANTS),
    dataset_dir: str | None = None,
    seed: int = 0,
    budget: int = 1,
    publish_dir: str | None = None,
    preset: str = "cpu",
    concurrent: int = 1,
    tag: str | None = None,
    device: str | None = None,
    time_limit_s: float | None = None,
    evaluate: bool = True,
) -> dict[str, Any]:
    """Train every variant on the phantom's T1 <-> CT, evaluate the undeformed pass, write ``pseudo_ct.md``.

    Args:
        output_dir: where the data, runs, metrics, figure and ``pseudo_ct.md`` go.
        variants: keys of :data:`VARIANTS` (comma-separated or a list).
        dataset_dir: an existing phantom folder (the cpu preset's) instead of building ``OUTPUT_DIR/data``.
        seed: seed of the data set and of every training run.
        budget: train ``budget`` times the preset's epochs.
        publish_dir: also put the section into ``PUBLISH_DIR/results.md`` and copy the figure there.
        preset: ``"cpu"``, or ``"smoke"`` (tests only: says nothing about the method).
        concurrent: runs trained side by side, each in its own process (its output in ``runs/<run>/train.log``).
        tag: names a results section and figure of this study's own (letters, digits, ``_``), so that publishing
            other variants keeps the sections published before.
        device: where the runs train and are evaluated (e.g. ``"cuda"``; None: the config's, CUDA when present).
        time_limit_s: each run stops after this many seconds of training, saving its models (None: its epochs);
            ``run.json`` records the iterations trained.
        evaluate: False: train the runs and stop (e.g. on a GPU machine without the registration's SimpleITK); the
            same command without it later evaluates the trained runs and writes the results.

    Returns:
        ``{"results": path of pseudo_ct.md, "rows": {variant: per-volume rows}}`` (with ``evaluate=False``:
        ``{"results": None, "records": {run: run.json}}``).

    Raises:
        ValueError: for an unknown variant or preset, a bad tag, or a budget below 1.
    """
    keys = as_list(variants)
    unknown = [key for key in keys if key not in VARIANTS]
    if unknown or not keys:
        raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}.")
    if preset not in ("cpu", "smoke"):
        raise ValueError(f"preset must be 'cpu' or 'smoke', got {preset!r}.")
    settings = on_device(select_preset(preset, budget), device, time_limit_s)
    check_concurrent(concurrent)
    chosen = [VARIANTS[key] for key in keys]
    if tag is not None and not re.fullmatch(r"[A-Za-z0-9_]+", str(tag)):
        raise ValueError(f"tag must be letters, digits and underscores, got {tag!r}.")
    # another tag or budget: its own figure and results.md section
    suffix = (f"_{tag}" if tag else "") + ("" if budget == 1 else f"_{budget}x")
    output = Path(output_dir).resolve()
    output.mkdir(parents=True, exist_ok=True)
    data_dir, data_s = prepare_data(output, settings, dataset_dir, seed)
    experiment = EXPERIMENTS["mr_ct"]
    pixdim = settings.pixdim()
    runs, pairs_mean_mm = [], 0.0
    for variant in chosen:
        training = experiment
        if variant.pairs_mm is not None:
            datalist, applied = pairs_datalist(data_dir, variant.pairs_mm, pixdim)
            pairs_mean_mm = max(pairs_mean_mm, applied)
            training = dataclasses.replace(experiment, datalist=datalist)
        method = "Cycle" if variant.cyclegan else "Dicycle"
        # evaluated on the unpaired test lists of datalist_mr_ct.json, whatever the training datalist
        runs.append(Run(f"mr_ct_{variant.key}", training, method, seed, variant.overrides, experiment, variant.key))
    if not as_bool(evaluate, "evaluate"):
        records = train_all(output, runs, settings, data_dir, concurrent)
        log(f"trained {len(records)} runs in {output / 'runs'}; not evaluated (--evaluate false)")
        return {"results": None, "records": records}
    trained = train_and_evaluate(output, runs, settings, data_dir, concurrent)
    rows = {run.metrics: [{**row, "method": run.metrics} for row in trained.rows[run.name]] for run in runs}
    start = time.perf_counter()
    figure = comparison_figure(
        output / "figures" / f"fig4_pseudo_ct{suffix}.png",
        experiment,
        {run.metrics: trained.parsers[run.name] for run in runs},
        labels={variant.key: variant.label for variant in chosen},
        title="Pseudo-CT study, T1 <-> CT, the undeformed pass",
    )
    timings = {"data": data_s, "training": trained.training_s}
    timings["evaluation"] = trained.evaluation_s + time.perf_counter() - start
    records = {run.metrics: trained.records[run.name] for run in runs}

    command = command_line(
        "scripts.pseudo_ct_study",
        {
            "output_dir": output_dir,
            "variants": ",".join(keys) if keys != list(VARIANTS) else None,
            "dataset_dir": dataset_dir or None,
            "seed": seed or None,
            "preset": preset if preset != "cpu" else None,
            "budget": budget if budget != 1 else None,
            "concurrent": concurrent if concurrent != 1 else None,
            "tag": tag,
            "device": device,
            "time_limit_s": time_limit_s,
        },
    )
    budget_text = f"`reproduce.py --preset {preset}` ({settings.description})" + (
        f", stretched {budget}x by `--budget`" if budget != 1 else ""
    )
    cyclegan = next((run for run in runs if run.method == "Cycle"), None)  # its synthesis is candidate (c)
    synthesize = alignment_terms.trained_synthesis(trained.parsers[cyclegan.name]) if cyclegan else None
    terms_table = alignment_terms.table(alignment_terms.measure(data_dir, pixdim, synthesize))
    figure_name = f"figures/fig4_pseudo_ct{suffix}.png"
    text = study_markdown(
        command,
        rows,
        chosen,
        records,
        pairs_mean_mm,
        figure_name,
        budget_text,
        timings,
        terms_table,
        budget,
        tag,
        hardware(settings.value("device")),
    )
    results = output / "pseudo_ct.md"
    results.write_text(text + "\n", encoding="utf-8")
    log(f"wrote {results}")
    print("\n".join(target_lines(rows, chosen)))
    if publish_dir:
        publish(publish_dir, text, [figure], section=SECTION + suffix.replace("_", "-"))
    return {"results": str(results), "rows": rows}


if __name__ == "__main__":
    fire.Fire(study, serialize=lambda result: result["results"] or "trained, not evaluated")
