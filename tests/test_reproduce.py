"""scripts/reproduce.py and the study library under it (scripts/tooling/study.py, report.py): the study pipeline
end to end on the smoke preset (tiny phantom, tiny networks).

The smoke preset checks the plumbing (data, two training runs, evaluation with residual displacement, the
distortion reference, figures, results.md, re-runs), not the method: its networks train for 8 iterations.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from scripts import reproduce
from scripts.tooling.study import EXPERIMENTS, METHODS, PRESETS, select_preset

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings("ignore")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
OTHER_SECTION = "<!-- other-study -->\n## Another study\n\nits table\n<!-- /other-study -->"


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, phantom: Path) -> dict:
    """The smoke study of the deformed experiment on the session's phantom (built once for every study test)."""
    output = tmp_path_factory.mktemp("study")
    # a published results file that already holds another study's section (pseudo_ct_study.py, dose_response.py)
    (output / "docs").mkdir()
    (output / "docs" / "results.md").write_text("# old results\n\n" + OTHER_SECTION + "\n", encoding="utf-8")
    result = reproduce.main(
        output_dir=str(output),
        preset="smoke",
        experiments="deformed",
        dataset_dir=str(phantom),
        publish_dir=str(output / "docs"),
        concurrent=2,  # CycleGAN and DicycleGAN side by side (each in its own process)
    )
    return {"output": output, "dataset_dir": phantom, **result}


def _csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def test_both_methods_are_trained_with_the_same_data_seed_and_budget(study: dict) -> None:
    commands = {
        method: json.loads((study["output"] / "runs" / f"deformed_{method}" / "run.json").read_text(encoding="utf-8"))[
            "command"
        ]
        for method in METHODS
    }
    assert "configs/cyclegan.json" in commands["Cycle"] and "configs/cyclegan.json" not in commands["Dicycle"]

    # apart from the CycleGAN override file and the run folders, the two commands are identical
    def normalise(command):
        return (
            command.replace(",'configs/cyclegan.json'", "")
            .replace("deformed_Cycle", "RUN")
            .replace("deformed_Dicycle", "RUN")
        )

    assert normalise(commands["Cycle"]) == normalise(commands["Dicycle"])
    for method in METHODS:
        models = study["output"] / "runs" / f"deformed_{method}" / "models"
        assert (models / "model.pt").is_file() and (models / "model_g_ba.pt").is_file()


def test_every_test_volume_is_measured_in_both_directions_with_its_displacement(study: dict) -> None:
    n_test = PRESETS["smoke"].data["n_test"]
    for name in ("deformed_Cycle", "deformed_Dicycle", "deformed_reference"):
        rows = _csv(study["output"] / "metrics" / f"{name}.csv")
        assert len(rows) == 2 * n_test
        assert {row["direction"] for row in rows} == {"A2B", "B2A"}
        for row in rows:
            assert row["masked"] == "True"
            assert float(row["displacement_mm"]) >= 0.0 and math.isfinite(float(row["PSNR"]))


def test_distortion_reference_measures_the_applied_distortion(study: dict) -> None:
    # the ground truth moved by the 10 mm (peak) distortion: clearly displaced, by less than its peak
    for row in _csv(study["output"] / "metrics" / "deformed_reference.csv"):
        assert 1.0 < float(row["displacement_mm"]) < 10.0
        assert "distorted" in row["source"] + row["ground_truth"]


