"""scripts/demo.py rebuilds the trained generator from models/settings.json: any preset, a CT target included."""

from __future__ import annotations

import importlib
import json

from monai.bundle import run
from tests.bundle_fixtures import BUNDLE_ROOT, TINY_OVERRIDES, write_tiny_dataset


def _demo():
    return importlib.import_module("scripts.demo")


def test_demo_evaluation_serves_a_cyclegan_preset_with_a_ct_target(tmp_path):
    dataset = write_tiny_dataset(tmp_path / "data")
    datalist = json.loads((dataset / "datalist.json").read_text(encoding="utf-8"))
    datalist["test"] = datalist["validation"]
    (dataset / "datalist.json").write_text(json.dumps(datalist), encoding="utf-8")
    models = tmp_path / "models"
    tiny = {key: json.loads(value) for key, value in TINY_OVERRIDES.items()} | {"ngf": 4, "n_blocks": 2}
    run(
        run_id="training",
        config_file=[str(BUNDLE_ROOT / "configs" / f) for f in ("train.json", "cyclegan.json")],
        bundle_root=str(BUNDLE_ROOT),
        dataset_dir=str(dataset),
        ckpt_dir=str(models),
        output_dir=str(tmp_path / "runs"),
        domain_b="CT",
        **tiny,
    )
    rows = _demo().evaluate(str(dataset), str(models))
    assert [row["subject"] for row in rows] == ["sub00", "sub01"]
    assert all(isinstance(row["synthesis"], float) and isinstance(row["baseline"], float) for row in rows)
