"""Inference: volumes in, synthesized volumes out, in the geometry and the intensity units of the target domain.

- :func:`synthesize_volume` runs the aligned (undeformed) pass of a generator, its plain ``forward(x)``, over the
  axial slices of a preprocessed volume;
- :func:`write_intensity_reference` records, at training time, each domain's intensity scale, and
  :class:`DenormalizeIntensityd` maps synthesized intensities back to the target's units with it (HU for CT, the
  training set's typical foreground mean and standard deviation for MR);
- :func:`find_inputs` screens a folder, a file or a datalist, and :func:`raise_for_failures` reports the inputs
  that could not be processed once the good ones are done.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.inferers import SliceInferer
from monai.transforms import MapTransform
from torch import nn

from bundle.datalist import find_volumes, load_datalist, volume_problem

__all__ = [
    "BFloat16Autocast",
    "DenormalizeIntensityd",
    "InferenceInputs",
    "find_inputs",
    "raise_for_failures",
    "synthesize_volume",
    "write_intensity_reference",
]

logger = logging.getLogger(__name__)


class BFloat16Autocast(nn.Module):
    """Run a network under bfloat16 autocast on its input's device (CPU included) and return float32.

    MONAI's engines apply ``amp`` as CUDA autocast only; this wrapper gives CPUs with bfloat16 matrix units
    (AVX512-BF16, AMX) the same speed-up at inference (``--bf16 true`` in ``configs/inference.json``).

    Args:
        network: the network to wrap (its weights stay float32).
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: input batch.

        Returns:
            The network's output, as float32.
        """
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
            return self.network(x).float()


@torch.no_grad()
def synthesize_volume(
    generator: nn.Module, volume: torch.Tensor, sw_batch_size: int = 16, amp: bool | None = None
) -> torch.Tensor:
    """Synthesize a preprocessed volume axial slice by axial slice (last spatial axis, RAS) with the undeformed pass.

    Args:
        generator: a DicycleGAN generator; its plain call (the undeformed pass) is used.
        volume: preprocessed source volume of shape (C, X, Y, Z) or (N, C, X, Y, Z), on the generator's device.
        sw_batch_size: axial slices per forward pass.
        amp: bfloat16 autocast; default on for CUDA.

    Returns:
        The synthesized volume, the same shape as ``volume`` (float32).
    """
    batched = volume.ndim == 5
    x = volume if batched else volume.unsqueeze(0)
    device = x.device
    amp = device.type == "cuda" if amp is None else amp
    was_training = generator.training
    generator.eval()
    inferer = SliceInferer(roi_size=(-1, -1), sw_batch_size=sw_batch_size, spatial_dim=2, progress=False)
    try:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            out = inferer(x.float(), generator).float()
    finally:
        generator.train(was_training)
    return out if batched else out[0]


def write_intensity_reference(
    path: str | os.PathLike,
    domains: Mapping[str, tuple[str, Sequence[Mapping[str, Any]]]],
    hu_window: Sequence[float] = (-1000.0, 2000.0),
) -> dict[str, dict[str, Any]]:
    """Record each domain's intensity scale next to the models, for :class:`DenormalizeIntensityd`.

    MR: the median over the domain's training volumes of the foreground mean and standard deviation that
    :class:`~bundle.data.ForegroundZScored` recorded. CT: the HU window. Written atomically (rank 0 only).

    Args:
        path: the JSON file (usually ``models/intensity_reference.json``).
        domains: ``{"A": (kind, preprocessed volumes), "B": (kind, volumes)}``.
        hu_window: the CT window of the preprocessing.

    Returns:
        The reference, e.g. ``{"A": {"kind": "MR", "mean": 412.0, "std": 130.5}, "B": {"kind": "CT", ...}}``.
    """
    reference: dict[str, dict[str, Any]] = {}
    for domain, (kind, volumes) in domains.items():
        if len(volumes) == 0:
            raise ValueError(f"the training list of domain {domain} is empty: nothing to train on.")
        if kind == "CT":
            reference[domain] = {"kind": "CT", "hu_window": [float(v) for v in hu_window]}
            continue
        stats = [(v["image"].meta["zscore_mean"], v["image"].meta["zscore_std"]) for v in volumes]
        mean, std = np.median(np.asarray(stats, dtype=float), axis=0)
        reference[domain] = {"kind": "MR", "mean": float(mean), "std": float(std), "volumes": len(stats)}
    rank0 = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    if rank0 or torch.distributed.get_rank() == 0:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(reference, indent=2))
        os.replace(temporary, path)
    return reference


class DenormalizeIntensityd(MapTransform):
    """Map synthesized intensities from the network's scale to the target domain's units.

    CT: [-1, 1] back to the HU window (so the output is in HU). MR: ``z * std + mean`` with the target domain's
    reference from :func:`write_intensity_reference`; without a reference file MR outputs stay z-scored and a
    warning names the missing file.

    Args:
        keys: keys of the synthesized images.
        kind: the target domain's kind, ``"MR"`` or ``"CT"``.
        reference_file: the JSON written by :func:`write_intensity_reference`.
        domain: the target domain's key in that file (``"A"`` or ``"B"``).
        hu_window: CT window used when the file has none.
        allow_missing_keys: skip missing keys instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection,
        kind: str,
        reference_file: str | os.PathLike | None = None,
        domain: str = "B",
        hu_window: Sequence[float] = (-1000.0, 2000.0),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.kind = kind
        reference = {}
        if reference_file is not None and Path(reference_file).is_file():
            reference = json.loads(Path(reference_file).read_text()).get(domain, {})
        if kind == "CT":
            low, high = reference.get("hu_window", hu_window)
            self.scale, self.shift = (high - low) / 2.0, (high + low) / 2.0
        elif "mean" in reference:
            self.scale, self.shift = reference["std"], reference["mean"]
        else:
            logger.warning(f"no MR intensity reference for domain {domain} in {reference_file}: outputs stay z-scored.")
            self.scale, self.shift = 1.0, 0.0

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = d[key] * self.scale + self.shift
        return d


