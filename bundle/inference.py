"""Inference: volumes in, synthesized volumes out, in the geometry and the intensity units of the target domain.

- :func:`synthesize_volume` runs the aligned (undeformed) pass of a generator, its plain ``forward(x)``, over the
  axial slices of a preprocessed volume;
- :func:`write_intensity_reference` records, at training time, each domain's intensity scale, and
  :class:`DenormalizeIntensityd` maps synthesized intensities back to the target's units with it (HU for CT, the
  training set's typical foreground mean and standard deviation for MR);
- :func:`find_inputs` screens a folder, a file or a datalist, and :func:`raise_for_failures` reports the inputs
  that could not be processed once the good ones are done (both in :mod:`bundle.inputs`, with the per-volume
  failure recording of the workflow).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.inferers import SliceInferer
from monai.transforms import MapTransform
from torch import nn

from bundle.inputs import InferenceInputs, find_inputs, raise_for_failures

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
