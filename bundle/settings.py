"""Settings that travel with the weights, and boolean flags as typed on the command line.

Training writes ``models/settings.json`` (:data:`SETTINGS_KEYS` plus the output activation per domain) beside
``models/model.pt``; inference, evaluation and the exports read it through :func:`resolve_settings`, so a model is
served with no network flags. Without one (no trained model yet) the networks are built from :func:`paper_settings`::

    write_settings("models", {"ngf": 16, "n_blocks": 4, ...})  # at training time
    resolve_settings("models", ngf=None)  # {"ngf": 16, ...}: from the weights
    resolve_settings("models", ngf=32)  # ValueError: ngf: the weights in models were trained with 16, not 32
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["INFERENCE_CONFIG", "PAPER_SETTINGS_ID", "SETTINGS_FILE", "SETTINGS_KEYS", "as_bool", "autocast"]
__all__ += ["out_activation", "paper_settings", "read_settings", "resolve_settings", "write_json", "write_settings"]

SETTINGS_FILE = "settings.json"
# what settings.json holds besides the output activation: the settings that rebuild and feed the networks
SETTINGS_KEYS = tuple("domain_a domain_b name_a name_b in_channels out_channels ngf n_blocks deformable".split())
SETTINGS_KEYS += ("pixdim", "spatial_size", "hu_window", "offsets")
# settings added after weights were first written, with the value every earlier model's networks load into
# (shared offsets load into per-tap offset convolutions)
_ADDED_KEYS = {"offsets": "per_tap"}
_BOOLEAN_KEYS = ("deformable",)
INFERENCE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "inference.json"
PAPER_SETTINGS_ID = "paper_settings"


def as_bool(value: Any, name: str) -> bool:
    """A boolean setting as given in a config or on the command line (python-fire passes ``true`` as a string).

    Args:
        value: a bool, or ``"true"``/``"false"`` in any case (surrounding spaces ignored).
        name: the setting's name, for the error message.

    Raises:
        ValueError: for anything else, in one line naming the flag.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"--{name}: expected true or false, got {value!r}.")


def autocast(amp: Any, device: torch.device | str) -> torch.autocast:
    """The one precision setting of every stage: bfloat16 autocast on ``device``'s type (CUDA or CPU) if ``amp``.

    Args:
        amp: the ``amp`` flag, a bool or ``"true"``/``"false"``.
        device: the device the networks run on.
    """
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=as_bool(amp, "amp"))


def out_activation(kind: str) -> str | None:
    """The generator's output activation for a domain kind: linear (None) for z-scored MR, tanh for CT in [-1, 1]."""
    if kind not in ("MR", "CT"):
        raise ValueError(f"domain kind must be 'MR' or 'CT', got {kind!r}.")
    return None if kind == "MR" else "tanh"


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically, on rank 0 only when distributed."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(data, indent=2), encoding="utf-8")
        os.replace(temporary, path)


def write_settings(ckpt_dir: str | os.PathLike, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Write (atomically, rank 0 only) and return ``ckpt_dir/settings.json``, with the output activation per domain.

    Args:
        ckpt_dir: the folder of ``model.pt``.
        settings: at least :data:`SETTINGS_KEYS`; booleans may be given as ``"true"``/``"false"``.

    Raises:
        ValueError: if a key of :data:`SETTINGS_KEYS` is missing.
    """
    missing = sorted(set(SETTINGS_KEYS) - set(settings))
    if missing:
        raise ValueError(f"settings for {ckpt_dir}: missing {missing}.")
    written = {key: _plain(value) for key, value in settings.items()}
    written["deformable"] = as_bool(written["deformable"], "deformable")
    written["out_activation"] = {"A": out_activation(written["domain_a"]), "B": out_activation(written["domain_b"])}
    write_json(Path(ckpt_dir) / SETTINGS_FILE, written)
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
    """The settings (:data:`SETTINGS_KEYS`) an untrained bundle builds its networks with: the paper's PD -> T2.

    Args:
        config_file: the config declaring them under ``paper_settings`` (default: ``configs/inference.json``).

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
        defaults: used only where ``ckpt_dir`` has no ``settings.json`` (default: :func:`paper_settings`).
        given: settings given explicitly (config override or command-line flag); None means "from the weights".

    Returns:
        ``settings.json`` (or ``defaults``) with the explicit settings applied, plus ``out_activation`` per domain.

    Raises:
        ValueError: in one line, for an explicit setting that contradicts the weights, or a ``settings.json`` (or
            ``defaults``) that lacks a key of :data:`SETTINGS_KEYS` not given explicitly.
    """
    stored = read_settings(ckpt_dir)
    if stored is not None:
        stored = {**_ADDED_KEYS, **stored}
    base = stored if stored is not None else dict(paper_settings() if defaults is None else defaults)
    # no default may stand in for a trained value: e.g. 1.8 mm for the 2.4 mm trained on gives silently wrong outputs
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
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b
