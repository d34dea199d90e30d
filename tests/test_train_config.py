"""configs/train.json run through `monai.bundle`: outputs, validation, resume, presets and bad datalists."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, run

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "configs" / "train.json")
TINY = {
    "ngf": 4,
    "n_blocks": 1,
    "d_channels": 4,
    "spatial_size": [32, 32],
    "pixdim": [4.0, 4.0, 4.0],
    "samples_per_epoch": 4,
    "batch_size": 2,
    "n_epochs": 1,
    "n_epochs_decay": 0,
    "num_workers": 0,
    "cache_workers": 1,
    "val_interval": 1,
    "log_interval": 1,
}


def _head(kind: str, seed: int, shape=(40, 44, 24)) -> np.ndarray:
    """An ellipsoid 'head' with an inner 'brain' whose contrast depends on the domain."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = (x / 0.8) ** 2 + (y / 0.85) ** 2 + (z / 0.75) ** 2
    if kind == "CT":
        volume = np.where(r <= 1, np.where(r <= 0.6, 40.0, 800.0), -1000.0)
        return (volume + rng.normal(0, 5, shape)).astype(np.float32)
    brain, scalp = (300.0, 100.0) if kind == "T2" else (100.0, 300.0)
    volume = np.where(r <= 1, np.where(r <= 0.6, brain, scalp), 0.0)
    return (volume + np.abs(rng.normal(0, 5, shape))).astype(np.float32)


def make_dataset(root: Path, domains=("PD", "T2"), subjects: int = 3) -> Path:
    """Tiny paired volumes in IXI-like geometry and a datalist: training lists unpaired, one validation pair."""
    root.mkdir(parents=True, exist_ok=True)
    affine = np.diag([-2.0, -2.0, 3.0, 1.0])  # stored LPS-like; the pipeline reorients to RAS
    kinds = {name: "CT" if name == "CT" else name for name in domains}
    for s in range(subjects):
        for name in domains:
            nib.save(nib.Nifti1Image(_head(kinds[name], seed=10 * s + len(name)), affine), root / f"s{s}_{name}.nii.gz")
    a, b = domains
    datalist = {
        "domains": {"A": a, "B": b},
        "training_A": [{"image": f"s{s}_{a}.nii.gz"} for s in (0, 1)],
        "training_B": [{"image": f"s{s}_{b}.nii.gz"} for s in (1, 0)],
        "validation": [{"A": f"s2_{a}.nii.gz", "B": f"s2_{b}.nii.gz", "subject": "s2"}],
    }
    (root / "datalist.json").write_text(json.dumps(datalist), encoding="utf-8")
    return root


def train(tmp_path: Path, dataset: Path, config_files=(TRAIN,), **overrides) -> None:
    settings = {**TINY, **overrides}
    run(
        run_id="training",
        config_file=list(config_files),
        bundle_root=str(ROOT),
        dataset_dir=str(dataset),
        ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "runs"),
        **settings,
    )


def _network(config_files=(TRAIN,), **overrides):
    parser = ConfigParser()
    parser.read_config(list(config_files))
    parser.update({**TINY, **overrides})
    return parser.get_parsed_content("network_def")