def test_results_report_the_measured_means_beside_the_paper(study: dict) -> None:
    text = Path(study["results"]).read_text(encoding="utf-8")
    assert "## Table 2 analogue" in text and "Distortion only" in text
    assert "19.52 (1.62)" in text  # the paper's CycleGAN PD -> T2 PSNR of Table 2, in the paper column
    assert "python -m scripts.reproduce --output_dir" in text and "--preset smoke --experiments deformed" in text
    cycle = _csv(study["output"] / "metrics" / "deformed_Cycle.csv")
    mean = statistics.fmean(float(r["displacement_mm"]) for r in cycle if r["direction"] == "A2B")
    assert f"residual displacement CycleGAN {mean:.2f} mm" in text
    for figure in ("figures/fig4_deformed.png", "figures/training_curves.png"):
        assert f"]({figure})" in text
        assert (study["output"] / figure).read_bytes()[:8] == PNG_SIGNATURE
        assert (study["output"] / "docs" / figure).is_file()
    # published: this study's text replaces the old one, the other study's section stays
    assert (study["output"] / "docs" / "results.md").read_text(
        encoding="utf-8"
    ) == text.rstrip() + "\n\n" + OTHER_SECTION + "\n"


def test_a_repeated_command_reuses_finished_runs_and_resumes_an_interrupted_one(study: dict) -> None:
    output = study["output"]
    cycle_record = output / "runs" / "deformed_Cycle" / "run.json"
    before = (
        cycle_record.read_text(encoding="utf-8"),
        (output / "runs" / "deformed_Cycle" / "models" / "model.pt").stat().st_mtime,
    )
    interrupted = output / "runs" / "deformed_Dicycle" / "run.json"
    interrupted.unlink()  # as if training had stopped after its last checkpoint
    reproduce.main(
        output_dir=str(output), preset="smoke", experiments="deformed", dataset_dir=str(study["dataset_dir"])
    )
    assert (
        cycle_record.read_text(encoding="utf-8"),
        (output / "runs" / "deformed_Cycle" / "models" / "model.pt").stat().st_mtime,
    ) == before
    record = json.loads(interrupted.read_text(encoding="utf-8"))
    assert record["resumed"] is True and "--resume True" in record["command"]


def test_training_curves_read_the_logged_losses(study: dict) -> None:
    for method in METHODS:
        scalars = reproduce.read_scalars(study["output"] / "runs" / f"deformed_{method}" / "logs")
        for tag, _ in reproduce.CURVE_PANELS:
            if tag != "align" or method == "Dicycle":  # CycleGAN has no alignment term
                assert scalars.get(tag), f"no {tag!r} in the {method} run's TensorBoard logs"


def test_unknown_preset_or_experiment_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="preset must be one of"):
        reproduce.main(output_dir=str(tmp_path), preset="tpu")
    with pytest.raises(ValueError, match="unknown experiments"):
        reproduce.main(output_dir=str(tmp_path), experiments="table4")
    with pytest.raises(ValueError, match="concurrent must be a whole number"):
        reproduce.main(output_dir=str(tmp_path / "study"), concurrent=1.5)
    assert not (tmp_path / "study").exists()  # refused before any data is built


def test_headline_is_computed_from_the_rows() -> None:
    def row(direction: str, method: str, displacement: float, psnr: float) -> dict:
        return {
            "direction": direction,
            "experiment": "PD to T2",
            "method": method,
            "displacement_mm": displacement,
            "PSNR": psnr,
            "SSIM": 0.5,
        }

    rows = [
        row("A2B", "Cycle", 3.0, 20.0),
        row("A2B", "Cycle", 5.0, 22.0),
        row("A2B", "Dicycle", 0.5, 25.0),
        row("A2B", "Distortion only", 4.0, 18.0),
    ]
    (sentence,) = reproduce.headline({"deformed": rows})
    assert "CycleGAN 4.00 mm, DicycleGAN 0.50 mm (the distortion itself: 4.00 mm)" in sentence
    assert "PSNR 21.00 vs 25.00 dB" in sentence


