"""Settings travel with the weights (models/settings.json), and boolean flags accept true/false in any case."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bundle.networks import DicycleGenerator
from bundle.settings import as_bool, resolve_settings, write_settings
from monai.bundle import ConfigParser, ckpt_export, run
from tests.bundle_fixtures import BUNDLE_ROOT, TINY_OVERRIDES, bundle_command, bundle_env, write_tiny_dataset

CONFIGS = BUNDLE_ROOT / "configs"


def _configs(workflow: str) -> list[str]:
    """The config files of a workflow as the README's commands name them: train.json and inference.json alone,
    evaluate.json as an overlay on train.json."""
    return [str(CONFIGS / name) for name in (["train.json"] if workflow == "evaluate.json" else []) + [workflow]]


# a preset unlike the paper's network and geometry, so that nothing passes by matching the defaults
PRESET = {key: json.loads(value) for key, value in TINY_OVERRIDES.items()} | {"ngf": 4, "n_blocks": 2}


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), ("true", True), ("TRUE", True),
                                             (" False ", False), ("false", False)])  # fmt: skip
def test_as_bool_accepts_true_and_false_in_any_case(value, expected):
    assert as_bool(value, "amp") is expected


@pytest.mark.parametrize("value", ["yes please", "1", "", None, 1, "truee"])
def test_as_bool_refuses_anything_else_naming_the_flag(value):
    with pytest.raises(ValueError, match=r"^--amp: expected true or false, got .*\.$"):
        as_bool(value, "amp")


def test_boolean_flags_of_the_configs_go_through_as_bool():
    parser = ConfigParser()
    parser.read_config(_configs("train.json"))
    parser.update({"amp": "true", "resume": "FALSE", "deformable": "False"})
    assert parser.get_parsed_content("train#trainer#amp") is True
    assert parser.get_parsed_content("train#handlers#0#_disabled_") is True  # --resume false: no resume
    assert parser.get_parsed_content("network_def#deformable") is False
    parser.update({"amp": "yes please"})
    with pytest.raises(Exception) as error:
        parser.get_parsed_content("train#trainer#amp", lazy=False)
    assert "--amp: expected true or false, got 'yes please'." in "".join(_chain(error.value))


def _chain(error: BaseException) -> list[str]:
    messages = []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__
    return messages


def test_an_override_that_contradicts_the_weights_fails_in_one_line(tmp_path):
    write_settings(tmp_path, {**resolve_settings(tmp_path / "none"), "ngf": 16, "pixdim": [2.4, 2.4, 2.4]})
    assert resolve_settings(tmp_path, ngf=16, pixdim=(2.4, 2.4, 2.4), n_blocks=None)["ngf"] == 16
    with pytest.raises(ValueError) as error:
        resolve_settings(tmp_path, ngf=32)
    message = str(error.value)
    assert "\n" not in message and message.startswith("ngf: the weights in") and "16" in message and "32" in message
    with pytest.raises(ValueError, match=r"^deformable: .* True, not False"):
        resolve_settings(tmp_path, deformable="false")


def test_a_settings_file_without_a_key_is_refused_in_one_line_naming_the_file_and_the_key(tmp_path):
    """A missing pixdim silently preprocessed at the paper's 1.8 mm instead of the trained spacing."""
    write_settings(tmp_path, {**resolve_settings(tmp_path / "none"), "ngf": 16, "pixdim": [2.4, 2.4, 2.4]})
    stored = json.loads((tmp_path / "settings.json").read_text(encoding="utf-8"))
    del stored["pixdim"], stored["n_blocks"]
    (tmp_path / "settings.json").write_text(json.dumps(stored), encoding="utf-8")
    with pytest.raises(ValueError) as error:
        resolve_settings(tmp_path, pixdim=None)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'settings.json'} is incomplete: no 'n_blocks', 'pixdim'")
    assert "\n" not in message
    settings = resolve_settings(tmp_path, pixdim=[2.4, 2.4, 2.4], n_blocks=9)  # given explicitly: complete again
    assert settings["pixdim"] == [2.4, 2.4, 2.4] and settings["ngf"] == 16


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A tiny training with string booleans as python-fire passes them; an unreadable checkpoint.pt is already in
    models/, so ``--resume false`` must not try to load it."""
    root = tmp_path_factory.mktemp("settings")
    dataset = write_tiny_dataset(root / "data")
    models = root / "models"
    models.mkdir()
    (models / "checkpoint.pt").write_bytes(b"not a checkpoint")
    run(
        run_id="training",
        config_file=_configs("train.json"),
        bundle_root=str(BUNDLE_ROOT),
        dataset_dir=str(dataset),
        ckpt_dir=str(models),
        output_dir=str(root / "runs"),
        amp="TRUE",
        resume="false",
        **PRESET,
    )
    return {"root": root, "dataset": dataset, "models": models}


def test_training_writes_the_settings_beside_the_weights(trained):
    settings = json.loads((trained["models"] / "settings.json").read_text(encoding="utf-8"))
    assert settings["ngf"] == 4 and settings["n_blocks"] == 2 and settings["deformable"] is True
    assert settings["pixdim"] == [2, 2, 2] and settings["spatial_size"] == [32, 32]
    assert (settings["domain_a"], settings["domain_b"], settings["name_a"], settings["name_b"]) == (
        "MR",
        "MR",
        "PD",
        "T2",
    )
    assert settings["out_activation"] == {"A": None, "B": None}
    generator = DicycleGenerator(ngf=4, n_blocks=2)
    generator.load_state_dict(torch.load(trained["models"] / "model.pt", weights_only=True))  # they rebuild it
    assert torch.load(trained["models"] / "checkpoint.pt", weights_only=True)  # rewritten by training, not loaded


def test_inference_evaluate_and_export_need_no_network_flags(trained, tmp_path):
    models, dataset = trained["models"], trained["dataset"]
    run(  # --bf16 TRUE as python-fire passes it
        config_file=_configs("inference.json"),
        bundle_root=str(BUNDLE_ROOT),
        ckpt_dir=str(models),
        input_file=str(dataset / "sub00-PD.nii.gz"),
        output_dir=str(tmp_path / "synth"),
        bf16="TRUE",
    )
    assert (tmp_path / "synth" / "sub00-PD_T2.nii.gz").is_file()
    run(
        config_file=_configs("evaluate.json"),
        bundle_root=str(BUNDLE_ROOT),
        ckpt_dir=str(models),
        dataset_dir=str(dataset),
        datalist_key="validation",
        output_dir=str(tmp_path / "eval"),
        save_figures="false",
    )
    assert any((tmp_path / "eval").glob("*.csv"))
    ckpt_export(
        net_id="network_def",
        filepath=str(tmp_path / "model.ts"),
        ckpt_file=str(models / "model.pt"),
        meta_file=str(CONFIGS / "metadata.json"),
        config_file=_configs("inference.json"),
        ckpt_dir=str(models),
    )
    reference = DicycleGenerator(ngf=4, n_blocks=2).eval()
    reference.load_state_dict(torch.load(models / "model.pt", weights_only=True))
    x = torch.randn(1, 1, 32, 36)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(tmp_path / "model.ts"))(x), reference(x), rtol=0, atol=1e-5)


def test_a_contradicting_ngf_on_the_command_line_fails_in_one_line(trained, tmp_path):
    overrides = {
        "ckpt_dir": str(trained["models"]),
        "output_dir": str(tmp_path / "out"),
        "input_file": str(trained["dataset"] / "sub00-PD.nii.gz"),
        "ngf": "8",
    }
    command = [sys.executable, *bundle_command(["configs/inference.json"], overrides)]
    result = subprocess.run(command, cwd=BUNDLE_ROOT, env=bundle_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"ValueError: ngf: the weights in {trained['models']} were trained with 4, not 8" in result.stderr
    assert "size mismatch" not in result.stderr


def test_the_deformation_mode_travels_with_the_weights(tmp_path):
    """A model trained with ``offsets: field`` has a field head in model.pt: inference rebuilds that generator
    from settings.json (strict load) and serves the same undeformed pass."""
    torch.manual_seed(4)
    trained = DicycleGenerator(ngf=4, n_blocks=2, offsets="field")
    with torch.no_grad():
        trained.field.head.weight.normal_(0, 0.5)
    torch.save(trained.state_dict(), tmp_path / "model.pt")
    write_settings(tmp_path, {**resolve_settings(tmp_path / "none"), "ngf": 4, "n_blocks": 2, "offsets": "field"})
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser.update({"bundle_root": str(BUNDLE_ROOT), "ckpt_dir": str(tmp_path), "device": "$torch.device('cpu')"})
    network = parser.get_parsed_content("network")
    network.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert network.offsets == "field"
    x = torch.randn(1, 1, 24, 20)
    torch.testing.assert_close(network(x), trained(x), rtol=0, atol=0)
    evaluation = ConfigParser()  # evaluate.json, an overlay on train.json (whose offsets default is per_tap)
    evaluation.read_config(_configs("evaluate.json"))
    evaluation.update({"bundle_root": str(BUNDLE_ROOT), "ckpt_dir": str(tmp_path), "device": "$torch.device('cpu')"})
    evaluated = evaluation.get_parsed_content("g_ab")
    evaluated.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    torch.testing.assert_close(evaluated(x), trained(x), rtol=0, atol=0)


def test_settings_written_before_the_deformation_mode_was_kept_read_as_per_tap(tmp_path):
    """Weights of earlier versions (per-tap or shared offsets) load into per-tap offset convolutions."""
    write_settings(tmp_path, {**resolve_settings(tmp_path / "none"), "ngf": 16})
    stored = json.loads((tmp_path / "settings.json").read_text(encoding="utf-8"))
    del stored["offsets"]
    (tmp_path / "settings.json").write_text(json.dumps(stored), encoding="utf-8")
    assert resolve_settings(tmp_path)["offsets"] == "per_tap"
