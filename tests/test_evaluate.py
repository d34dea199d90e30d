"""configs/evaluate.json (bundle.pairing, bundle.metrics, bundle.reports): paired metrics per volume, masks, the
paper's tables, figures.

The command runs on tiny NIfTI volumes with tiny generators whose last convolution is zeroed and biased, so the
synthesis is a known constant and every metric has a reference computed here by hand (numpy, from the files).
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle.data import volume_preprocessing
from bundle.inference import AxialSliceInferer
from bundle.metrics import BoneDiceMetric, metric_handlers, volume_metrics, windowed_ssim
from bundle.networks import DicycleGenerator
from bundle.pairing import paired_cases, paired_loader, parse_directions
from bundle.reports import CSV_COLUMNS, CaseFigures, VolumeMetricsSaver, read_csv, summary_markdown, write_results
from monai.bundle import run as bundle_run
from monai.engines import SupervisedEvaluator
from monai.handlers import CheckpointLoader
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (24, 20, 10)  # X != Y: a transposed slice cannot go unnoticed
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])  # RAS, 2 mm: preprocessing with pixdim 2 keeps the grid
CONSTANT = {"A2B": 0.3, "B2A": -0.2}  # the synthesis of each direction's generator, on the network's scale
HU_WINDOW = (-1000.0, 2000.0)
TINY = ["--ngf", "4", "--n_blocks", "1", "--pixdim", "[2.0,2.0,2.0]", "--sw_batch_size", "4", "--device", "cpu"]
SUBJECTS = ("sub00", "sub01", "sub02")
pytestmark = pytest.mark.filterwarnings("ignore:parsing config_file")
MASKED = ("sub00", "sub01")


# ----------------------------------------------------------------------------------------------------- helpers


def _ellipsoid(rng: np.random.Generator, inside: float, rim: float, background: float) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij"))
    radius = np.sqrt(((grid / rng.uniform(0.7, 0.9, size=3)[:, None, None, None]) ** 2).sum(axis=0))
    image = np.where(radius < 1.0, rim, background) + np.where(radius < 0.6, inside - rim, 0.0)
    return (image + rng.normal(0.0, 5.0, size=SHAPE)).astype(np.float32)


def _save(array: np.ndarray, path: Path, affine: np.ndarray = AFFINE) -> str:
    nib.save(nib.Nifti1Image(array, affine), path)
    return path.name


def _box_mask(offset: int) -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[8 + offset : 16 + offset, 6:14, 3:8] = 1
    return mask


def write_dataset(root: Path, kind_b: str = "MR") -> Path:
    """Three paired subjects (PD and T2, or MR and CT in HU), masks for two of them, and ``datalist.json``."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    name_a, name_b = ("PD", "T2") if kind_b == "MR" else ("MR", "CT")
    test = []
    for index, subject in enumerate(SUBJECTS):
        a = np.abs(_ellipsoid(rng, 150.0, 300.0, 0.0))
        if kind_b == "MR":
            b = np.abs(_ellipsoid(rng, 300.0, 100.0, 0.0))
        else:
            b = _ellipsoid(rng, 40.0, 800.0, -1000.0)
            b[12, 10, 3:6] = 3000.0  # beyond the HU window: clipped by the preprocessing
        entry = {
            "A": _save(a, root / f"{subject}-{name_a}.nii.gz"),
            "B": _save(b, root / f"{subject}-{name_b}.nii.gz"),
            "subject": subject,
        }
        if subject in MASKED:
            entry["mask"] = _save(_box_mask(index), root / f"{subject}-mask.nii.gz")
        test.append(entry)
    datalist = {"domains": {"A": name_a, "B": name_b}, "test": test}
    (root / "datalist.json").write_text(json.dumps(datalist, indent=2), encoding="utf-8")
    return root