def test_distortion_effect_is_table_2_minus_table_1() -> None:
    def row(method: str, displacement: float) -> dict:
        return {"direction": "A2B", "experiment": "PD to T2", "method": method, "displacement_mm": displacement}

    undeformed = [row("Cycle", 2.0), row("Dicycle", 1.0)]
    deformed = [row("Cycle", 4.5), row("Cycle", 3.5), row("Dicycle", 1.25), row("Distortion only", 3.0)]
    (sentence,) = reproduce.distortion_effect({"undeformed": undeformed, "deformed": deformed})
    assert "CycleGAN 2.00 -> 4.00 mm (+2.00 mm), DicycleGAN 1.00 -> 1.25 mm (+0.25 mm)" in sentence
    assert "the distortion itself displaces by 3.00 mm" in sentence
    assert reproduce.distortion_effect({"deformed": deformed}) == []


def test_ct_tables_add_mae_and_bone_dice() -> None:
    def row(direction: str, method: str, mae: float, dice: float) -> dict:
        experiment = "T1 to CT" if direction == "A2B" else "CT to T1"
        metrics = {"MSE": 0.1, "PSNR": 10.0, "SSIM": 0.5, "displacement_mm": 1.0, "displacement_p95_mm": 2.0}
        return {
            "direction": direction,
            "experiment": experiment,
            "method": method,
            "MAE_HU": mae,
            "bone_dice": dice,
            **metrics,
        }

    nan = float("nan")
    rows = [row("A2B", "Cycle", 100.0, 0.2), row("A2B", "Cycle", 200.0, 0.4), row("A2B", "Dicycle", 50.0, 0.9)]
    rows += [row("B2A", "Cycle", nan, nan), row("B2A", "Dicycle", nan, nan)]
    table = reproduce.experiment_table(EXPERIMENTS["mr_ct"], rows).splitlines()
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header[5:7] == ["MAE (HU)", "Bone Dice"]
    assert [cell.strip() for cell in table[2].strip("|").split("|")][5:7] == ["150.0 (70.7)", "0.300 (0.141)"]
    assert [cell.strip() for cell in table[4].strip("|").split("|")][5:7] == ["-", "-"]  # MR target
    t1_to_ct, ct_to_t1 = reproduce.headline({"mr_ct": rows})
    assert "MAE 150 vs 50 HU, bone Dice 0.300 vs 0.900" in t1_to_ct
    assert "bone Dice" not in ct_to_t1
    mr_only = reproduce.experiment_table(EXPERIMENTS["deformed"], rows[3:])
    assert "Bone Dice" not in mr_only and "MAE" not in mr_only


def test_budget_stretches_the_presets_epochs_and_leaves_budget_1_alone(tmp_path: Path) -> None:
    assert select_preset("cpu", 1) == PRESETS["cpu"]  # the preset's own commands and runs stay valid
    assert select_preset("cpu", 3).overrides == {"n_epochs": 15, "n_epochs_decay": 15}
    smoke = select_preset("smoke", 2).overrides
    assert smoke == {**PRESETS["smoke"].overrides, "n_epochs": 2, "n_epochs_decay": 2}
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="budget must be a whole number"):
            reproduce.main(output_dir=str(tmp_path), budget=bad)


def test_results_are_written_as_utf8_under_an_ascii_locale(tmp_path: Path) -> None:
    # CI's locale is ASCII: the dose-response study's "9 ± 34 %" could not be written there (UnicodeEncodeError)
    path = tmp_path / "results.md"
    script = (
        "import locale; from pathlib import Path; from scripts.tooling.report import publish_section; "
        "encoding = locale.getpreferredencoding(False); "
        "assert encoding.lower() in ('ascii', 'ansi_x3.4-1968'), encoding; "
        f"path = Path({str(path)!r}); "
        "publish_section(path, 'study', 'copies 9 \\u00b1 34 %'); "
        "publish_section(path, 'study', 'copies 2 \\u00b1 3 % \\u2192 1 \\u00b1 1 %')"
    )
    env = {**os.environ, "PYTHONUTF8": "0", "LC_ALL": "C", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert (
        path.read_bytes().decode("utf-8")
        == "<!-- study -->\ncopies 2 \u00b1 3 % \u2192 1 \u00b1 1 %\n<!-- /study -->\n"
    )
