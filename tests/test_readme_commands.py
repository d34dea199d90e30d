"""Every ``monai.bundle`` command line of the README and of the model card (docs/README.md), as written: its config
files exist and merge, each flag names an id of the merged config (a typo would otherwise be added silently as a new
id and ignored), and each value of a boolean setting is one the bundle accepts."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest
from bundle.settings import as_bool
from monai.bundle import ConfigParser

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
