"""Tiny data and command lines for tests that run the bundle's configs through ``monai.bundle``.

The volumes are small noisy ellipsoids (MR-like, arbitrary units) in two contrasts, written as NIfTI with a 2 mm
grid, plus a datalist in the format of :mod:`bundle.datalist`. With :data:`TINY_OVERRIDES` (tiny networks, 32 x 32
slices, 8 samples, one epoch) a training run takes seconds on a CPU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["BUNDLE_ROOT", "TINY_OVERRIDES", "bundle_command", "bundle_env", "root_error", "write_tiny_dataset"]

BUNDLE_ROOT = Path(__file__).resolve().parents[1]

# the training overrides that make ``configs/train.json`` run in seconds: tiny networks, volumes and epoch
TINY_OVERRIDES: dict[str, str] = {
    "ngf": "4",
    "n_blocks": "1",
    "d_channels": "4",
    "spatial_size": "[32,32]",
    "pixdim": "[2,2,2]",
    "samples_per_epoch": "8",
    "n_epochs": "1",
    "n_epochs_decay": "0",
    "num_workers": "0",
    "cache_workers": "1",
}


def _ellipsoid_volume(rng: np.random.Generator, shape: tuple[int, int, int], contrast: float) -> np.ndarray:
    """A noisy ellipsoid of random radii (intensity 100) whose inner core is ``contrast`` times as bright."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    radii = rng.uniform(0.6, 0.9, size=3)[:, None, None, None]
    radius = np.sqrt(((grid / radii) ** 2).sum(axis=0))
    image = np.where(radius < 1.0, 100.0, 0.0) + np.where(radius < 0.6, 100.0 * (contrast - 1.0), 0.0)
    return (image + rng.normal(0.0, 5.0, size=shape)).clip(0.0).astype(np.float32)


def write_tiny_dataset(
    root: str | os.PathLike, n_volumes: int = 2, shape: tuple[int, int, int] = (24, 24, 8), seed: int = 0
) -> Path:
    """Write ``n_volumes`` volumes per domain and ``datalist.json`` into ``root``.

    Args:
        root: the dataset folder (created if missing).
        n_volumes: volumes of each domain.
        shape: voxels of each volume (2 mm isotropic, RAS).
        seed: seed of the random shapes and noise.

    Returns:
        ``root`` as a ``Path``; its ``datalist.json`` has ``training_A`` (contrast "PD"), ``training_B`` ("T2"),
        and the i-th volumes of both as ``training_pairs``, ``validation`` and ``test``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    lists: dict[str, list[dict[str, str]]] = {"training_A": [], "training_B": []}
    for key, contrast, name in (("training_A", 1.5, "PD"), ("training_B", 0.4, "T2")):
        for i in range(n_volumes):
            filename = f"sub{i:02d}-{name}.nii.gz"
            nib.save(nib.Nifti1Image(_ellipsoid_volume(rng, shape, contrast), affine), root / filename)
            lists[key].append({"image": filename})
    # volume i of A with volume i of B: enough for the validation workflow to run (they are not the same anatomy)
    validation = [
        {"A": a["image"], "B": b["image"], "subject": f"sub{i:02d}"}
        for i, (a, b) in enumerate(zip(lists["training_A"], lists["training_B"], strict=True))
    ]
    pairs = [{"A": entry["A"], "B": entry["B"]} for entry in validation]  # same grid: a misaligned-pairs list
    datalist = {"domains": {"A": "PD", "B": "T2"}, **lists, "training_pairs": pairs, "validation": validation}
    datalist["test"] = validation
    (root / "datalist.json").write_text(json.dumps(datalist, indent=2), encoding="utf-8")
    return root


def bundle_command(config_files: list[str], overrides: dict[str, str]) -> list[str]:
    """The arguments of ``python -m monai.bundle run`` for merged config files and command-line overrides.

    Args:
        config_files: paths (absolute, or relative to the working directory), merged in order.
        overrides: config ids and their values as typed on the command line (MONAI parses them as Python literals
            where possible).

    Returns:
        The argument list after the interpreter, e.g. ``["-m", "monai.bundle", "run", "--config_file", ...]``.
    """
    files = "[" + ",".join(f"'{f}'" for f in config_files) + "]"
    args = ["-m", "monai.bundle", "run", "--config_file", files]
    for key, value in overrides.items():
        args += [f"--{key}", value]
    return args


def bundle_env() -> dict[str, str]:
    """The environment of a bundle subprocess: this one, with the bundle root on ``PYTHONPATH`` and one OpenMP thread
    per process (the configs import ``bundle``; two ranks share two cores)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BUNDLE_ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


def root_error(error: BaseException) -> BaseException:
    """The error a bundle expression raised, under the ``RuntimeError("Failed to evaluate ...")`` wrappers of MONAI's
    config runner."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error