def write_constant_generators(ckpt_dir: Path) -> Path:
    """``model.pt`` and ``model_g_ba.pt`` of DicycleGenerator(ngf=4, n_blocks=1) whose output is ``CONSTANT``:
    the last convolution's weights are zero and its bias is the constant (linear output for MR)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for direction, name in (("A2B", "model.pt"), ("B2A", "model_g_ba.pt")):
        generator = DicycleGenerator(ngf=4, n_blocks=1)
        last = [m for m in generator.modules() if isinstance(m, nn.Conv2d)][-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.fill_(CONSTANT[direction])
        torch.save(generator.state_dict(), ckpt_dir / name)
    return ckpt_dir


def run_evaluate(dataset: Path, output_dir: Path, ckpt_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run --config_file configs/evaluate.json`` with the tiny overrides."""
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "['configs/train.json','configs/evaluate.json']",
    ]
    command += ["--dataset_dir", str(dataset), "--output_dir", str(output_dir), "--ckpt_dir", str(ckpt_dir)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*command, *TINY, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def evaluate_in_process(dataset: Path, output_dir: Path, ckpt_dir: Path, **overrides: object) -> None:
    """The same run through ``monai.bundle.run`` in this process (no second interpreter start-up)."""
    tiny = {"ngf": 4, "n_blocks": 1, "pixdim": [2.0, 2.0, 2.0], "sw_batch_size": 4, "device": "cpu"}
    paths = {"dataset_dir": str(dataset), "output_dir": str(output_dir), "ckpt_dir": str(ckpt_dir)}
    bundle_run(
        config_file=[str(ROOT / "configs" / f) for f in ("train.json", "evaluate.json")], **paths, **tiny, **overrides
    )


def zscore_by_hand(path: Path) -> np.ndarray:
    """The paper's MR normalisation, by hand: z-score with the foreground (> 10% of the 99th percentile) statistics."""
    volume = nib.load(path).get_fdata().astype(np.float64)
    foreground = volume[volume > 0.1 * np.quantile(volume, 0.99)]
    return (volume - foreground.mean()) / foreground.std(ddof=1)


def metrics_by_hand(prediction: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """MSE, PSNR (target's max) and the paper's global SSIM (c = (k L)^2, L the target's range) of voxel arrays."""
    prediction, target = prediction.astype(np.float64).ravel(), target.astype(np.float64).ravel()
    mse = float(np.mean((prediction - target) ** 2))
    data_range = target.max() - target.min()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_p, mu_t = prediction.mean(), target.mean()
    cov = np.mean((prediction - mu_p) * (target - mu_t))
    variances = prediction.var() + target.var()
    ssim = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (variances + c2))
    return {"MSE": mse, "PSNR": 10 * math.log10(target.max() ** 2 / mse), "SSIM": float(ssim)}


def parse_summary(text: str) -> dict[tuple[str, str], dict[str, str]]:
    """``{(experiment, method): {column: cell}}`` from the Markdown table (an empty experiment repeats the last)."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    table, experiment = {}, ""
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        experiment = cells[0] or experiment
        table[(experiment, cells[1])] = dict(zip(header[2:], cells[2:], strict=True))
    return table


# ----------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def mr_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The command on the PD/T2 dataset, both directions."""
    root = tmp_path_factory.mktemp("evaluate")
    dataset, ckpt_dir = write_dataset(root / "data"), write_constant_generators(root / "models")
    result = run_evaluate(dataset, root / "eval", ckpt_dir, "--method", "Dicycle")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return {"dataset": dataset, "ckpt_dir": ckpt_dir, "output": root / "eval", "stdout": result.stdout}


# ------------------------------------------------------------------------------------------------------- tests


def test_command_writes_csv_summary_and_figures(mr_run: dict) -> None:
    output = mr_run["output"]
    rows = read_csv(output / "metrics_Dicycle.csv")
    assert len(rows) == len(SUBJECTS) * 2  # volumes x directions
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert [(r["direction"], r["subject"]) for r in rows] == [(d, s) for d in ("A2B", "B2A") for s in SUBJECTS]
    assert {r["experiment"] for r in rows} == {"PD to T2", "T2 to PD"}
    assert {r["method"] for r in rows} == {"Dicycle"}
    assert all(math.isnan(r["MAE_HU"]) for r in rows)  # MR targets: no HU
    figures = sorted(p.name for p in (output / "figures").glob("*.png"))
    assert figures == sorted(f"{s}_{d}_Dicycle.png" for s in SUBJECTS for d in ("A2B", "B2A"))
    assert all((output / "figures" / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in figures)
    assert "PD to T2" in mr_run["stdout"]  # the summary is printed


def test_metrics_equal_a_reference_by_hand(mr_run: dict) -> None:
    """The synthesis is a known constant, so MSE, PSNR and SSIM follow from the ground-truth files alone."""
    dataset = mr_run["dataset"]
    for row in read_csv(mr_run["output"] / "metrics_Dicycle.csv"):
        target_name = "T2" if row["direction"] == "A2B" else "PD"
        target = zscore_by_hand(dataset / f"{row['subject']}-{target_name}.nii.gz")
        if row["subject"] in MASKED:  # B -> A uses mask_B, which defaults to the (shared-geometry) mask
            target = target[nib.load(dataset / f"{row['subject']}-mask.nii.gz").get_fdata() > 0]
        expected = metrics_by_hand(np.full(target.shape, CONSTANT[row["direction"]], np.float32), target)
        for name, value in expected.items():
            assert row[name] == pytest.approx(value, rel=1e-4, abs=1e-5), (row["subject"], row["direction"], name)
        assert int(row["voxels"]) == target.size
        assert row["masked"] == str(row["subject"] in MASKED)


def test_summary_matches_csv_in_the_papers_layout(mr_run: dict) -> None:
    rows = read_csv(mr_run["output"] / "metrics_Dicycle.csv")
    text = (mr_run["output"] / "summary.md").read_text(encoding="utf-8")
    assert "| Experiment | | MSE | PSNR | SSIM | SSIM (windowed) | n |" in text
    table = parse_summary(text)
    assert list(table) == [("PD to T2", "Dicycle"), ("T2 to PD", "Dicycle")]
    for (experiment, method), cells in table.items():
        group = [r for r in rows if r["experiment"] == experiment and r["method"] == method]
        assert cells["n"] == str(len(group))
        for column, decimals in (("MSE", 3), ("PSNR", 2), ("SSIM", 3), ("SSIM (windowed)", 3)):
            key = {"SSIM (windowed)": "SSIM_windowed"}.get(column, column)
            values = [r[key] for r in group]
            mean, sd = re.fullmatch(r"(-?[\d.]+) \(([\d.]+)\)", cells[column]).groups()
            assert float(mean) == pytest.approx(statistics.fmean(values), abs=0.51 * 10**-decimals)
            assert float(sd) == pytest.approx(statistics.stdev(values), abs=0.51 * 10**-decimals)


def test_runs_of_two_methods_merge_into_one_table(mr_run: dict, tmp_path: Path) -> None:
    """A CycleGAN run written beside the DicycleGAN run: one table, Cycle above Dicycle in each experiment."""
    rows = read_csv(mr_run["output"] / "metrics_Dicycle.csv")
    write_results(rows, tmp_path, "Dicycle")
    write_results([{**r, "method": "Cycle", "PSNR": r["PSNR"] - 1.0} for r in rows], tmp_path, "Cycle")
    table = parse_summary((tmp_path / "summary.md").read_text(encoding="utf-8"))
    assert list(table) == [(e, m) for e in ("PD to T2", "T2 to PD") for m in ("Cycle", "Dicycle")]
    cycle, dicycle = table[("PD to T2", "Cycle")]["PSNR"], table[("PD to T2", "Dicycle")]["PSNR"]
    assert float(cycle.split()[0]) == pytest.approx(float(dicycle.split()[0]) - 1.0, abs=0.011)
    assert "| PD to T2 | Cycle |" in (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "|  | Dicycle |" in (tmp_path / "summary.md").read_text(encoding="utf-8")


def test_ct_target_adds_mae_in_hu(tmp_path: Path) -> None:
    """MR -> CT: metrics on the [-1, 1] window scale, MAE in HU against the window-clipped ground truth."""
    dataset = write_dataset(tmp_path / "data", kind_b="CT")
    ckpt_dir = write_constant_generators(tmp_path / "models")
    evaluate_in_process(dataset, tmp_path / "eval", ckpt_dir, domain_b="CT", direction="A2B")
    rows = read_csv(tmp_path / "eval" / "metrics_Dicycle.csv")
    assert [r["experiment"] for r in rows] == ["MR to CT"] * len(SUBJECTS)
    synthesis = math.tanh(CONSTANT["A2B"])  # CT generators end in tanh
    for row in rows:
        hu = np.clip(nib.load(dataset / f"{row['subject']}-CT.nii.gz").get_fdata(), *HU_WINDOW)
        if row["subject"] in MASKED:
            hu = hu[nib.load(dataset / f"{row['subject']}-mask.nii.gz").get_fdata() > 0]
        target = (hu - 500.0) / 1500.0
        expected = metrics_by_hand(np.full(target.shape, synthesis), target)
        expected["MAE_HU"] = float(np.mean(np.abs(synthesis * 1500.0 + 500.0 - hu)))
        predicted_bone, true_bone = np.full(hu.shape, synthesis * 1500.0 + 500.0 > 300.0), hu > 300.0
        overlap = 2 * np.sum(predicted_bone & true_bone)
        expected["bone_dice"] = float(overlap / (predicted_bone.sum() + true_bone.sum()))
        for name, value in expected.items():
            assert row[name] == pytest.approx(value, rel=1e-4, abs=1e-4), (row["subject"], name)
    assert "MAE (HU)" in (tmp_path / "eval" / "summary.md").read_text(encoding="utf-8")
    assert "Bone Dice" in (tmp_path / "eval" / "summary.md").read_text(encoding="utf-8")


def test_bone_dice_measures_where_the_bone_is_drawn() -> None:
    """Bone Dice against a count by hand: a skull shell drawn one shell further out (bone where the scalp is, the
    T1 -> CT failure) overlaps little; NaN without bone in the ground truth or for MR targets."""
    grid = np.stack(np.meshgrid(*(np.arange(24.0) - 11.5,) * 3, indexing="ij"))
    radius = np.sqrt((grid**2).sum(0))

    def hu_to_unit(hu: np.ndarray) -> np.ndarray:  # the window [-1000, 2000] scaled to [-1, 1]
        return (hu - 500.0) / 1500.0

    skull = (radius > 7) & (radius <= 9)
    target = hu_to_unit(np.where(skull, 1000.0, np.where(radius <= 7, 30.0, -1000.0)))
    shifted = (radius > 8) & (radius <= 10)  # one voxel further out
    prediction = hu_to_unit(np.where(shifted, 800.0, np.where(radius <= 8, 30.0, -1000.0)))
    values = volume_metrics(torch.tensor(prediction)[None], torch.tensor(target)[None], target_kind="CT")
    expected = 2 * np.sum(skull & shifted) / (np.sum(skull) + np.sum(shifted))
    assert values["bone_dice"] == pytest.approx(expected, rel=1e-6)
    assert 0.2 < expected < 0.8
    exact = volume_metrics(torch.tensor(target)[None], torch.tensor(target)[None], target_kind="CT")
    assert exact["bone_dice"] == pytest.approx(1.0)
    metric = BoneDiceMetric()  # as validation uses it: volumes without bone are left out of the mean
    metric(
        torch.tensor(np.stack([prediction, prediction]))[:, None],
        torch.tensor(np.stack([target, target * 0 - 1]))[:, None],
    )
    metric(torch.tensor(target)[None, None], torch.tensor(target)[None, None])
    assert metric.aggregate("none").flatten()[1].isnan()
    assert float(metric.aggregate()) == pytest.approx((expected + 1.0) / 2, rel=1e-6)
    inside = torch.tensor(radius <= 6)[None]  # a mask without bone: no Dice
    assert math.isnan(
        volume_metrics(torch.tensor(prediction)[None], torch.tensor(target)[None], inside, "CT")["bone_dice"]
    )
    assert math.isnan(volume_metrics(torch.tensor(prediction)[None], torch.tensor(target)[None])["bone_dice"])


def test_mismatched_ground_truth_names_both_files(tmp_path: Path) -> None:
    dataset = write_dataset(tmp_path / "data")
    wrong = np.zeros((24, 20, 12), np.float32)
    wrong[4:20, 4:16, 2:10] = 100.0
    _save(wrong, dataset / "sub01-T2.nii.gz")
    ckpt_dir = write_constant_generators(tmp_path / "models")
    with pytest.raises(RuntimeError) as error:  # monai.bundle and MONAI's transforms wrap the error
        evaluate_in_process(dataset, tmp_path / "eval", ckpt_dir, direction="A2B")
    message = str(next(e for e in _causes(error.value) if isinstance(e, ValueError)))
    assert str((dataset / "sub01-T2.nii.gz").resolve()) in message
    assert str((dataset / "sub01-PD.nii.gz").resolve()) in message


def test_mask_restricts_every_metric() -> None:
    """Changing voxels outside the mask (beyond the 3-voxel reach of the SSIM window) changes no masked metric."""
    generator = torch.Generator().manual_seed(0)
    target = torch.rand((1, 20, 18, 16), generator=generator)
    prediction = target + 0.1 * torch.randn((1, 20, 18, 16), generator=generator)
    mask = torch.zeros((1, 20, 18, 16), dtype=torch.bool)
    mask[:, 8:14, 5:13, 5:11] = True
    changed_target, changed_prediction = target.clone(), prediction.clone()
    changed_target[:, :4] = 5.0  # a far-away bright block: it would set the maximum and the data range
    changed_prediction[:, 17:] = -3.0
    for kind in ("MR", "CT"):
        masked = volume_metrics(prediction, target, mask, kind)
        changed = volume_metrics(changed_prediction, changed_target, mask, kind)
        assert all(changed[k] == masked[k] or (math.isnan(changed[k]) and math.isnan(masked[k])) for k in masked)
        whole = volume_metrics(prediction, target, None, kind)
        changed_whole = volume_metrics(changed_prediction, changed_target, None, kind)
        assert all(whole[name] != changed_whole[name] for name in ("MSE", "PSNR", "SSIM", "SSIM_windowed"))
        assert masked["voxels"] == int(mask.sum()) and whole["voxels"] == target.numel()
    assert masked["MSE"] == pytest.approx(float(((prediction - target)[mask] ** 2).mean()), rel=1e-6)


def test_windowed_ssim_in_a_full_mask_is_the_windowed_ssim() -> None:
    generator = torch.Generator().manual_seed(1)
    target = torch.rand((2, 1, 16, 14, 12), generator=generator)
    prediction = target + 0.2 * torch.rand((2, 1, 16, 14, 12), generator=generator)
    full = torch.ones_like(target, dtype=torch.bool)
    torch.testing.assert_close(windowed_ssim(prediction, target, mask=full), windowed_ssim(prediction, target))


class _Identity(nn.Module):
    """A 'generator' whose undeformed pass returns its input: the synthesis is the preprocessed source."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _evaluator(cases: list, output_dir: Path, network: nn.Module, *handlers: object) -> SupervisedEvaluator:
    """configs/evaluate.json's A2B evaluator, PD -> T2 at 2 mm, built in Python around ``network``."""
    preprocessing = {key: volume_preprocessing(key, "MR", pixdim=(2.0, 2.0, 2.0)) for key in ("image", "label")}
    return SupervisedEvaluator(
        device="cpu",
        val_data_loader=paired_loader(cases, "A2B", preprocessing["image"], preprocessing["label"], (2.0, 2.0, 2.0)),
        network=network,
        inferer=AxialSliceInferer(sw_batch_size=3),
        key_val_metric=metric_handlers("MR"),
        val_handlers=[
            *handlers,
            VolumeMetricsSaver(output_dir, "Dicycle", cases),
            CaseFigures(output_dir / "figures", "Dicycle"),
        ],
    )


def test_synthesis_is_aligned_with_the_ground_truth(tmp_path: Path) -> None:
    """Identity synthesis on a non-RAS grid: the metrics are those of the z-scored source against the z-scored
    ground truth voxel for voxel, so the pipeline neither shifts, flips nor transposes the synthesis."""
    rng = np.random.default_rng(3)
    affine = np.array([[-2.0, 0, 0, 30], [0, 2.0, 0, -20], [0, 0, 2.0, 5], [0, 0, 0, 1]])  # LAS
    a = np.abs(_ellipsoid(rng, 150.0, 300.0, 0.0))
    b = np.abs(_ellipsoid(rng, 300.0, 100.0, 0.0))
    _save(a, tmp_path / "s-PD.nii.gz", affine)
    _save(b, tmp_path / "s-T2.nii.gz", affine)
    _save(_box_mask(0), tmp_path / "s-mask.nii.gz", affine)
    datalist = {"domains": {"A": "PD", "B": "T2"}, "test": [{"A": "s-PD.nii.gz", "B": "s-T2.nii.gz"}]}
    (tmp_path / "datalist.json").write_text(json.dumps(datalist), encoding="utf-8")
    case = paired_cases(tmp_path, "datalist.json", "test", parse_directions("A2B"))[0]
    assert case["subject"] == "s-PD"  # no "subject": the source file's name
    _evaluator([case], tmp_path / "whole", _Identity()).run()
    (row,) = read_csv(tmp_path / "whole" / "metrics_Dicycle.csv")
    expected = metrics_by_hand(zscore_by_hand(tmp_path / "s-PD.nii.gz"), zscore_by_hand(tmp_path / "s-T2.nii.gz"))
    for name, value in expected.items():
        assert row[name] == pytest.approx(value, rel=1e-4), name
    _evaluator([{**case, "mask": str(tmp_path / "s-mask.nii.gz")}], tmp_path / "masked", _Identity()).run()
    (masked_row,) = read_csv(tmp_path / "masked" / "metrics_Dicycle.csv")
    inside = _box_mask(0) > 0
    expected = metrics_by_hand(
        zscore_by_hand(tmp_path / "s-PD.nii.gz")[inside], zscore_by_hand(tmp_path / "s-T2.nii.gz")[inside]
    )
    for name, value in expected.items():
        assert masked_row[name] == pytest.approx(value, rel=1e-4), name
    assert (tmp_path / "masked" / "figures" / "s-PD_A2B_Dicycle.png").is_file()


def _causes(error: BaseException) -> list[BaseException]:
    """The error and its chain of causes (MONAI wraps a transform's error in a RuntimeError)."""
    chain = [error]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    return chain


def test_mismatched_mask_and_bad_requests_raise_clear_errors(tmp_path: Path) -> None:
    dataset = write_dataset(tmp_path / "data")
    shifted = AFFINE.copy()
    shifted[:3, 3] = [4.0, 0.0, 0.0]
    _save(np.ones(SHAPE, np.uint8), dataset / "shifted-mask.nii.gz", shifted)
    case = paired_cases(dataset, "datalist.json", "test", ["A2B"])[0]
    with pytest.raises(RuntimeError) as error:
        _evaluator([{**case, "mask": str(dataset / "shifted-mask.nii.gz")}], tmp_path, _Identity()).run()
    message = str(next(e for e in _causes(error.value) if isinstance(e, ValueError)))
    assert re.search(r"mask .*shifted-mask\.nii\.gz is not on the grid of its source .*sub00-PD", message)
    generator = DicycleGenerator(ngf=4, n_blocks=1, deformable=False)
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        _evaluator(
            [case], tmp_path, generator, CheckpointLoader(str(tmp_path / "missing.pt"), {"model": generator})
        ).run()
    torch.save(DicycleGenerator(ngf=4, n_blocks=1).state_dict(), tmp_path / "deformable.pt")
    loader = CheckpointLoader(str(tmp_path / "deformable.pt"), {"model": generator})
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: .*offset"):
        _evaluator([case], tmp_path, generator, loader).run()
    with pytest.raises(ValueError, match="direction"):
        parse_directions("AtoB")
    with pytest.raises(KeyError, match="validation"):
        paired_cases(dataset, "datalist.json", "validation")
    content = json.loads((dataset / "datalist.json").read_text(encoding="utf-8"))
    (dataset / "unpaired.json").write_text(
        json.dumps({**content, "training_A": [{"image": "sub00-PD.nii.gz"}]}), encoding="utf-8"
    )
    with pytest.raises(ValueError, match="not paired"):
        paired_cases(dataset, "unpaired.json", "training_A")


def test_summary_of_a_single_volume_has_no_sd() -> None:
    row = {"experiment": "PD to T2", "direction": "A2B", "method": "Dicycle", "masked": "False"}
    row.update({"MSE": 0.5, "PSNR": 20.0, "SSIM": 0.8, "SSIM_windowed": 0.7, "MAE_HU": float("nan")})
    assert "| PD to T2 | Dicycle | 0.500 (-) | 20.00 (-) | 0.800 (-) | 0.700 (-) | 1 |" in summary_markdown([row])


def test_residual_displacement_is_measured_in_mm_on_the_evaluation_grid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The displacement metric gets the preprocessed grid's voxel size (2 mm here) and each volume's mask, and its
    two values land in their columns."""
    calls = []

    def registration_stub(moving, fixed, spacing, mask=None, **options):
        assert options == {}  # evaluate.json's null: the registration's own iterations
        calls.append((tuple(spacing), None if mask is None else int(mask.sum())))
        return {"mean_mm": 0.5 * len(calls), "p95_mm": 1.0}

    monkeypatch.setattr("bundle.registration.residual_displacement", registration_stub)
    dataset, ckpt_dir = write_dataset(tmp_path / "data"), write_constant_generators(tmp_path / "models")
    evaluate_in_process(dataset, tmp_path / "eval", ckpt_dir, direction="A2B", residual_displacement=True)
    rows = read_csv(tmp_path / "eval" / "metrics_Dicycle.csv")
    assert [spacing for spacing, _ in calls] == [(2.0, 2.0, 2.0)] * len(SUBJECTS)
    assert [voxels for _, voxels in calls] == [int(r["voxels"]) for r in rows]
    assert [(r["displacement_mm"], r["displacement_p95_mm"]) for r in rows] == [(0.5, 1.0), (1.0, 1.0), (1.5, 1.0)]
    assert "Residual displacement (mm)" in (tmp_path / "eval" / "summary.md").read_text(encoding="utf-8")
