"""``scripts/gpu_check.py`` at its tiny size on the CPU: every section runs, so the GPU check cannot rot between the
sessions that have a GPU."""

from __future__ import annotations

import importlib
import math
import re
from pathlib import Path

from tests.bundle_fixtures import write_tiny_dataset

ROOT = Path(__file__).resolve().parents[1]


def _load_gpu_check():
    return importlib.import_module("scripts.gpu_check")


def test_gpu_check_runs_every_section_at_tiny_size(tmp_path):
    gpu_check = _load_gpu_check()
    dataset = write_tiny_dataset(tmp_path / "data")
    report = tmp_path / "report.md"
    results = gpu_check.run_check(
        output=str(report), size="tiny", dataset_dir=str(dataset), work_dir=str(tmp_path / "work")
    )
    text = report.read_text(encoding="utf-8")
    failures = {key: results[key]["lines"] for key in results if key != "ok" and not results[key]["ok"]}
    assert results["ok"], failures
    assert text.startswith("# GPU check: ")
    for title in (
        "## 1. OffsetConv2d",
        "## 2. Training iterations",
        "## 3. Training",
        "## 4. Inference",
        "## 5.",
        "## 6.",
    ):
        assert title in text
    # every training run timed, all four finite and positive
    seconds = results["iterations"]["seconds"]
    assert set(seconds) == {"CycleGAN fp32", "CycleGAN AMP", "DicycleGAN fp32", "DicycleGAN AMP"}
    assert all(math.isfinite(s) and s > 0 for s in seconds.values())
    # interrupted run resumed to epoch 2, then a resume of the finished run changed nothing
    assert re.search(r"\| `--resume true` \| 0 \| [\d.]+ \| 2 \|", text)
    assert "unchanged by the last resume: True" in text
    assert results["inference"]["seconds"] > 0
    assert "models/model.pt written: True" in text
    # the model folders and logs stay in the kept work folder; the report names no temporary folder
    assert (tmp_path / "work" / "models" / "model.pt").is_file()
