"""Experiment tracking as MONAI documents it: ``python -m monai.bundle run --config_file configs/train.json
--tracking mlflow`` adds MONAI's ``MLFlowHandler`` (``DEFAULT_MLFLOW_SETTINGS``) to ``train#handlers`` and
``validate#handlers`` and records the run in a local SQLite store under ``output_dir``.

The runs are in-process calls of ``monai.bundle.run``, the function behind the command line, on tiny data.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import pytest
from monai.bundle import run
from monai.utils import path_to_sqlite_uri
from tests.bundle_fixtures import BUNDLE_ROOT, TINY_OVERRIDES, write_tiny_dataset

# MLflow's SQLite store uses a loader strategy that SQLAlchemy 2.1 deprecates; nothing for this bundle to act on
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning")

TRAIN = [str(BUNDLE_ROOT / "configs" / "train.json")]
LR = json.loads(Path(TRAIN[0]).read_text(encoding="utf-8"))["lr"]  # both optimizers start at the base rate
SAMPLES = int(TINY_OVERRIDES["samples_per_epoch"])  # batch size 1: one iteration per sample


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("tracking_data"))


@pytest.fixture(autouse=True)
def _mlflow_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # it would take priority over the bundle's settings
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


def _train(bundle_root: Path, dataset: Path, **overrides: str) -> Path:
    """Train the tiny config with ``--tracking mlflow``, validating after the epoch; returns ``output_dir``.

    ``output_dir`` keeps its definition ``$@bundle_root + '/runs'``: MONAI derives the path of the executed config
    (the run's artifact) by appending to that expression, so a plain-path ``output_dir`` override would make the
    artifact path a literal string that names no file (MONAI 1.6.1).
    """
    settings = {key: json.loads(value) for key, value in TINY_OVERRIDES.items()}
    run(
        config_file=TRAIN,
        tracking="mlflow",
        bundle_root=str(bundle_root),
        dataset_dir=str(dataset),
        ckpt_dir=str(bundle_root / "models"),
        val_interval=1,
        **settings,
        **overrides,
    )
    return bundle_root / "runs"


def _only_run(client: mlflow.MlflowClient, experiment_name: str) -> mlflow.entities.Run:
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None, f"no experiment {experiment_name!r} in the store"
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return runs[0]


def test_default_settings_record_losses_params_and_config_in_the_output_folder(tmp_path, dataset):
    output_dir = _train(tmp_path, dataset)

    store = output_dir / "mlruns.db"  # MONAI's default tracking_uri: <output_dir>/mlruns.db
    assert store.is_file()
    client = mlflow.MlflowClient(tracking_uri=path_to_sqlite_uri(store))
    tracked = _only_run(client, "monai_experiment")
    run_id = tracked.info.run_id
    assert tracked.info.status == "FINISHED"
    assert {"max_epochs": "1", "epoch_length": str(SAMPLES)}.items() <= tracked.data.params.items()

    # train_loss: the generator objective ("loss" of the trainer output), one value per iteration
    losses = sorted(client.get_metric_history(run_id, "train_loss"), key=lambda m: m.step)
    assert [m.step for m in losses] == list(range(1, SAMPLES + 1))
    assert all(math.isfinite(m.value) and m.value > 0 for m in losses)
    # the epoch metric of the schedule is the epoch's mean of the same loss
    (epoch_loss,) = client.get_metric_history(run_id, "epoch_g_loss")
    assert epoch_loss.step == 1
    assert epoch_loss.value == pytest.approx(sum(m.value for m in losses) / SAMPLES, rel=1e-5)
    # both optimizers' learning rates (the trainer has two, so no `trainer.optimizer` for MONAI to find)
    for name in ("lr_g", "lr_d"):
        (lr,) = client.get_metric_history(run_id, name)
        assert lr.step == 1 and lr.value == pytest.approx(LR), name
    # the validator's metrics go to the same run
    assert {"val_psnr", "val_ssim", "val_mse"} <= set(tracked.data.metrics)

    # the executed config is the run's artifact, stored next to the database
    (artifact,) = client.list_artifacts(run_id)
    assert artifact.path.startswith("config_") and artifact.path.endswith(".json")
    config = json.loads(
        Path(client.download_artifacts(run_id, artifact.path, str(tmp_path))).read_text(encoding="utf-8")
    )
    assert config["ngf"] == 4 and config["bundle_root"] == str(tmp_path)
    assert "MLFlowHandler" in {h.get("_target_") for h in config["train"]["handlers"] if isinstance(h, dict)}
    assert list((output_dir / "mlruns").rglob(artifact.path))


def test_tracking_uri_experiment_and_run_name_are_overridable(tmp_path, dataset):
    store = tmp_path / "tracking" / "store.db"
    store.parent.mkdir()
    output_dir = _train(
        tmp_path,
        dataset,
        tracking_uri=path_to_sqlite_uri(store),
        experiment_name="dicyclegan_tiny",
        run_name="one_epoch",
    )

    assert not (output_dir / "mlruns.db").exists()
    client = mlflow.MlflowClient(tracking_uri=path_to_sqlite_uri(store))
    tracked = _only_run(client, "dicyclegan_tiny")
    assert tracked.info.run_name == "one_epoch"
    assert len(client.get_metric_history(tracked.info.run_id, "train_loss")) == SAMPLES
    assert list((store.parent / "mlruns").rglob("config_*.json"))  # artifacts next to the custom store
