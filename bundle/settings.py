"""Settings that travel with the weights, and boolean flags as typed on the command line.

Training writes ``models/settings.json`` beside ``models/model.pt``: everything needed to rebuild and feed its
networks (:data:`SETTINGS_KEYS`: domain kinds and names, width, depth, ``deformable``, voxel size, slice size, HU
window; the values are the running training config's, ``configs/train.json`` with its preset and flags), plus the
output activation per domain. Inference, evaluation and ``ckpt_export``/``onnx_export`` read it through
:func:`resolve_settings`, so a model trained with any preset is served with no network flags, and an explicit setting
that contradicts the weights fails in one line naming the setting and both values.

Only where a folder holds no ``settings.json`` (no trained model yet: the model zoo's ``verify_net_in_out`` on a
fresh clone, or weights saved without it) are the networks built from the running config's own values: the
``paper_settings`` of ``configs/inference.json`` (:func:`paper_settings`). This module holds the names of the settings,
never their values.

Example::

    write_settings("models", {"ngf": 16, "n_blocks": 4, ...})  # at training time
    settings = resolve_settings("models", ngf=None)  # {"ngf": 16, ...}: read from the weights
    resolve_settings("models", ngf=32)  # ValueError: ngf: the weights in models were trained with 16, not 32
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "INFERENCE_CONFIG",
    "PAPER_SETTINGS_ID",
    "SETTINGS_FILE",
    "SETTINGS_KEYS",
    "as_bool",
    "autocast",
    "out_activation",
    "paper_settings",
    "read_settings",
    "resolve_settings",
    "write_settings",
]

SETTINGS_FILE = "settings.json"

# what settings.json holds (besides the output activation it derives): the settings that rebuild and feed the networks
SETTINGS_KEYS = (
    "domain_a",
    "domain_b",
    "name_a",
    "name_b",
    "in_channels",
    "out_channels",
    "ngf",
    "n_blocks",
    "deformable",
    "pixdim",
    "spatial_size",
    "hu_window",
)
_BOOLEAN_KEYS = ("deformable",)
# the standalone inference config declares the values an untrained bundle builds its networks with
INFERENCE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "inference.json"
PAPER_SETTINGS_ID = "paper_settings"

_TRUE, _FALSE = "true", "false"


def as_bool(value: Any, name: str) -> bool:
    """A boolean setting as given in a config or on the command line (python-fire passes ``true`` as a string).

    Args:
        value: a bool, or ``"true"``/``"false"`` in any case (surrounding spaces ignored).
        name: the setting's name, for the error message.

    Returns:
        The boolean.

    Raises:
        ValueError: for anything else, in one line naming the flag.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in (_TRUE, _FALSE):
        return value.strip().lower() == _TRUE
    raise ValueError(f"--{name}: expected true or false, got {value!r}.")


def autocast(amp: Any, device: torch.device | str) -> torch.autocast:
    """The one precision setting of every stage (train, validate, infer, evaluate): ``amp`` is bfloat16 autocast on
    the device in use, CUDA or CPU alike (bfloat16 needs no GradScaler, and CPUs with AVX512-BF16/AMX gain from it).

    Args:
        amp: the ``amp`` flag, a bool or ``"true"``/``"false"``.
        device: the device the networks run on.

    Returns:
        The autocast context (disabled when ``amp`` is false).
    """
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=as_bool(amp, "amp"))


def out_activation(kind: str) -> str | None:
    """The generator's output activation for a domain kind: linear for z-scored MR, tanh for range-scaled CT."""
    if kind not in ("MR", "CT"):
        raise ValueError(f"domain kind must be 'MR' or 'CT', got {kind!r}.")
    return None if kind == "MR" else "tanh"