@dataclass
class InferenceInputs:
    """The inputs of an inference run: ``good`` entries ``{"image": path}`` and ``failures`` (path -> problem)."""

    good: list[dict[str, str]] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)


def find_inputs(
    input_dir: str | os.PathLike | None = None,
    input_file: str | os.PathLike | None = None,
    datalist: str | os.PathLike | None = None,
    dataset_dir: str | os.PathLike | None = None,
    datalist_key: str = "test",
    datalist_field: str = "A",
) -> InferenceInputs:
    """Collect and screen the volumes to synthesize; unusable ones are set aside with their problem.

    Exactly one source: a folder (NIfTI, NRRD, MHA files and DICOM series sub-folders directly inside it), a single
    file or DICOM folder, or a datalist (``datalist_key`` list, ``datalist_field`` of each entry; ``image`` for
    training lists).

    Args:
        input_dir: folder of volumes.
        input_file: one volume.
        datalist: datalist JSON, relative to ``dataset_dir``.
        dataset_dir: folder the datalist's paths are relative to (default: the datalist's folder).
        datalist_key: which list of the datalist.
        datalist_field: which path of each entry.

    Returns:
        :class:`InferenceInputs`.

    Raises:
        ValueError: if not exactly one source is given, or it holds no volume at all.
        FileNotFoundError: if the folder or the datalist does not exist.
    """
    given = [
        name for name, value in (("input_dir", input_dir), ("input_file", input_file), ("datalist", datalist)) if value
    ]
    if len(given) != 1:
        raise ValueError(f"give exactly one of input_dir, input_file, datalist (got {given or 'none'}).")
    if input_dir:
        paths = [str(p) for p in find_volumes(input_dir)]
        unknown = sorted(
            str(p)
            for p in Path(input_dir).iterdir()
            if p.is_file() and str(p) not in paths and not p.name.startswith(".")
        )
    elif input_file:
        paths, unknown = [str(input_file)], []
    else:
        root = Path(dataset_dir) if dataset_dir else Path(datalist).resolve().parent
        entries = load_datalist(root, datalist, datalist_key)
        paths, unknown = [e[datalist_field] if datalist_field in e else e["image"] for e in entries], []
    if not paths and not unknown:
        raise ValueError(f"no volume found in {given[0]} {input_dir or input_file or datalist}.")
    inputs = InferenceInputs(failures={path: "not an image volume (unknown file type)" for path in unknown})
    for path in paths:
        problem = volume_problem(path)
        if problem:
            inputs.failures[path] = problem
        else:
            inputs.good.append({"image": path})
    for path, problem in inputs.failures.items():
        logger.warning(f"skipping {path}: {problem}")
    return inputs


def raise_for_failures(inputs: InferenceInputs) -> None:
    """After the good inputs are done: raise one error listing every input that was skipped, with its problem.

    Args:
        inputs: what :func:`find_inputs` returned.

    Raises:
        RuntimeError: if any input failed (so the command exits non-zero).
    """
    if inputs.failures:
        lines = "\n".join(f"  {path}: {problem}" for path, problem in inputs.failures.items())
        total = len(inputs.failures) + len(inputs.good)
        message = (
            f"{len(inputs.failures)} of {total} inputs could not be synthesized ({len(inputs.good)} written):\n{lines}"
        )
        logger.error(message)  # printed plainly, above the traceback of the bundle runner
        raise RuntimeError(message)
