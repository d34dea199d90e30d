"""scripts/dose_response.py: the analytic applied field, the copy-fraction statistics, the instrument check and the
study pipeline end to end at a tiny size (smoke preset: tiny phantom and networks, 2 levels, 1 seed).

The tiny pipeline checks the plumbing, not the method; the statistics are checked against numpy.polyfit and
Student's t by hand, the field against the distortion's own voxel displacements.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle.transforms import DomainDistortion
from monai.data import MetaTensor
from scipy import stats
from scripts import dose_response
from scripts.tooling.study import METHODS, PRESETS

pytestmark = pytest.mark.filterwarnings("ignore")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


# ------------------------------------------------------------------------------------------------- statistics


def test_copy_fraction_is_the_ols_slope_with_a_student_t_interval() -> None:
    rng = np.random.default_rng(3)
    x = np.array([0.0, 1.6, 3.2, 3.2, 3.2, 6.4])  # four levels, three replicates at the third
    y = 1.2 + 0.4 * x + rng.normal(0.0, 0.1, x.size)
    fit = dose_response.copy_fraction(x, y)
    (slope, intercept), cov = np.polyfit(x, y, 1, cov=True)
    assert fit["slope"] == pytest.approx(slope, rel=1e-12) and fit["intercept"] == pytest.approx(intercept, rel=1e-12)
    assert fit["se"] == pytest.approx(math.sqrt(cov[0, 0]), rel=1e-9)
    # by hand: t(0.975, 4 degrees of freedom) = 2.7764 (statistical tables)
    sxx = ((x - x.mean()) ** 2).sum()
    se = math.sqrt(((y - intercept - slope * x) ** 2).sum() / (x.size - 2) / sxx)
    assert fit["ci_low"] == pytest.approx(slope - 2.7764451 * se, rel=1e-6)
    assert fit["ci_high"] == pytest.approx(slope + 2.7764451 * se, rel=1e-6)
    assert fit["n"] == 6


def test_copy_fraction_edge_cases() -> None:
    exact = dose_response.copy_fraction([0.0, 1.0, 2.0], [0.5, 1.0, 1.5])
    assert exact["slope"] == pytest.approx(0.5) and exact["se"] == pytest.approx(0.0, abs=1e-12)
    two = dose_response.copy_fraction([0.0, 2.0], [1.0, 2.0])
    assert two["slope"] == pytest.approx(0.5) and math.isnan(two["ci_low"]) and math.isnan(two["se"])
    with pytest.raises(ValueError, match="two different values"):
        dose_response.copy_fraction([1.0, 1.0, 1.0], [0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="one length"):
        dose_response.copy_fraction([0.0, 1.0], [0.0])


def test_copy_fractions_use_one_point_per_run() -> None:
    rows = []
    for level, seed, residual in ((0.0, 0, 1.0), (10.0, 0, 2.0), (10.0, 1, 2.4), (20.0, 0, 3.1)):
        for value in (residual - 0.1, residual + 0.1):  # two volumes per run average to ``residual``
            rows.append(
                {"method": "Cycle", "direction": "A2B", "level_mm": level, "seed": seed, "displacement_mm": value}
            )
    applied = {(0.0, "A2B"): 0.0, (10.0, "A2B"): 3.0, (20.0, "A2B"): 6.0}
    fit = dose_response.copy_fractions(rows, applied)["Cycle", "A2B"]
    slope, intercept = np.polyfit([0.0, 3.0, 3.0, 6.0], [1.0, 2.0, 2.4, 3.1], 1)
    assert fit["n"] == 4 and fit["slope"] == pytest.approx(slope) and fit["intercept"] == pytest.approx(intercept)
    # a failed registration (NaN) leaves its volume out; a direction with one measured level has no slope
    failed = {"method": "Cycle", "direction": "A2B", "level_mm": 20.0, "seed": 0, "displacement_mm": float("nan")}
    assert dose_response.copy_fractions([*rows, failed], applied)["Cycle", "A2B"]["slope"] == pytest.approx(slope)
    single = [{**row, "direction": "B2A"} for row in rows if row["level_mm"] == 0.0]
    assert math.isnan(dose_response.copy_fractions(single, {(0.0, "B2A"): 0.0})["Cycle", "B2A"]["slope"])
    # a method whose registrations all failed in one direction still has its (NaN) fit, beside the others
    unmeasured = [{**row, "method": "Dicycle", "direction": "B2A", "displacement_mm": float("nan")} for row in rows]
    fits = dose_response.copy_fractions(
        [*rows, *unmeasured], {**applied, **{(lv, "B2A"): a for (lv, _), a in applied.items()}}
    )
    assert math.isnan(fits["Dicycle", "B2A"]["slope"]) and fits["Dicycle", "B2A"]["n"] == 0
    assert fits["Cycle", "A2B"]["slope"] == pytest.approx(slope)


def test_copy_fraction_within_seeds_matches_least_squares_with_one_intercept_per_seed() -> None:
    x = np.array([0.0, 2.8, 5.5, 11.0, 0.0, 5.5, 11.0, 0.0, 5.5, 11.0])
    seeds = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    y = np.array([3.0, 1.7, 2.6, 3.6, 1.8, 4.0, 1.6, 2.0, 1.7, 1.9])
    fit = dose_response.copy_fraction(x, y, groups=seeds)
    # reference: the design matrix [x, one column per seed] solved by least squares
    design = np.column_stack([x, *[(np.asarray(seeds) == s).astype(float) for s in (0, 1, 2)]])
    coefficients, sse, *_ = np.linalg.lstsq(design, y, rcond=None)
    dof = len(x) - design.shape[1]
    se = math.sqrt(sse[0] / dof * np.linalg.inv(design.T @ design)[0, 0])
    assert fit["slope"] == pytest.approx(coefficients[0]) and fit["se"] == pytest.approx(se)
    assert fit["ci_high"] - fit["slope"] == pytest.approx(stats.t.ppf(0.975, dof) * se)
    assert fit["intercept"] == pytest.approx(y.mean() - coefficients[0] * x.mean()) and fit["n"] == 10
    # one group is the plain line
    assert dose_response.copy_fraction(x, y, groups=[7] * 10) == pytest.approx(dose_response.copy_fraction(x, y))
    with pytest.raises(ValueError, match="within a group"):
        dose_response.copy_fraction([0.0, 5.0, 11.0], [1.0, 2.0, 3.0], groups=[0, 1, 2])
    with pytest.raises(ValueError, match="one length"):
        dose_response.copy_fraction([0.0, 5.0, 11.0], [1.0, 2.0, 3.0], groups=[0, 1])


def test_copy_fractions_within_seeds_remove_the_offset_between_seeds() -> None:
    # every seed copies 20 % exactly, from its own offset; seed 1 has no run at 5 mm
    offsets, applied = {0: 3.0, 1: 1.5}, {(0.0, "A2B"): 0.0, (5.0, "A2B"): 2.8, (20.0, "A2B"): 11.0}
    rows = [
        {"method": "Cycle", "direction": "A2B", "level_mm": level, "seed": seed, "displacement_mm": offset + 0.2 * x}
        for seed, offset in offsets.items()
        for (level, _), x in applied.items()
        if (seed, level) != (1, 5.0)
    ]
    within = dose_response.copy_fractions(rows, applied, within_seeds=True)["Cycle", "A2B"]
    pooled = dose_response.copy_fractions(rows, applied)["Cycle", "A2B"]
    assert within["slope"] == pytest.approx(0.2) and within["se"] == pytest.approx(0.0, abs=1e-9)
    assert pooled["slope"] != pytest.approx(0.2, abs=0.01) and pooled["se"] > 0.01
    key, labels = ("Cycle", "A2B"), {"A2B": "PD to T2"}
    table = dose_response.copy_fraction_table({key: pooled}, labels, {key: within})
    assert table.splitlines()[0].endswith("| runs | slope within seeds | 95 % CI |")
    assert table.splitlines()[2].endswith(f"| 5 | 0.200 | {within['ci_low']:.3f} to {within['ci_high']:.3f} |")


def test_seed_spread_is_each_seeds_two_point_slope_from_the_undistorted_run() -> None:
    rows = [
        {"method": "Cycle", "direction": "A2B", "level_mm": level, "seed": seed, "displacement_mm": value}
        for level, seed, value in ((0.0, 0, 1.0), (10.0, 0, 2.0), (10.0, 1, 2.6), (10.0, 2, 1.7), (20.0, 0, 3.0))
    ]
    applied = {(0.0, "A2B"): 0.5, (10.0, "A2B"): 3.5, (20.0, "A2B"): 6.5}
    spread = dose_response.seed_spread(rows, applied, [10.0], (0.0, 0))
    assert list(spread) == [("Cycle", "A2B", 10.0)]
    assert spread["Cycle", "A2B", 10.0]["residual"] == {0: 2.0, 1: 2.6, 2: 1.7}
    assert spread["Cycle", "A2B", 10.0]["copy"] == pytest.approx({0: 1.0 / 3.0, 1: 1.6 / 3.0, 2: 0.7 / 3.0})
    table = dose_response.seed_table(spread, {"A2B": "PD to T2"})
    copies = [1.0 / 3.0, 1.6 / 3.0, 0.7 / 3.0]
    assert f"| PD to T2 | 10 | Cycle | 2.00, 2.60, 1.70 | 2.10 ({statistics.stdev([2.0, 2.6, 1.7]):.2f}) |" in table
    assert f"{statistics.fmean(copies):.3f} ({statistics.stdev(copies):.3f}) |" in table
    # no undistorted run of that method and direction: no entry (nothing to take a slope from)
    assert dose_response.seed_spread([r for r in rows if r["level_mm"] != 0.0], applied, [10.0], (0.0, 0)) == {}


def test_seeds_replicated_at_the_undistorted_level_take_their_slope_from_their_own_baseline() -> None:
    rows = [
        {"method": "Cycle", "direction": "A2B", "level_mm": level, "seed": seed, "displacement_mm": value}
        for level, seed, value in ((0.0, 0, 1.0), (0.0, 1, 1.6), (20.0, 0, 3.0), (20.0, 1, 2.2), (20.0, 2, 4.0))
    ]
    applied = {(0.0, "A2B"): 0.5, (20.0, "A2B"): 6.5}
    spread = dose_response.seed_spread(rows, applied, [0.0, 20.0], (0.0, 0))
    assert spread["Cycle", "A2B", 0.0] == {"residual": {0: 1.0, 1: 1.6}, "copy": {0: None, 1: None}}
    # seed 1 from its own undistorted run; seed 2 has none: from the first seed's
    assert spread["Cycle", "A2B", 20.0]["copy"] == pytest.approx({0: 2.0 / 6.0, 1: 0.6 / 6.0, 2: 3.0 / 6.0})
    table = dose_response.seed_table(spread, {"A2B": "PD to T2"}).splitlines()
    assert table[2] == f"| PD to T2 | 0 | Cycle | 1.00, 1.60 | 1.30 ({statistics.stdev([1.0, 1.6]):.2f}) | - | - |"
    assert table[3].startswith("| PD to T2 | 20 | Cycle | 3.00, 2.20, 4.00 |")


def test_copy_fraction_reads_as_percent_plus_minus_the_ci_half_width() -> None:
    fit = dose_response.copy_fraction([0.0, 1.0, 2.0, 3.0], [0.1, 0.5, 0.7, 1.3])
    half = 100.0 * (fit["ci_high"] - fit["slope"])
    assert dose_response._percent(fit) == f"{100.0 * fit['slope']:.0f} ± {half:.0f} %"
    assert dose_response._percent(dose_response.copy_fraction([0.0, 2.0], [1.0, 2.0])) == "50 %"
    # a slope just below zero reads "0", not "-0"
    assert dose_response._percent(dose_response.copy_fraction([0.0, 5.0, 11.0], [2.0, 2.05, 1.96])).startswith("0 ± ")


def test_planned_runs_replicate_only_the_replicate_levels() -> None:
    runs = dose_response.planned_runs([0.0, 5.0, 10.0, 20.0], [0, 1, 2], [10.0])
    assert len(runs) == 12 and len({run.name for run in runs}) == 12
    assert sorted({run.seed for run in runs if run.level_mm == 10.0}) == [0, 1, 2]
    assert {run.seed for run in runs if run.level_mm != 10.0} == {0}
    wider = dose_response.planned_runs([0.0, 5.0, 10.0, 20.0], [0, 1, 2], [0.0, 10.0, 20.0])
    assert len(wider) == 20 and {run.name for run in runs} < {run.name for run in wider}
    assert {run.seed for run in wider if run.level_mm == 5.0} == {0}


# ------------------------------------------------------------------------------------------ the applied field


def _grid(shape: tuple[int, int, int], affine: np.ndarray) -> MetaTensor:
    return MetaTensor(torch.zeros(1, *shape), affine=torch.as_tensor(affine))


def test_applied_displacement_is_the_distortion_on_any_grid_of_the_volume() -> None:
    distortion = DomainDistortion(12.0, 64.0, seed=2)
    shape = (40, 36, 30)
    affine = np.diag([2.0, 2.0, 2.5, 1.0])
    affine[:3, 3] = [-41.0, -30.0, -20.0]
    expected = np.linalg.norm(
        distortion.displacement_voxels(shape, affine) * np.array([2.0, 2.0, 2.5])[:, None, None, None], axis=0
    )
    same = dose_response.applied_displacement(distortion, shape, affine, _grid(shape, affine))
    np.testing.assert_allclose(same, expected, rtol=1e-4, atol=1e-4)
    # a coarser grid over the same volume (every second voxel), as the evaluation's resampling gives
    coarse = affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    mask = np.zeros((20, 18, 15), dtype=bool)
    mask[4:16, 3:15, 2:12] = True
    sub = dose_response.applied_displacement(distortion, shape, affine, _grid((20, 18, 15), coarse), mask)
    np.testing.assert_allclose(sub[mask], expected[::2, ::2, ::2][mask], rtol=1e-4, atol=1e-4)
    assert np.isnan(sub[~mask]).all()


def test_inverse_displacement_undoes_the_distortion() -> None:
    distortion = DomainDistortion(10.0, 64.0, seed=1)
    shape = (24, 24, 20)
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    grid = _grid(shape, affine)
    points = dose_response._grid_frame_points(distortion, shape, affine, grid).reshape(-1, 3)
    inverse = dose_response.inverse_displacement(distortion, shape, affine, grid).reshape(-1)
    forward = dose_response.applied_displacement(distortion, shape, affine, grid).reshape(-1)
    # v(x) = -u(x + v(x)): iterate once more from the converged lengths' field and check the fixed point
    v = np.zeros_like(points)
    for _ in range(40):
        v = -dose_response.field_at_points(distortion.field, points + v)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), inverse, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(v + dose_response.field_at_points(distortion.field, points + v), 0.0, atol=1e-6)
    # a smooth field: the inverse's mean length is close to, not equal to, the forward's
    assert inverse.mean() == pytest.approx(forward.mean(), rel=0.1) and not np.allclose(inverse, forward)


# --------------------------------------------------------------------------------------- tiny data, end to end


def test_instrument_recovers_the_applied_displacement_at_a_tiny_size(phantom: Path, tmp_path: Path, capsys) -> None:
    result = dose_response.instrument(
        output_dir=str(tmp_path), preset="smoke", levels="0,10", dataset_dir=str(phantom), tolerance=0.5
    )
    n_test = PRESETS["smoke"].data["n_test"]
    assert len(result["rows"]) == 2 * 2 * n_test
    for row in result["rows"]:
        if row["level_mm"] == 0.0:
            assert row["applied_mm"] == 0.0 and row["recovered_mm"] < 0.5  # the floor, at 4.8 mm voxels
        else:
            assert row["applied_mm"] > 1.0
            assert row["recovered_mm"] == pytest.approx(row["applied_mm"], rel=0.5)  # 4.8 mm voxels: coarse
    assert result["passed"] and "instrument check PASSED" in capsys.readouterr().out
    assert json.loads((tmp_path / "instrument.json").read_text(encoding="utf-8")) == {
        "passed": True,
        "tolerance": 0.5,
        "levels": [0.0, 10.0],
    }
    table = (tmp_path / "instrument.md").read_text(encoding="utf-8")
    assert "| 10 | PD to T2 |" in table and "floor" in table
    saved = _csv(tmp_path / "metrics" / "instrument.csv")
    assert len(saved) == len(result["rows"])
    assert [float(r["recovered_mm"]) for r in saved] == pytest.approx([r["recovered_mm"] for r in result["rows"]])


def test_study_dry_run_plans_and_estimates(tmp_path: Path, capsys) -> None:
    result = dose_response.study(output_dir=str(tmp_path), budget=2, dry_run=True)
    out = capsys.readouterr().out
    assert len(result["runs"]) == 12 and "12 runs planned (12 left to train)" in out
    expected_min = round((12 * dose_response.DEFAULT_TRAIN_S * 2 + 12 * dose_response.DEFAULT_EVALUATE_S) / 60)
    assert f"estimated wall time: {expected_min} min" in out
    assert not (tmp_path / "runs").exists()
    with pytest.raises(RuntimeError, match="instrument check has not passed"):
        dose_response.study(output_dir=str(tmp_path))
    (tmp_path / "instrument.json").write_text(
        json.dumps({"passed": False, "levels": [0.0, 5.0, 10.0, 20.0]}), encoding="utf-8"
    )
    with pytest.raises(RuntimeError, match="instrument check has not passed"):
        dose_response.study(output_dir=str(tmp_path))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()
    with pytest.raises(ValueError, match="replicate_levels_mm"):
        dose_response.study(output_dir=str(tmp_path), levels="0,5", dry_run=True)
    with pytest.raises(ValueError, match="replicate_levels_mm"):
        dose_response.study(output_dir=str(tmp_path), replicate_levels_mm="10,15", dry_run=True)
    with pytest.raises(ValueError, match="budget"):
        dose_response.study(output_dir=str(tmp_path), budget=0, dry_run=True)
    with pytest.raises(ValueError, match="methods must be some of"):
        dose_response.study(output_dir=str(tmp_path), methods="Cycle,UNet", dry_run=True)
    one = dose_response.study(
        output_dir=str(tmp_path), methods="Cycle", levels="0,20", replicate_levels_mm=20.0, dry_run=True
    )
    assert [run.name for run in one["runs"]] == [
        "0mm_seed0_Cycle",
        "20mm_seed0_Cycle",
        "20mm_seed1_Cycle",
        "20mm_seed2_Cycle",
    ]


def test_check_instrument_measures_it_first_and_trains_only_if_it_passed(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def failing_instrument(output_dir, preset, levels, dataset_dir):
        calls.append((output_dir, preset, levels, dataset_dir))
        Path(output_dir, "instrument.json").write_text(json.dumps({"passed": False, "levels": levels}), "utf-8")

    monkeypatch.setattr(dose_response, "instrument", failing_instrument)
    with pytest.raises(RuntimeError, match="instrument check has not passed"):
        dose_response.study(output_dir=str(tmp_path), levels="0,20", replicate_levels_mm=20, check_instrument=True)
    assert calls == [(str(tmp_path), "cpu", [0.0, 20.0], None)]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()
    (tmp_path / "instrument.json").write_text(json.dumps({"passed": True, "levels": [0.0, 20.0]}), "utf-8")

    def data_reached(*args, **kwargs):
        raise LookupError("past the instrument check")

    monkeypatch.setattr(dose_response, "prepare_data", data_reached)
    with pytest.raises(LookupError, match="past the instrument check"):  # passed before: not measured again
        dose_response.study(output_dir=str(tmp_path), levels="0,20", replicate_levels_mm=20, check_instrument=True)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="concurrent must be a whole number"):
        dose_response.study(output_dir=str(tmp_path), concurrent=0, dry_run=True)


def test_study_pipeline_end_to_end_at_a_tiny_size(phantom: Path, tmp_path: Path) -> None:
    kwargs = {
        "output_dir": str(tmp_path),
        "preset": "smoke",
        "levels": "0,10",
        "seeds": "0",
        "dataset_dir": str(phantom),
        # the GPU study's command on the CPU: two runs side by side, each stopped by the wall-clock limit
        "device": "cpu",
        "concurrent": 2,
        "time_limit_s": 0.001,
    }
    result = dose_response.study(replicate_levels_mm=10.0, skip_instrument_check=True, **kwargs)
    runs = [f"{level}mm_seed0_{method}" for level in (0, 10) for method in METHODS]
    for name in runs:
        assert (tmp_path / "runs" / name / "models" / "model.pt").is_file()
        assert "training stops" in (tmp_path / "runs" / name / "train.log").read_text(encoding="utf-8")
        record = json.loads((tmp_path / "runs" / name / "run.json").read_text(encoding="utf-8"))
        assert record["iterations"] == 1  # the first iteration crosses the limit; the smoke preset has 8
        assert "--device $torch.device('cpu')" in record["command"] and "--time_limit_s 0.001" in record["command"]
    # the copy fraction from the per-volume CSVs by hand: two levels, so the slope through the two run means
    applied = {}
    for level in (0.0, 10.0):
        by_subject = dose_response.applied_means(phantom, f"datalist_dose_{level:g}mm.json", [4.8, 4.8, 4.8])
        for direction in ("A2B", "B2A"):
            applied[level, direction] = statistics.fmean(v for (_, d), v in by_subject.items() if d == direction)
    assert applied[0.0, "A2B"] == 0.0 and applied[10.0, "A2B"] > 1.0
    for method in METHODS:
        for direction in ("A2B", "B2A"):
            # a registration of a tiny network's synthesis may fail (NaN): such volumes are left out
            means = []
            for level in (0, 10):
                values = [
                    float(r["displacement_mm"] or "nan")
                    for r in _csv(tmp_path / "metrics" / f"{level}mm_seed0_{method}.csv")
                    if r["direction"] == direction and math.isfinite(float(r["displacement_mm"] or "nan"))
                ]
                means.append(statistics.fmean(values) if values else math.nan)
            fit = result["fits"][method, direction]
            if all(math.isfinite(m) for m in means):
                slope = (means[1] - means[0]) / (applied[10.0, direction] - applied[0.0, direction])
                assert fit["slope"] == pytest.approx(slope) and fit["n"] == 2
            else:
                assert math.isnan(fit["slope"])
    text = Path(result["results"]).read_text(encoding="utf-8")
    assert "## Copy fraction" in text and "## Table 2 at every level" in text and "**Headline**" in text
    assert "| 10 |" in text and "| 0 |" in text
    assert all(
        f"| {name} | " in text and text.split(f"| {name} | ")[1].split("\n")[0].endswith("| 1 |") for name in runs
    )
    assert "CPU cores, 2 runs at a time" in text
    for figure in ("dose_response.png", "fig4_10mm.png"):
        assert (tmp_path / "figures" / figure).read_bytes()[:8] == PNG_SIGNATURE
    # a second call trains nothing and measures nothing again
    stamps = {name: (tmp_path / "runs" / name / "run.json").stat().st_mtime for name in runs}
    records = {name: json.loads((tmp_path / "runs" / name / "run.json").read_text(encoding="utf-8")) for name in runs}
    # published: only the study's own section of results.md is replaced, the figures are copied beside it
    docs = tmp_path / "docs"
    docs.mkdir()
    other = "<!-- pseudo-ct-study -->\nother study\n<!-- /pseudo-ct-study -->"
    (docs / "results.md").write_text(
        f"# Results\n\n<!-- dose-response-study -->\nold\n<!-- /dose-response-study -->\n\n{other}\n", encoding="utf-8"
    )
    again = dose_response.study(replicate_levels_mm=10.0, skip_instrument_check=True, publish_dir=str(docs), **kwargs)
    published = (docs / "results.md").read_text(encoding="utf-8")
    assert "\nold\n" not in published and other in published and published.startswith("# Results")
    assert "## Copy fraction" in published and "## Dose-response study: how much" in published
    assert "### Spread between seeds" not in published  # one seed: no spread to show
    # the published command reproduces the call: every flag that is not the default is named
    assert (
        "python -m scripts.dose_response study --output_dir" in published
        and "--levels 0,10 --seeds 0 --preset smoke" in published
        and "--device cpu --concurrent 2 --time_limit_s 0.001" in published
    )
    for figure in ("dose_response.png", "fig4_10mm.png"):
        assert (docs / "figures" / figure).read_bytes() == (tmp_path / "figures" / figure).read_bytes()
    assert stamps == {name: (tmp_path / "runs" / name / "run.json").stat().st_mtime for name in runs}
    assert records == {
        name: json.loads((tmp_path / "runs" / name / "run.json").read_text(encoding="utf-8")) for name in runs
    }
    for key, fit in result["fits"].items():
        assert again["fits"][key]["slope"] == pytest.approx(fit["slope"], rel=1e-12, nan_ok=True)
