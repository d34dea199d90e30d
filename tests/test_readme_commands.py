"""Every ``monai.bundle`` command line of the README and of the model card (docs/README.md), as written: its config
files exist and merge, each flag names an id of the merged config (a typo would otherwise be added silently as a new
id and ignored), each value of a boolean setting is one the bundle accepts, and the files it names, exactly those,
run as MONAI's workflow at a tiny size (with MONAI's property checks for train and infer)."""

from __future__ import annotations

import ast
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from bundle.settings import as_bool
from monai.bundle import ConfigParser, ConfigWorkflow, run
from tests.bundle_fixtures import TINY_OVERRIDES, write_tiny_dataset

ROOT = Path(__file__).resolve().parents[1]
# ids that `python -m monai.bundle <command>` itself takes, not the configs
COMMAND_ARGUMENTS = {
    "meta_file",
    "logging_file",
    "tracking",
    "filepath",
    "ckpt_file",
    "input_shape",
    "use_trace",
    "converter_kwargs",
}


def _readme_commands() -> list[str]:
    text = "\n".join((ROOT / name).read_text(encoding="utf-8") for name in ("README.md", "docs/README.md"))
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    inline = re.findall(r"`((?:python -m monai\.bundle|torchrun)[^`]*)`", text)
    lines = [line for block in blocks for line in block.splitlines()] + inline
    # commands of a config (download_large_files and the like take none)
    commands = [line.split("  #")[0].strip() for line in lines if "monai.bundle" in line and "--config_file" in line]
    return sorted(set(commands))


COMMANDS = _readme_commands()


def _arguments(command: str) -> tuple[list[str], dict[str, str]]:
    """The config files and the ``--key value`` pairs of a command line."""
    words = shlex.split(re.sub(r"<[^>]+>", "PLACEHOLDER", command))  # the model card's <dataset dir> and the like
    words = words[words.index("monai.bundle") + 2 :]  # after `monai.bundle <command>`
    if words and not words[0].startswith("--"):
        words = words[1:]  # ckpt_export / verify_net_in_out take the network id first
    flags = dict(zip(words[::2], words[1::2], strict=True))
    assert all(key.startswith("--") for key in flags), command
    files = flags.pop("--config_file")
    files = ast.literal_eval(files) if files.startswith("[") else [files]
    files = ["configs/" + name.rsplit("configs/", 1)[-1] for name in files]  # an absolute path of the docs' example
    return files, {key[2:]: value for key, value in flags.items()}


def test_the_readme_has_the_commands_users_run():
    assert len(COMMANDS) >= 12
    for workflow in ("train.json", "inference.json", "evaluate.json", "multi_gpu_train.json"):
        assert any(workflow in command for command in COMMANDS), workflow


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_names_real_configs_and_ids(command):
    files, flags = _arguments(command)
    for name in files:
        assert (ROOT / name).is_file(), f"{name} in: {command}"
    config = ConfigParser.load_config_files([str(ROOT / name) for name in files])
    for key, value in flags.items():
        if key in COMMAND_ARGUMENTS:
            continue
        assert key in config, f"--{key} is no id of {files}: {command}"
        if isinstance(config[key], bool):
            as_bool(value, key)  # raises on a value the bundle refuses


# ---------------------------------------------------------------------------------------------------------------
# each command's config files, exactly as named, run as MONAI's workflow at a tiny size

# flags that name the user's own files: replaced by the tiny data set and model of the test
PATH_FLAGS = {
    "bundle_root",
    "dataset_dir",
    "datalist",
    "ckpt_dir",
    "output_dir",
    "input_dir",
    "input_file",
    "input_datalist",
}
TINY = {key: ast.literal_eval(value) for key, value in TINY_OVERRIDES.items()}


def _workflow_type(files: list[str]) -> str:
    if "configs/inference.json" in files:
        return "infer"
    return "eval" if "configs/evaluate.json" in files else "train"