def write_settings(ckpt_dir: str | os.PathLike, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``settings.json`` into ``ckpt_dir`` atomically (rank 0 only), with the output activation per domain.

    Args:
        ckpt_dir: the folder of ``model.pt``.
        settings: at least :data:`SETTINGS_KEYS`; booleans may be given as ``"true"``/``"false"``.

    Returns:
        The settings written.
    """
    missing = sorted(set(SETTINGS_KEYS) - set(settings))
    if missing:
        raise ValueError(f"settings for {ckpt_dir}: missing {missing}.")
    written = {key: _plain(value) for key, value in settings.items()}
    written["deformable"] = as_bool(written["deformable"], "deformable")
    written["out_activation"] = {"A": out_activation(written["domain_a"]), "B": out_activation(written["domain_b"])}
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:
        path = Path(ckpt_dir) / SETTINGS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(written, indent=2), encoding="utf-8")
        os.replace(temporary, path)
    return written


def read_settings(ckpt_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The settings training wrote into ``ckpt_dir``, or None where there are none (no trained model yet).

    Raises:
        ValueError: if the file exists but is not a JSON object.
    """
    path = Path(ckpt_dir) / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not readable JSON ({error}).") from error
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: expected a JSON object of settings.")
    return settings


def paper_settings(config_file: str | os.PathLike = INFERENCE_CONFIG) -> dict[str, Any]:
    """The settings an untrained bundle builds its networks with: the ``paper_settings`` of the inference config.

    Args:
        config_file: the config declaring them (default: this bundle's ``configs/inference.json``).

    Returns:
        The settings (:data:`SETTINGS_KEYS`), the paper's PD -> T2 network and geometry.

    Raises:
        ValueError: if the config has no ``paper_settings`` object.
    """
    config = json.loads(Path(config_file).read_text(encoding="utf-8"))
    settings = config.get(PAPER_SETTINGS_ID)
    if not isinstance(settings, dict):
        raise ValueError(f"{config_file}: no {PAPER_SETTINGS_ID!r} object (the settings of an untrained bundle).")
    return settings


def resolve_settings(
    ckpt_dir: str | os.PathLike, defaults: Mapping[str, Any] | None = None, **given: Any
) -> dict[str, Any]:
    """The settings to rebuild and feed the trained networks: the weights' own, checked against explicit ones.

    Args:
        ckpt_dir: the folder of ``model.pt`` and ``settings.json``.
        defaults: the running config's settings, used only where ``ckpt_dir`` has no ``settings.json`` (default:
            :func:`paper_settings`).
        given: settings given explicitly (a config override or a command-line flag); None means "from the weights".

    Returns:
        ``settings.json`` (or ``defaults`` where there is none) with the explicit settings applied, plus
        ``out_activation`` per domain.

    Raises:
        ValueError: in one line, for an explicit setting that contradicts the weights, or a ``settings.json`` (or
            ``defaults``) that lacks a key of :data:`SETTINGS_KEYS` not given explicitly.
    """
    stored = read_settings(ckpt_dir)
    base = stored if stored is not None else dict(paper_settings() if defaults is None else defaults)
    # a trained model's folder must say everything: a default in place of a trained value (e.g. the paper's
    # 1.8 mm instead of the 2.4 mm trained on) synthesizes silently wrong outputs
    missing = [key for key in SETTINGS_KEYS if key not in base and given.get(key) is None]
    if missing:
        keys = ", ".join(repr(key) for key in missing)
        if stored is None:
            raise ValueError(f"no settings.json in {ckpt_dir} and no {keys} in the config's defaults; give them.")
        raise ValueError(
            f"{Path(ckpt_dir) / SETTINGS_FILE} is incomplete: no {keys} (the value{'s' if len(missing) > 1 else ''} "
            f"the weights were trained with); restore the file written by training, or give --{missing[0]} explicitly."
        )
    settings = dict(base)
    for key, value in given.items():
        if value is None:
            continue
        value = as_bool(value, key) if key in _BOOLEAN_KEYS else _plain(value)
        if stored is not None and key in stored and not _same(stored[key], value):
            raise ValueError(
                f"{key}: the weights in {ckpt_dir} were trained with {stored[key]!r}, not {value!r} "
                f"(see {Path(ckpt_dir) / SETTINGS_FILE}; leave {key} out to use the weights' value)."
            )
        settings[key] = value
    settings["out_activation"] = {"A": out_activation(settings["domain_a"]), "B": out_activation(settings["domain_b"])}
    return settings


def _plain(value: Any) -> Any:
    """JSON-ready copy: tuples, tensors and numpy arrays become lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b