def test_training_writes_models_checkpoint_logs_and_the_best_validated_model(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tmp_path, make_dataset(tmp_path / "data"))
    models = tmp_path / "models"
    expected = [
        "checkpoint.pt",
        "intensity_reference.json",
        "model.pt",
        "model_best.pt",
        "model_g_ba.pt",
        "settings.json",
    ]
    assert sorted(p.name for p in models.iterdir()) == expected
    reference = json.loads((models / "intensity_reference.json").read_text(encoding="utf-8"))
    for domain in "AB":  # medians over the two training volumes of each domain, in the volumes' own units
        assert reference[domain]["kind"] == "MR" and reference[domain]["volumes"] == 2
        assert 100 < reference[domain]["mean"] < 300 and reference[domain]["std"] > 10
    network = _network()
    network.load_state_dict(torch.load(models / "model.pt", weights_only=True))  # what ckpt_export loads
    checkpoint = torch.load(models / "checkpoint.pt", weights_only=True)
    assert {"g_ab", "g_ba", "d_a", "d_b", "g_optimizer", "d_optimizer", "pool_a", "pool_b", "schedule"} <= set(
        checkpoint
    )
    assert math.isfinite(checkpoint["best_model"]["best"])  # validation ran and recorded its PSNR (-inf before)
    events = EventAccumulator(str(tmp_path / "runs"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"gan_ab", "align", "dicyc", "d_b", "epoch_g_loss", "val_psnr", "val_ssim", "val_mse"} <= scalars
    assert "val_bone_dice" not in scalars  # an MR target has no bone to overlap
    assert {"train/A_to_B", "train/B_to_A"} <= set(events.Tags()["images"])


def test_resume_through_the_config_equals_an_uninterrupted_run(tmp_path):
    dataset = make_dataset(tmp_path / "data")
    no_validation = {"val_interval": 100}
    train(tmp_path / "straight", dataset, n_epochs=2, **no_validation)
    train(tmp_path / "resumed", dataset, n_epochs=1, **no_validation)
    train(tmp_path / "resumed", dataset, n_epochs=2, resume=True, **no_validation)
    straight = torch.load(tmp_path / "straight" / "models" / "checkpoint.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "models" / "checkpoint.pt", weights_only=True)
    assert resumed["trainer"]["iteration"] == straight["trainer"]["iteration"] == 4  # 2 epochs of 2 batches
    for network in ("g_ab", "g_ba", "d_a", "d_b"):
        for key, value in straight[network].items():
            torch.testing.assert_close(resumed[network][key], value, rtol=0, atol=0, msg=f"{network}.{key}")


def test_missing_files_are_all_listed_before_training(tmp_path):
    dataset = make_dataset(tmp_path / "data")
    for name in ("s0_PD.nii.gz", "s1_T2.nii.gz"):
        (dataset / name).unlink()
    with pytest.raises(Exception) as caught:
        train(tmp_path, dataset)
    message = "".join(str(e) for e in _chain(caught.value))
    assert "s0_PD.nii.gz: missing" in message and "s1_T2.nii.gz: missing" in message
    assert not (tmp_path / "models" / "model.pt").exists()


def test_an_empty_domain_list_is_refused(tmp_path):
    dataset = make_dataset(tmp_path / "data")
    datalist = json.loads((dataset / "datalist.json").read_text(encoding="utf-8"))
    datalist["training_B"] = []
    (dataset / "datalist.json").write_text(json.dumps(datalist), encoding="utf-8")
    with pytest.raises(Exception) as caught:
        train(tmp_path, dataset)
    assert any("training list of domain B is empty" in str(e) for e in _chain(caught.value))


def _chain(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def test_cyclegan_preset_trains_the_same_code_without_offsets(tmp_path):
    cyclegan = (TRAIN, str(ROOT / "configs" / "cyclegan.json"))
    train(tmp_path, make_dataset(tmp_path / "data"), config_files=cyclegan)
    network = _network(cyclegan)
    assert network.deformable is False
    network.load_state_dict(torch.load(tmp_path / "models" / "model.pt", weights_only=True))
    checkpoint = torch.load(tmp_path / "models" / "checkpoint.pt", weights_only=True)
    assert not any("offset_conv" in key for key in checkpoint["g_ab"])


def test_abdominal_preset_synthesizes_range_scaled_ct(tmp_path):
    abdomen = (TRAIN, str(ROOT / "configs" / "abdomen.json"))
    train(tmp_path, make_dataset(tmp_path / "data", domains=("T1", "CT")), config_files=abdomen, pixdim=[4, 4, 5])
    network = _network(abdomen)
    assert isinstance(network.model[-1], torch.nn.Tanh)  # G MR -> CT ends in tanh, G CT -> MR is linear
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "runs"))
    events.Reload()
    (bone_dice,) = events.Scalars("val_bone_dice")  # a CT target: validation reports where the bone is drawn
    assert 0.0 <= bone_dice.value <= 1.0
    parser = ConfigParser()
    parser.read_config(list(abdomen))
    assert parser.get_parsed_content("pixdim") == [1.56, 1.56, 5.0]
    assert parser.get_parsed_content("spatial_size") == [192, 192]


def test_training_without_a_validation_list(tmp_path):
    dataset = make_dataset(tmp_path / "data")
    datalist = json.loads((dataset / "datalist.json").read_text(encoding="utf-8"))
    del datalist["validation"]
    (dataset / "datalist.json").write_text(json.dumps(datalist), encoding="utf-8")
    train(tmp_path, dataset)
    assert (tmp_path / "models" / "model.pt").exists()
    assert not (tmp_path / "models" / "model_best.pt").exists()


def test_pseudo_ct_preset_trains_on_misaligned_pairs_with_shared_offsets(tmp_path):
    preset = (TRAIN, str(ROOT / "configs" / "pseudo_ct.json"))
    dataset = make_dataset(tmp_path / "data", domains=("T1", "CT"))
    # without a training_pairs list the preset stops before training, naming the datalist and the list (the
    # KeyError in the chain MONAI's config error prints)
    with pytest.raises(Exception) as raised:
        train(tmp_path / "unpaired", dataset, config_files=preset)
    chain, error = [], raised.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    assert any(f"datalist {dataset / 'datalist.json'} has no 'training_pairs' list" in text for text in chain)
    assert not list((tmp_path / "unpaired").glob("models/*.pt"))
    datalist = json.loads((dataset / "datalist.json").read_text(encoding="utf-8"))
    datalist["training_pairs"] = [{"A": f"s{s}_T1.nii.gz", "B": f"s{s}_CT.nii.gz"} for s in (0, 1)]
    (dataset / "datalist.json").write_text(json.dumps(datalist), encoding="utf-8")
    train(tmp_path, dataset, config_files=preset)
    network = _network(preset)
    assert network.offsets == "shared" and isinstance(network.model[-1], torch.nn.Tanh)  # MR -> CT
    network.load_state_dict(torch.load(tmp_path / "models" / "model.pt", weights_only=True))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "runs"))
    events.Reload()
    assert "paired" in events.Tags()["scalars"]  # the misaligned-pairs term is trained and logged