def _distinct_workflows() -> list[tuple[tuple[str, ...], tuple[tuple[str, str], ...]]]:
    """Each command's config files and its flags that are not paths, once per distinct pair."""
    distinct = set()
    for command in COMMANDS:
        files, flags = _arguments(command)
        kept = {k: v for k, v in flags.items() if k not in PATH_FLAGS | COMMAND_ARGUMENTS}
        distinct.add((tuple(files), tuple(sorted(kept.items()))))
    return sorted(distinct)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny data set and a model trained on it by ``configs/train.json`` alone."""
    root = tmp_path_factory.mktemp("readme_commands")
    dataset = write_tiny_dataset(root / "data")
    models = root / "models"
    run(config_file=str(ROOT / "configs" / "train.json"), dataset_dir=str(dataset), ckpt_dir=str(models),
        output_dir=str(root / "runs"), bundle_root=str(root), **TINY)  # fmt: skip
    return {"dataset": dataset, "models": models}


@pytest.mark.parametrize(
    "files, flags", _distinct_workflows(), ids=lambda v: ",".join(map(str, v)).replace("configs/", "")
)
def test_readme_command_runs_on_exactly_the_files_it_names(files, flags, tiny_model, tmp_path):
    """MONAI's ``ConfigWorkflow`` on the command's files and nothing else: the required properties are there (train,
    infer), and the workflow runs (initialize, run, finalize) on the tiny data set. A command that only worked with
    another file merged in fails here."""
    workflow_type, flags = _workflow_type(list(files)), dict(flags)
    models = tmp_path / "models"
    if workflow_type == "eval" and "configs/cyclegan.json" in files:  # evaluating a CycleGAN needs one
        cyclegan = [str(ROOT / "configs" / name) for name in ("train.json", "cyclegan.json")]
        paths = {"dataset_dir": str(tiny_model["dataset"]), "output_dir": str(tmp_path / "runs")}
        run(config_file=cyclegan, ckpt_dir=str(models), bundle_root=str(tmp_path), **paths, **TINY)
    else:
        shutil.copytree(tiny_model["models"], models)  # training and --resume write here, not into the shared model
    dataset = tiny_model["dataset"]
    overrides: dict[str, Any] = {"bundle_root": str(tmp_path), "ckpt_dir": str(models), "dataset_dir": str(dataset)}
    overrides["output_dir"] = str(tmp_path / "out")
    source, target = ("T2", "PD") if flags.get("direction") == "B2A" else ("PD", "T2")
    if workflow_type == "infer":
        overrides["input_file"] = str(dataset / f"sub00-{source}.nii.gz")
    else:
        overrides.update(datalist="datalist.json", **(TINY if workflow_type == "train" else {}))
    overrides.update({key: ast.literal_eval(v) if v[:1] in "[0123456789" else v for key, v in flags.items()})
    distributed = "configs/multi_gpu_train.json" in files
    if distributed:  # what torchrun provides: a process group (here of one rank)
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
        )
    try:
        workflow = ConfigWorkflow(
            workflow_type=workflow_type,
            config_file=[str(ROOT / name) for name in files],
            meta_file=str(ROOT / "configs" / "metadata.json"),
            logging_file=str(ROOT / "configs" / "logging.conf"),
            **overrides,
        )
        workflow.initialize()
        if workflow_type != "eval":  # evaluate.json is an overlay on train.json, as the zoo checks it
            assert workflow.check_properties() == [], files
        workflow.run()
        workflow.finalize()
    finally:
        if distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    written = {p.name for p in (tmp_path / "out").rglob("*") if p.is_file()}
    if workflow_type == "infer" and flags.get("output_format") == "dicom":  # a folder of slices per volume
        assert {p.parent.name for p in (tmp_path / "out").rglob("*.dcm")} == {f"sub00-{source}_{target}"}
    elif workflow_type == "infer":
        assert written == {f"sub00-{source}_{target}.nii.gz"}
    elif workflow_type == "eval":
        assert {"summary.md"} <= written
    else:
        assert (models / "model.pt").is_file() and (models / "settings.json").is_file()
